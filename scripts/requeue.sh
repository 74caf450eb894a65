#!/usr/bin/env bash
# Rerun a relume training command while it exits with the "preempted" code.
#
#   scripts/requeue.sh [--max N] -- cargo run --release --example digits -- --run-dir runs/digits
#
# A relume run that receives SIGTERM or SIGUSR1 (or SIGINT when the trainer enables it)
# finishes its current step, commits a checkpoint, flushes the async saves and loggers,
# and exits with code 75 (relume::PREEMPTED_EXIT_CODE, EX_TEMPFAIL in sysexits.h).
# This loop reruns the same command after each such exit; the command must resume from
# its run directory (resume policy `IfExists` or `Required` from `last`), so every
# rerun continues exactly where the previous one stopped. Any other exit code ends the
# loop with that code: 0 (finished), 1 (error), 2 (usage), 101 (panic), 128+N (killed).
#
# Signals sent to this script (not only to the child) are forwarded to the child, and
# then the loop stops with the child's code: the whole job is going away. To requeue
# through the scheduler instead of looping here (SLURM), replace the loop body's
# restart with `scontrol requeue "$SLURM_JOB_ID"` when the code is 75.
#
# Environment: RELUME_PREEMPTED_CODE (default 75) if a wrapper maps codes differently.
set -u

PREEMPTED=${RELUME_PREEMPTED_CODE:-75}
max=100
while [ $# -gt 0 ]; do
  case "$1" in
    --max) max=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ $# -eq 0 ]; then
  echo "usage: $0 [--max N] -- COMMAND [ARGS...]" >&2
  exit 2
fi

child=
stopping=0
forward() {
  stopping=1
  if [ -n "$child" ]; then kill -s "$1" "$child" 2>/dev/null; fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
# A background child of a non-interactive shell ignores SIGINT, so Ctrl-C is forwarded
# as SIGTERM: the run saves and exits with 75, and the loop stops.
trap 'forward TERM' INT

runs=0
while :; do
  runs=$((runs + 1))
  "$@" &
  child=$!
  # `wait` returns early when a trapped signal arrives; wait again until the child exits.
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  child=
  if [ "$rc" -ne "$PREEMPTED" ]; then
    exit "$rc"
  fi
  if [ "$stopping" -eq 1 ]; then
    echo "requeue.sh: preempted and this script was signalled too; not restarting (exit $rc)" >&2
    exit "$rc"
  fi
  if [ "$runs" -ge "$max" ]; then
    echo "requeue.sh: preempted $runs times, reached --max $max; giving up (exit $rc)" >&2
    exit "$rc"
  fi
  echo "requeue.sh: run $runs was preempted (exit $rc); restarting" >&2
done
