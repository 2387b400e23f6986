#!/usr/bin/env bash
# Two builds of handoff side by side: both in front of one PostgreSQL at once, loaded one
# after the other in the same `handoff-bench run`, the order swapped every round (the
# first target of a run warms the cache and the page table for the second). Prints one
# summary row per target and round, then each round's B/A ratio and their mean.
#
# Usage: benches/ab-builds.sh A_BINARY B_BINARY
# Environment: WORKLOAD (select|tpcb|prepared|mixed, default select), ROUNDS (6),
#              CLIENTS (64), DURATION (10s), BENCH (target/release/handoff-bench)
# Runs PostgreSQL as the postgres user when root; everything it starts is stopped and
# its directory removed on exit.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,9p' "$0" >&2; exit 2; }
a_bin=$(readlink -f "$1"); b_bin=$(readlink -f "$2")
top=$(cd "$(dirname "$0")/.." && pwd)
bench=${BENCH:-$top/target/release/handoff-bench}
workload=${WORKLOAD:-select}; rounds=${ROUNDS:-6}; clients=${CLIENTS:-64}; duration=${DURATION:-10s}
bin=$(dirname "$(readlink -f "$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb | tail -1)")")
work=$(mktemp -d /tmp/handoff-ab-XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres "$work"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pg_port=$(port); a_port=$(port); b_port=$(port); a_admin=$(port); b_admin=$(port)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    as_pg "$bin/pg_ctl" -D "$work/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
as_pg "$bin/initdb" -A trust -U postgres -D "$work/data" >/dev/null
as_pg "$bin/pg_ctl" -D "$work/data" -l "$work/pg.log" -w -o "-p $pg_port -k $work \
    -c listen_addresses=127.0.0.1 -c max_connections=200 -c shared_buffers=256MB" start >/dev/null
start() { # binary, port, admin port: only the variables set here (handoff refuses unknown HANDOFF_*)
    env -i PATH="$PATH" HANDOFF_SHARDS="main=127.0.0.1:$pg_port" HANDOFF_LISTEN="127.0.0.1:$2" \
        HANDOFF_ADMIN_LISTEN="127.0.0.1:$3" "$1" >"$work/handoff-$2.log" 2>&1 &
    pids+=($!)
}
start "$a_bin" "$a_port" "$a_admin"
start "$b_bin" "$b_port" "$b_admin"
sleep 1
a="A=postgres://postgres@127.0.0.1:$a_port/postgres"
b="B=postgres://postgres@127.0.0.1:$b_port/postgres"
echo "A: $a_bin"; echo "B: $b_bin"; echo "$workload, $clients clients, $duration per target, $rounds rounds"
out="$work/rows"
for i in $(seq 1 "$rounds"); do
    if (( i % 2 )); then first=$b; second=$a; else first=$a; second=$b; fi
    "$bench" run --workload "$workload" --clients "$clients" --duration "$duration" \
        --target "$first" --target "$second" --out "$work/results" 2>&1 \
        | grep -E '^(A|B) +[0-9]' | sed "s/^/round $i  /" | tee -a "$out"
done
awk '{ tps[$2, $3] = $4 }
     END {
       for (r = 1; ((r, "A") in tps) && ((r, "B") in tps); r++) {
         ratio = tps[r, "B"] / tps[r, "A"]; sum += ratio; n++
         printf "round %d  B/A %.3f\n", r, ratio
       }
       if (n) printf "mean B/A %.3f over %d rounds\n", sum / n, n
     }' "$out"
