#!/usr/bin/env bash
# Peak memory and wall time of `relume lightning inspect` and `convert` on a generated
# Lightning `.ckpt` with one large storage.
#
#   scripts/measure_lightning.sh WORKDIR MIB RELUME_BIN [RELUME_BIN ...]
#
# Writes WORKDIR/big.ckpt (MIB MiB of float32, built by the relume-lightning example
# big_lightning_ckpt), then for each binary runs, under /usr/bin/time -v,
#   BIN lightning inspect WORKDIR/big.ckpt --json
#   BIN lightning convert WORKDIR/big.ckpt WORKDIR/out-<n> --json
# (BIG_CKPT_GEN=path/to/big_lightning_ckpt uses a prebuilt generator instead of cargo run)
# and prints peak RSS ("Maximum resident set size", anonymous and file-backed pages
# together), the peak of anonymous memory alone (RssAnon, sampled from /proc every 20 ms)
# and wall time. Everything under WORKDIR is deleted at the end.
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 WORKDIR MIB RELUME_BIN [RELUME_BIN ...]" >&2
    exit 2
fi
work=$1
mib=$2
shift 2
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

if [ -n "${BIG_CKPT_GEN:-}" ]; then
    "$BIG_CKPT_GEN" "$work/big.ckpt" "$mib"
else
    cargo run --release -q -p relume-lightning --example big_lightning_ckpt -- "$work/big.ckpt" "$mib"
fi
ls -l "$work/big.ckpt"

# Runs "$@" under /usr/bin/time -v; prints max RSS, peak RssAnon and wall time.
measure() {
    local label=$1
    shift
    local log="$work/time.log"
    /usr/bin/time -v "$@" >/dev/null 2>"$log" &
    local tpid=$!
    local anon=0 child=""
    while kill -0 "$tpid" 2>/dev/null; do
        [ -z "$child" ] && child=$(pgrep -P "$tpid" || true)
        if [ -n "$child" ] && [ -r "/proc/$child/status" ]; then
            local a
            a=$(awk '/^RssAnon:/ {print $2}' "/proc/$child/status" 2>/dev/null || echo 0)
            [ -n "$a" ] && [ "$a" -gt "$anon" ] && anon=$a
        fi
        sleep 0.02
    done
    local rc=0
    wait "$tpid" || rc=$?
    local rss wall
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
    wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log")
    printf '%-10s rc=%d  max RSS %8d KiB  peak RssAnon %8d KiB  wall %s\n' \
        "$label" "$rc" "$rss" "$anon" "$wall"
}

n=0
for bin in "$@"; do
    n=$((n + 1))
    echo "== $bin"
    # Drop nothing from the page cache: both runs see the file cached (it was just written).
    measure inspect "$bin" lightning inspect "$work/big.ckpt" --json
    measure convert "$bin" lightning convert "$work/big.ckpt" "$work/out-$n" --json
    du -sh "$work/out-$n" | sed 's/^/output /'
    rm -rf "$work/out-$n"
done
