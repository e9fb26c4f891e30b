#!/usr/bin/env bash
# tidemark's main job end to end on the embedded default: a throwaway local PostgreSQL 15 archives
# its WAL into a file:// repository, tidemark takes a base backup, more rows are written, and the
# database is restored to a timestamp between two batches. The restored server must hold exactly the
# batches committed up to that timestamp. Run as root (servers run as the postgres user) or as a user
# that can run PostgreSQL itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
WORK=${TIDEMARK_DEMO_DIR:-/tmp/tidemark-demo}
PORT=${TIDEMARK_DEMO_PORT:-54329}
RPORT=$((PORT + 1))

if [ "$(id -u)" = 0 ]; then
  bash scripts/install-deps.sh
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi
[ -x "$PGBIN/initdb" ] || { echo "demo: PostgreSQL 15 not found in $PGBIN (set PGBIN)" >&2; exit 1; }

echo "== building tidemark"
cargo build --release -q -p tidemark-agent -p tidemark-restore
BIN=$WORK/bin
cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$WORK/restored" -m immediate stop >/dev/null 2>&1 || true
  as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$WORK"
mkdir -p "$BIN"
cp target/release/tidemark-agent target/release/tidemark-restore "$BIN/"
chmod 0755 "$WORK" "$BIN" "$BIN"/*
[ "$(id -u)" = 0 ] && chown -R postgres: "$WORK"
REPO="file://$WORK/repo"

echo "== a throwaway PostgreSQL archiving into $REPO"
as_pg "$PGBIN/initdb" -D "$WORK/data" --data-checksums -A trust -U postgres >/dev/null
cat >> "$WORK/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
archive_mode = on
archive_command = '$BIN/tidemark-agent wal-push --repo $REPO %p'
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/data" -l "$WORK/primary.log" -w start >/dev/null
sql() { as_pg "$PGBIN/psql" -h "$WORK" -p "$1" -U postgres -d postgres -qAtX -v ON_ERROR_STOP=1 -c "$2"; }

sql "$PORT" "CREATE TABLE orders (batch int, id int, note text)"
batch() {
  sql "$PORT" "INSERT INTO orders SELECT $1, g, md5(g::text) FROM generate_series(1, 1000) g"
  sleep 0.3
}
for b in 1 2 3; do batch $b; done
echo "== base backup (3 batches committed)"
as_pg env PGHOST="$WORK" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres \
  "$BIN/tidemark-agent" backup --pgdata "$WORK/data" --repo "$REPO"
for b in 4 5 6; do batch $b; done
TARGET=$(sql "$PORT" "SELECT clock_timestamp()")
sleep 0.3
for b in 7 8; do batch $b; done
sql "$PORT" "SELECT pg_switch_wal()" >/dev/null
# Wait until the segment holding batches 7-8 is archived, so recovery can see past the target.
for _ in $(seq 100); do
  [ "$(sql "$PORT" "SELECT last_archived_wal >= pg_walfile_name(pg_current_wal_lsn() - 1) FROM pg_stat_archiver")" = t ] && break
  sleep 0.2
done
echo "== repository"
"$BIN/tidemark-agent" info --repo "$REPO"

echo "== restore to $TARGET (after batch 6, before batch 7)"
as_pg "$BIN/tidemark-restore" restore --repo "$REPO" --pgdata "$WORK/restored" --target-time "$TARGET"
cat >> "$WORK/restored/postgresql.auto.conf" <<CONF
port = $RPORT
archive_mode = off
CONF
as_pg "$PGBIN/pg_ctl" -D "$WORK/restored" -l "$WORK/restored.log" -w -t 120 start >/dev/null
for _ in $(seq 300); do
  [ "$(sql "$RPORT" "SELECT pg_is_in_recovery()" 2>/dev/null)" = f ] && break
  sleep 0.2
done
GOT=$(sql "$RPORT" "SELECT string_agg(batch::text, ',' ORDER BY batch) FROM (SELECT DISTINCT batch FROM orders) b")
ROWS=$(sql "$RPORT" "SELECT count(*) FROM orders")
PROMOTED=$(sql "$RPORT" "SELECT NOT pg_is_in_recovery()")
echo "restored server holds batches $GOT ($ROWS rows), promoted: $PROMOTED"
if [ "$GOT" = "1,2,3,4,5,6" ] && [ "$ROWS" = 6000 ] && [ "$PROMOTED" = t ]; then
  echo "OK: the restore holds exactly the rows committed up to $TARGET"
else
  echo "FAIL: expected batches 1,2,3,4,5,6 (6000 rows) on a promoted server" >&2
  tail -20 "$WORK/restored.log" >&2
  exit 1
fi
