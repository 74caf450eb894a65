#!/usr/bin/env bash
# Runs a local S3-compatible server (moto, from PyPI, in its own virtualenv) for the
# object-store tests.
#
#   eval "$(.ci/s3-server.sh start)"   # install if needed, start, create the bucket,
#                                      # print `export AWS_...` lines on stdout
#   .ci/s3-server.sh stop              # stop it (safe when it is not running)
#
# Environment:
#   RELUME_MOTO_VENV       virtualenv to use/create (default target/moto-venv; a relative
#                          path is taken from the repository root)
#   RELUME_S3_PORT         port to listen on (default: a free port picked at start)
#   RELUME_S3_BUCKET       bucket to create (default relume-ci)
#   RELUME_MOTO_SERIALIZE  1 (default): run moto's app behind one lock, so that a
#                          conditional PUT (If-None-Match: *) is atomic under concurrency;
#                          plain moto checks and stores in two steps and lets two racing
#                          creators both get 200. 0: run the stock `moto_server`.
#   RELUME_MOTO_START_TIMEOUT  seconds to wait for the port (default 60)
#   RELUME_MOTO_PYTHON     python used to create the virtualenv (default python3)
#
# Files: target/moto.log (server log), target/moto.pid, target/moto.env (the exports).
# Only the export lines go to stdout; all progress goes to stderr.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

TARGET="$ROOT/target"
VENV="${RELUME_MOTO_VENV:-target/moto-venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
REQS="$ROOT/.ci/moto-requirements.txt"
PID_FILE="$TARGET/moto.pid"
LOG_FILE="$TARGET/moto.log"
ENV_FILE="$TARGET/moto.env"
STAMP="$VENV/.relume-moto-requirements.sha256"
BUCKET="${RELUME_S3_BUCKET:-relume-ci}"
START_TIMEOUT="${RELUME_MOTO_START_TIMEOUT:-60}"
case "$START_TIMEOUT" in '' | *[!0-9]*) START_TIMEOUT=60 ;; esac
SERIALIZE="${RELUME_MOTO_SERIALIZE:-1}"
PY="${RELUME_MOTO_PYTHON:-python3}"

log() { printf 's3-server: %s\n' "$*" >&2; }

# wait_gone PID TENTHS: true once PID has exited, false if it still runs after
# TENTHS tenths of a second.
wait_gone() {
    local i
    for ((i = 0; i < $2; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    ! kill -0 "$1" 2>/dev/null
}
die() { log "error: $*"; exit 1; }

# Moto's WSGI app behind one global lock: each request (body read, checks, store,
# response body) runs alone, which makes check-then-store operations such as
# PutObject/CompleteMultipartUpload with If-None-Match atomic. Connections are still
# accepted concurrently. Same arguments as `moto_server`.
SERIALIZED_SERVER_PY='
import sys, threading
from moto.moto_server import werkzeug_app
import moto.server

_lock = threading.Lock()
_call = werkzeug_app.DomainDispatcherApplication.__call__

def _serialized(self, environ, start_response):
    with _lock:
        result = _call(self, environ, start_response)
        try:
            return [b"".join(result)]
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

werkzeug_app.DomainDispatcherApplication.__call__ = _serialized
moto.server.main(sys.argv[1:])
'

# PID from the pid file if that process is alive and is a moto server; empty otherwise.
running_pid() {
    local pid cmd
    [ -f "$PID_FILE" ] || return 0
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    if [ -r "/proc/$pid/cmdline" ]; then
        cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline")"
        case "$cmd" in
            *moto*) ;;
            *) return 0 ;; # the PID was reused by something else
        esac
    fi
    echo "$pid"
}

stop_server() {
    local pid i
    pid="$(running_pid)"
    if [ -z "$pid" ]; then
        [ -f "$PID_FILE" ] && log "no live moto server for $PID_FILE; removing it"
        rm -f "$PID_FILE" "$ENV_FILE"
        return 0
    fi
    log "stopping moto server (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" 100; then
        log "pid $pid ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 50 || true
    fi
    rm -f "$PID_FILE" "$ENV_FILE"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

make_venv() {
    if "$PY" -m venv "$VENV" >&2; then return 0; fi
    rm -rf "$VENV"
    # Debian's python3 ships without ensurepip unless python3-venv is installed.
    if command -v apt-get >/dev/null 2>&1; then
        log "python3 -m venv failed; installing python3-venv with apt-get"
        as_root apt-get update -qq >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >&2
        "$PY" -m venv "$VENV" >&2 && return 0
        rm -rf "$VENV"
    fi
    die "could not create a virtualenv at $VENV with $PY"
}

ensure_venv() {
    local want
    want="$(sha256sum "$REQS" | cut -d' ' -f1)"
    if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
        && [ -x "$VENV/bin/moto_server" ]; then
        log "using existing virtualenv $VENV"
        return 0
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV"
        make_venv
    fi
    log "installing $(grep -m1 '^moto' "$REQS") into $VENV (under a minute from empty)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-compile \
        -r "$REQS" >&2 || die "pip install -r $REQS failed"
    echo "$want" >"$STAMP"
}

pick_port() {
    "$VENV/bin/python" -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

fail_start() {
    log "error: $*"
    log "---- last lines of $LOG_FILE ----"
    tail -n 40 "$LOG_FILE" >&2 || true
    log "----"
    stop_server
    exit 1
}

create_bucket() {
    "$VENV/bin/python" - "$1" "$2" <<'PY' >&2
import sys, time
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

endpoint, bucket = sys.argv[1], sys.argv[2]
s3 = boto3.session.Session().client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id="testing", aws_secret_access_key="testing",
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
)
deadline = time.monotonic() + 30
while True:
    try:
        s3.create_bucket(Bucket=bucket)
        break
    except ClientError as e:
        if e.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            break
        raise
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
s3.head_bucket(Bucket=bucket)
print(f"s3-server: bucket {bucket} ready at {endpoint}")
PY
}

start_server() {
    local t0 port pid endpoint i
    t0=$SECONDS
    # Only the export lines below go to the caller's stdout (fd 3).
    exec 3>&1 1>&2
    [ -f "$REQS" ] || die "missing $REQS"
    mkdir -p "$TARGET"
    if [ -n "$(running_pid)" ]; then
        log "a moto server is already running; restarting it"
    fi
    stop_server
    ensure_venv

    port="${RELUME_S3_PORT:-$(pick_port)}"
    case "$port" in '' | *[!0-9]*) die "bad port '$port'" ;; esac
    [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "bad port '$port'"
    if port_open "$port"; then
        die "port $port is already in use on 127.0.0.1"
    fi

    : >"$LOG_FILE"
    if [ "$SERIALIZE" = "1" ]; then
        log "starting moto (serialized requests) on 127.0.0.1:$port, log $LOG_FILE"
        "$VENV/bin/python" -c "$SERIALIZED_SERVER_PY" -H 127.0.0.1 -p "$port" \
            </dev/null >>"$LOG_FILE" 2>&1 3>&- &
    else
        log "starting moto_server on 127.0.0.1:$port, log $LOG_FILE"
        "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" \
            </dev/null >>"$LOG_FILE" 2>&1 3>&- &
    fi
    pid=$!
    echo "$pid" >"$PID_FILE"

    for ((i = 0; i < START_TIMEOUT * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || fail_start "moto server (pid $pid) exited during start"
        port_open "$port" && break
        sleep 0.1
    done
    port_open "$port" || fail_start "moto server did not listen on port $port within ${START_TIMEOUT}s"
    kill -0 "$pid" 2>/dev/null || fail_start "moto server (pid $pid) exited during start"

    endpoint="http://127.0.0.1:$port"
    create_bucket "$endpoint" "$BUCKET" || fail_start "could not create bucket $BUCKET"

    {
        printf 'export AWS_ENDPOINT=%q\n' "$endpoint"
        printf 'export AWS_ENDPOINT_URL=%q\n' "$endpoint"
        printf 'export AWS_ACCESS_KEY_ID=testing\n'
        printf 'export AWS_SECRET_ACCESS_KEY=testing\n'
        printf 'export AWS_REGION=us-east-1\n'
        printf 'export AWS_DEFAULT_REGION=us-east-1\n'
        printf 'export AWS_ALLOW_HTTP=true\n'
        printf 'export RELUME_S3_TEST_BUCKET=%q\n' "$BUCKET"
    } >"$ENV_FILE"
    cat "$ENV_FILE" >&3
    log "moto server up (pid $pid) in $((SECONDS - t0)) s; exports also in $ENV_FILE"
}

case "${1:-}" in
    start) start_server ;;
    stop) stop_server ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
