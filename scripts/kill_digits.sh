#!/usr/bin/env bash
# Kills the release digits job with SIGKILL at random moments and reruns it until it
# finishes, TRIALS times; each chain's final checkpoint must equal an uninterrupted
# run's, byte for byte (every data file; the manifests differ only in created_at).
#
#   cargo build --release --example digits
#   TRIALS=100 scripts/kill_digits.sh
#
# Prints one line per trial and a summary; exits 1 if any chain failed, errored or
# ended different.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/examples/digits}
TRIALS=${TRIALS:-50}
MAX_MS=${MAX_MS:-900}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$BIN" --run-dir "$WORK/ref" >"$WORK/ref.log" 2>&1
final() { (cd "$1/checkpoints" && cat latest); }
same() {
  local a="$1/checkpoints/$(final "$1")" b="$2/checkpoints/$(final "$2")"
  for f in "$a"/*; do
    [ "$(basename "$f")" = manifest.json ] && continue
    cmp -s "$f" "$b/$(basename "$f")" || return 1
  done
}

ok=0; kills=0; bad=0
for t in $(seq 1 "$TRIALS"); do
  run="$WORK/t$t"
  for attempt in $(seq 1 20); do
    if [ "$attempt" -le 4 ]; then
      "$BIN" --run-dir "$run" >>"$WORK/t$t.log" 2>&1 &
      pid=$!
      sleep "0.$(printf '%03d' $((RANDOM % MAX_MS)))"
      kill -9 "$pid" 2>/dev/null && kills=$((kills + 1)) || true
      wait "$pid" && code=0 || code=$?
    else
      "$BIN" --run-dir "$run" >>"$WORK/t$t.log" 2>&1 && code=0 || code=$?
    fi
    if [ "$code" = 0 ]; then break; fi
    if [ "$code" != 137 ]; then
      echo "trial $t: exit $code (not a kill):"; tail -5 "$WORK/t$t.log"; bad=$((bad + 1)); continue 2
    fi
  done
  if [ "$code" = 0 ] && same "$WORK/ref" "$run"; then
    ok=$((ok + 1))
  else
    echo "trial $t: final state differs from the uninterrupted run"; bad=$((bad + 1))
  fi
  rm -rf "$run"
done
echo "$ok/$TRIALS chains finished byte-identical ($kills SIGKILLs); $bad failed"
[ "$bad" = 0 ]
