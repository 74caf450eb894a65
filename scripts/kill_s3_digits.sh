#!/usr/bin/env bash
# Kills the release digits job at random moments while it trains into an s3:// run
# directory, reruns it until it finishes, and checks that its final checkpoint equals
# an uninterrupted local run's (`relume diff`) and that every checkpoint in the bucket
# verifies. Needs an S3 server: `eval "$(.ci/s3-server.sh start)"` first.
#   TRIALS=10 MAX_MS=3000 EPOCHS=60 scripts/kill_s3_digits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RELUME_S3_TEST_BUCKET:?start the S3 server first: eval \"\$(.ci/s3-server.sh start)\"}"
TRIALS="${TRIALS:-10}" MAX_MS="${MAX_MS:-3000}" EPOCHS="${EPOCHS:-60}"
cargo build --release -q --example digits -p relume
cargo build --release -q -p relume-cli
B=target/release
work=$(mktemp -d)
run="s3://$RELUME_S3_TEST_BUCKET/kill-digits-$(date +%s)-$$"
"$B/examples/digits" --run-dir "$work/local" --max-epochs "$EPOCHS" >"$work/local.out" 2>&1
kills=0
for t in $(seq 1 "$TRIALS"); do
    "$B/examples/digits" --run-dir "$run" --log-dir "$work/logs" --max-epochs "$EPOCHS" >>"$work/s3.out" 2>&1 &
    pid=$!
    sleep "$(awk -v m="$MAX_MS" -v r="$RANDOM" 'BEGIN { printf "%.3f", (r % m) / 1000 }')"
    if kill -9 "$pid" 2>/dev/null; then kills=$((kills + 1)); fi
    wait "$pid" || true
    "$B/relume" verify "$run" >/dev/null || { echo "trial $t: verify failed"; "$B/relume" verify "$run"; exit 1; }
done
"$B/examples/digits" --run-dir "$run" --log-dir "$work/logs" --max-epochs "$EPOCHS" >>"$work/s3.out" 2>&1
"$B/relume" verify "$run" >/dev/null
"$B/relume" diff "$work/local" "$run"
echo "kill_s3_digits: $TRIALS trials, $kills SIGKILLs; the run finished equal to the local uninterrupted run ($run)"
rm -rf "$work"
