#!/usr/bin/env bash
# Kills ONE rank of `mpirun -np 2 digits --micro-batches 2` with SIGKILL at random
# moments (mpirun then ends the job) and reruns the job until it finishes, TRIALS
# times; odd trials rerun under mpirun, even ones continue in one process (a
# world-size change). Each chain's final checkpoint must equal an uninterrupted
# one-process run's, byte for byte (every data file; the manifests differ in
# created_at and world_size).
#
#   cargo build --release --example digits --features relume/mpi
#   TRIALS=10 scripts/kill_mpi_digits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
BIN=${BIN:-target/release/examples/digits}
TRIALS=${TRIALS:-10}
EPOCHS=${EPOCHS:-10}
MAX_MS=${MAX_MS:-4000}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ARGS=(--micro-batches 2 --max-epochs "$EPOCHS")

"$BIN" "${ARGS[@]}" --run-dir "$WORK/ref" >"$WORK/ref.log" 2>&1
final() { (cd "$1/checkpoints" && cat latest); }
same() {
  local a="$1/checkpoints/$(final "$1")" b="$2/checkpoints/$(final "$2")"
  for f in "$a"/*; do
    [ "$(basename "$f")" = manifest.json ] && continue
    cmp -s "$f" "$b/$(basename "$f")" || { echo "differs: $(basename "$f")"; return 1; }
  done
}

ok=0; kills=0; bad=0
for t in $(seq 1 "$TRIALS"); do
  run="$WORK/t$t"
  for attempt in 1 2 3; do
    mpirun --oversubscribe -np 2 "$BIN" "${ARGS[@]}" --run-dir "$run" >>"$WORK/t$t.log" 2>&1 &
    mpid=$!
    sleep "$((RANDOM % MAX_MS / 1000)).$(printf '%03d' $((RANDOM % 1000)))"
    victim=$(pgrep -f -- "--run-dir $run" | grep -v "^$mpid\$" | tail -1 || true)
    if [ -n "$victim" ] && kill -9 "$victim" 2>/dev/null; then kills=$((kills + 1)); fi
    wait "$mpid" && break || true
  done
  if [ $((t % 2)) = 1 ]; then
    mpirun --oversubscribe -np 2 "$BIN" "${ARGS[@]}" --run-dir "$run" >>"$WORK/t$t.log" 2>&1 && code=0 || code=$?
  else
    "$BIN" "${ARGS[@]}" --run-dir "$run" >>"$WORK/t$t.log" 2>&1 && code=0 || code=$?
  fi
  if [ "$code" = 0 ] && same "$WORK/ref" "$run"; then
    ok=$((ok + 1))
  else
    echo "trial $t: exit $code or a final state that differs:"; tail -3 "$WORK/t$t.log"; bad=$((bad + 1))
  fi
  rm -rf "$run"
done
echo "$ok/$TRIALS chains finished byte-identical ($kills ranks SIGKILLed); $bad failed"
[ "$bad" = 0 ]
