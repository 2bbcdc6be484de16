#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on CPU, with a real Redis server.
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k radix -x     # extra arguments go to pytest
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh

# A Redis server of our own on a free loopback port, stopped by pid on exit.
redis_dir="$(mktemp -d)"
redis_port="$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --daemonize yes \
    --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log" --dir "$redis_dir"
cleanup() {
    if [ -f "$redis_dir/redis.pid" ]; then kill "$(cat "$redis_dir/redis.pid")" 2>/dev/null || true; fi
    rm -rf "$redis_dir"
}
trap cleanup EXIT
for _ in $(seq 50); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
done
export FLASHCACHE_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/0"
echo "[test] redis at $FLASHCACHE_TEST_REDIS_URL" >&2

# pytest exits 5 when it collected nothing: that must not pass for green.
set +e
.venv/bin/python -m pytest tests -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "[test] pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
