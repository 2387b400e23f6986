#!/usr/bin/env bash
# Direct vs PgBouncer vs handoff, both poolers in session mode, same pgbench run.
# A stopgap until `handoff-bench compare` exists. Needs pgbouncer and the PostgreSQL
# server binaries; runs PostgreSQL and PgBouncer as the postgres user when run as root.
# Usage: benches/compare-pgbouncer.sh [seconds] [rounds]
set -euo pipefail
secs=${1:-10}
rounds=${2:-2}
top=$(cd "$(dirname "$0")/.." && pwd)
bin=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")
pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
work=$(mktemp -d /tmp/handoff-compare-XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(port); pgb_port=$(port); ho_port=$(port); admin_port=$(port)

cargo build --release -q -p handoff --manifest-path "$top/Cargo.toml"
as_pg "$bin/initdb" -D "$work/data" -U postgres -A trust --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$pg_port
unix_socket_directories='$work'
fsync=off
max_connections=100
shared_buffers=32MB
CONF
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
cleanup() {
    kill "${pgb_pid:-}" "${ho_pid:-}" 2>/dev/null || true
    as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
"$bin/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1
cat >"$work/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pgb_port
auth_type = trust
auth_file = $work/users.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 20
unix_socket_dir =
logfile = $work/pgbouncer.log
INI
echo '"postgres" ""' >"$work/users.txt"
[ "$(id -u)" -eq 0 ] && chown postgres "$work"/*
as_pg "$pgbouncer" "$work/pgbouncer.ini" >/dev/null 2>&1 &
pgb_pid=$!
env -u HANDOFF_LOG HANDOFF_SHARDS="main=127.0.0.1:$pg_port" HANDOFF_LISTEN="127.0.0.1:$ho_port" \
    HANDOFF_ADMIN_LISTEN="127.0.0.1:$admin_port" HANDOFF_LOG=warn "$top/target/release/handoff" &
ho_pid=$!
sleep 1
printf '%-6s %-10s %12s\n' round target tps
for r in $(seq "$rounds"); do
    for t in "direct:$pg_port" "pgbouncer:$pgb_port" "handoff:$ho_port"; do
        tps=$("$bin/pgbench" -n -S -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "${t#*:}" -U postgres postgres 2>/dev/null |
            awk '/^tps/ {print $3}')
        printf '%-6s %-10s %12.1f\n' "$r" "${t%%:*}" "$tps"
    done
done
