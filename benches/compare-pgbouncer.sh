#!/usr/bin/env bash
# Direct vs PgBouncer vs handoff on one PostgreSQL server, same pgbench runs, same machine.
# For each proxy run it also reports the proxy's CPU time per transaction: the user +
# system time of its process (all threads, /proc/<pid>/stat) over the run, divided by the
# transactions pgbench completed, and how much of it is system (kernel) time. Installs pgbouncer with apt-get when it is missing (as
# root); runs PostgreSQL and PgBouncer as the postgres user when root.
#
# Usage: benches/compare-pgbouncer.sh [seconds] [rounds]
# Environment: POOL_MODE (transaction|session, default transaction), CLIENTS (64),
#              QUERY_MODES ("simple extended prepared"), POOL_SIZE (20),
#              BASELINE (another handoff binary, e.g. an earlier build: measured as a
#              fourth target, "baseline", in the same rounds)
set -euo pipefail
secs=${1:-10}
rounds=${2:-1}
pool_mode=${POOL_MODE:-transaction}
clients=${CLIENTS:-64}
query_modes=${QUERY_MODES:-simple extended prepared}
pool_size=${POOL_SIZE:-20}
baseline=${BASELINE:-}
top=$(cd "$(dirname "$0")/.." && pwd)
bin=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    [ "$(id -u)" -eq 0 ] || { echo "pgbouncer is not installed" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends pgbouncer >/dev/null
fi
pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
work=$(mktemp -d /tmp/handoff-compare-XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(port); pgb_port=$(port); ho_port=$(port); admin_port=$(port)
base_port=$(port); base_admin_port=$(port)

cargo build --release -q -p handoff --manifest-path "$top/Cargo.toml"
as_pg "$bin/initdb" -D "$work/data" -U postgres -A trust --no-sync >/dev/null
cat >>"$work/data/postgresql.conf" <<CONF
listen_addresses='127.0.0.1'
port=$pg_port
unix_socket_directories='$work'
fsync=off
max_connections=200
shared_buffers=32MB
CONF
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w start >/dev/null
cleanup() {
    # runuser does not pass the signal on: PgBouncer itself is killed too.
    kill "${pgb_cpu_pid:-}" "${pgb_pid:-}" "${ho_pid:-}" "${base_pid:-}" 2>/dev/null || true
    as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
"$bin/pgbench" -i -q -s 10 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1
ulimit -n 10000 2>/dev/null || true
cat >"$work/pgbouncer.ini" <<INI
[databases]
* = host=127.0.0.1 port=$pg_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $pgb_port
auth_type = trust
auth_file = $work/users.txt
pool_mode = $pool_mode
max_client_conn = 1000
default_pool_size = $pool_size
unix_socket_dir =
logfile = $work/pgbouncer.log
INI
echo '"postgres" ""' >"$work/users.txt"
[ "$(id -u)" -eq 0 ] && chown postgres "$work"/*
as_pg "$pgbouncer" "$work/pgbouncer.ini" >/dev/null 2>&1 &
pgb_pid=$!
# handoff refuses HANDOFF_* variables it does not know: it gets only what is set here.
unset_handoff=()
while IFS='=' read -r name _; do
    case "$name" in HANDOFF_*) unset_handoff+=(-u "$name") ;; esac
done < <(env)
env "${unset_handoff[@]}" HANDOFF_SHARDS="main=127.0.0.1:$pg_port" HANDOFF_LISTEN="127.0.0.1:$ho_port" \
    HANDOFF_ADMIN_LISTEN="127.0.0.1:$admin_port" HANDOFF_POOL_MODE="$pool_mode" \
    HANDOFF_POOL_SIZE="$pool_size" HANDOFF_LOG=warn "$top/target/release/handoff" &
ho_pid=$!
targets=()
if [ -n "$baseline" ]; then
    env "${unset_handoff[@]}" HANDOFF_SHARDS="main=127.0.0.1:$pg_port" HANDOFF_LISTEN="127.0.0.1:$base_port" \
        HANDOFF_ADMIN_LISTEN="127.0.0.1:$base_admin_port" HANDOFF_POOL_MODE="$pool_mode" \
        HANDOFF_POOL_SIZE="$pool_size" HANDOFF_LOG=warn "$baseline" &
    base_pid=$!
    targets=("baseline:$base_port:$base_pid")
fi
sleep 1
kill -0 "$ho_pid" 2>/dev/null || { echo "compare-pgbouncer: handoff exited at startup" >&2; exit 1; }
if [ -n "$baseline" ] && ! kill -0 "$base_pid" 2>/dev/null; then
    echo "compare-pgbouncer: the baseline ($baseline) exited at startup" >&2; exit 1
fi
# runuser stays as PgBouncer's parent: its own pid is the newest pgbouncer process.
pgb_cpu_pid=$(pgrep -n -x pgbouncer || echo "$pgb_pid")
tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
sys_ticks() { awk '{print $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
echo "pgbench -S -c $clients -j 2 -T $secs, pool mode $pool_mode, pool size $pool_size"
printf '%-6s %-9s %-10s %12s %8s %8s %12s %12s\n' round mode target tps failed aborted 'cpu us/txn' 'of it sys'
for r in $(seq "$rounds"); do
    for qm in $query_modes; do
        for t in "direct:$pg_port:" "pgbouncer:$pgb_port:$pgb_cpu_pid" "handoff:$ho_port:$ho_pid" "${targets[@]}"; do
            IFS=: read -r name tport tpid <<<"$t"
            before=0; sys_before=0
            [ -n "$tpid" ] && before=$(cpu_ticks "$tpid") && sys_before=$(sys_ticks "$tpid")
            out=$("$bin/pgbench" -n -S -M "$qm" -c "$clients" -j 2 -T "$secs" \
                -h 127.0.0.1 -p "$tport" -U postgres postgres 2>&1 || true)
            cpu=-; sys=-
            txns=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' <<<"$out")
            if [ -n "$tpid" ] && [ "${txns:-0}" -gt 0 ]; then
                after=$(cpu_ticks "$tpid")
                cpu=$(awk -v d="$((after - before))" -v t="$tck" -v n="$txns" 'BEGIN {printf "%.1f", d * 1e6 / t / n}')
                sys_after=$(sys_ticks "$tpid")
                sys=$(awk -v d="$((sys_after - sys_before))" -v t="$tck" -v n="$txns" 'BEGIN {printf "%.1f", d * 1e6 / t / n}')
            fi
            tps=$(awk '/^tps/ {print $3}' <<<"$out")
            failed=$(awk -F': ' '/number of failed transactions/ {split($2, a, " "); print a[1]}' <<<"$out")
            aborted=$(grep -c 'aborted in command' <<<"$out" || true)
            [ -z "$tps" ] && tps=0
            printf '%-6s %-9s %-10s %12.1f %8s %8s %12s %12s\n' "$r" "$qm" "$name" "$tps" "${failed:-?}" "$aborted" "$cpu" "$sys"
        done
    done
done
