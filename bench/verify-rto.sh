#!/usr/bin/env bash
# Measures the RTO of a restore to a timestamp: tidemark-restore verify (prefetch on and off)
# against pgBackRest restore + PostgreSQL recovery to the same time, on one cluster, in one run.
# A pgbench database (SCALE) is backed up by both tools, then SEGMENTS WAL segments are archived by
# both (one archive_command runs both), and each tool restores to a time after the last of them.
# Needs root (PostgreSQL runs as postgres through runuser), PostgreSQL 15 and pgbackrest.
#   sudo SCALE=100 SEGMENTS=200 bench/verify-rto.sh
# GET_DELAY_MS=N adds N ms to every WAL GET of tidemark's wal-fetch (TIDEMARK_TEST_GET_DELAY_MS, a
# test knob) to see prefetch against an object store's latency; pgBackRest gets no such delay, so
# with it set only the two tidemark rows compare.
set -euo pipefail
SCALE=${SCALE:-100}
SEGMENTS=${SEGMENTS:-200}
GET_DELAY_MS=${GET_DELAY_MS:-}
W=${WORK:-/tmp/tidemark-rto}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${TIDEMARK_BIN:-${BIN:-$ROOT/target/debug}}  # directory of tidemark-agent / tidemark-restore
PORT=${PORT:-5499}
command -v pgbackrest >/dev/null || apt-get install -y -qq pgbackrest
[ -x "$BIN/tidemark-restore" ] || { echo "build first: cargo build -p tidemark-agent -p tidemark-restore (or set TIDEMARK_BIN)" >&2; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }
rm -rf "$W"; mkdir -p "$W/sock"; chown -R postgres: "$W"
PGBR="pgbackrest --config=$W/pgbackrest.conf --stanza=b"
cat >"$W/pgbackrest.conf" <<EOF
[global]
repo1-path=$W/pgbr
process-max=2
compress-type=zst
compress-level=1
log-level-console=warn
log-level-file=off
lock-path=$W/pgbr-lock
[b]
pg1-path=$W/data
pg1-socket-path=$W/sock
pg1-port=$PORT
EOF
chown postgres: "$W/pgbackrest.conf"
psql_() { as_pg "$PGBIN/psql" -X -q -At -h "$W/sock" -p "$PORT" -d postgres "$@"; }
as_pg "$PGBIN/initdb" --data-checksums --auth=trust -U postgres -D "$W/data" >/dev/null
cat >>"$W/data/postgresql.conf" <<EOF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$W/sock'
wal_level = replica
archive_mode = on
archive_command = '$BIN/tidemark-agent wal-push --repo file://$W/tm %p && $PGBR archive-push %p'
max_wal_size = 1GB
shared_buffers = 128MB
EOF
as_pg "$PGBIN/pg_ctl" start -w -D "$W/data" -l "$W/src.log" >/dev/null
as_pg $PGBR stanza-create
echo "rto: pgbench -i -s $SCALE"
as_pg "$PGBIN/pgbench" -q -i -s "$SCALE" -h "$W/sock" -p "$PORT" postgres 2>/dev/null
as_pg "$BIN/tidemark-agent" backup --pgdata "$W/data" --repo "file://$W/tm" --pg-url "host=$W/sock port=$PORT user=postgres dbname=postgres" >/dev/null
as_pg $PGBR backup --type=full
echo "rto: writing $SEGMENTS wal segments under pgbench load"
as_pg "$PGBIN/pgbench" -n -c 2 -T 100000 -h "$W/sock" -p "$PORT" postgres >/dev/null 2>&1 &
load=$!
first=$(psql_ -c "SELECT pg_walfile_name(pg_current_wal_lsn())")
for _ in $(seq "$SEGMENTS"); do psql_ -c "SELECT pg_switch_wal()" >/dev/null; sleep 0.2; done
kill "$load"; wait "$load" 2>/dev/null || true
sleep 1
TARGET=$(psql_ -c "SELECT clock_timestamp()")
sleep 1
psql_ -c "CREATE TABLE after_target AS SELECT 1 AS x" >/dev/null
last=$(psql_ -c "SELECT pg_walfile_name(pg_switch_wal())")
until [ "$(psql_ -c "SELECT last_archived_wal FROM pg_stat_archiver")" \> "$last" ] || [ "$(psql_ -c "SELECT last_archived_wal FROM pg_stat_archiver")" = "$last" ]; do sleep 1; done
as_pg "$PGBIN/pg_ctl" stop -w -m fast -D "$W/data" >/dev/null
echo "rto: target $TARGET, wal $first .. $last"
echo "| run | RTO s | restore s | recovery (start → promoted) s | wal files fetched |" >"$W/table.md"
echo "|---|---|---|---|---|" >>"$W/table.md"
for depth in 8 0; do
  sync; echo 3 >/proc/sys/vm/drop_caches || true
  env ${GET_DELAY_MS:+TIDEMARK_TEST_GET_DELAY_MS=$GET_DELAY_MS} TIDEMARK_PREFETCH=$depth "$BIN/tidemark-restore" verify --repo "file://$W/tm" --target-time "$TARGET" \
    --run-as postgres --pg-bin "$PGBIN" --scratch "$W/verify-$depth" --no-amcheck --port $((PORT + 1)) >"$W/verify-$depth.json" || true
  python3 - "$W/verify-$depth.json" "$depth" >>"$W/table.md" <<'PY'
import json, sys
v = json.load(open(sys.argv[1])); s = v["seconds"]
label = f"tidemark verify, prefetch {sys.argv[2]}" + ("" if v["ok"] else f" (FAILED: {v['failure']})")
print(f"| {label} | {s['rto']:.1f} | {s['restore']:.1f} | {s['promote']:.1f} | {v['wal_files_fetched']} |")
PY
done
sync; echo 3 >/proc/sys/vm/drop_caches || true
mkdir -p "$W/pgbr-restore"; chown postgres: "$W/pgbr-restore"; chmod 700 "$W/pgbr-restore"
t0=$(date +%s.%N)
as_pg $PGBR restore --pg1-path="$W/pgbr-restore" --type=time "--target=$TARGET" --target-action=promote
t1=$(date +%s.%N)
cat >>"$W/pgbr-restore/postgresql.auto.conf" <<EOF
port = $((PORT + 2))
archive_mode = off
EOF
as_pg "$PGBIN/pg_ctl" start -D "$W/pgbr-restore" -l "$W/pgbr-restore.log" >/dev/null
until [ "$(as_pg "$PGBIN/psql" -X -At -h "$W/sock" -p $((PORT + 2)) -d postgres -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do sleep 0.2; done
t2=$(date +%s.%N)
fetched=$(grep -c "restored log file" "$W/pgbr-restore.log" || true)
as_pg "$PGBIN/pg_ctl" stop -w -m fast -D "$W/pgbr-restore" >/dev/null
python3 -c "t0,t1,t2=$t0,$t1,$t2; print(f'| pgBackRest restore + recovery (archive-get, no async) | {t2-t0:.1f} | {t1-t0:.1f} | {t2-t1:.1f} | $fetched |')" >>"$W/table.md"
echo; echo "SCALE=$SCALE, $SEGMENTS segments switched under pgbench load, target $TARGET, file:// / posix repositories on the same disk${GET_DELAY_MS:+, tidemark WAL GETs delayed by ${GET_DELAY_MS} ms (pgBackRest not)}; tidemark ${TIDEMARK_COMMIT:-$(cd "$ROOT" && git rev-parse --short HEAD)} (binaries from $BIN)"
cat "$W/table.md"
[ "${KEEP:-0}" = 1 ] || rm -rf "$W"
