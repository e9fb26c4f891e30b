#!/usr/bin/env bash
# Cost of expire + garbage collection on a repository of N nightly-style backups of a pgbench
# database: each "night" runs pgbench for a few seconds, then a backup. Then one expire that keeps
# the last KEEP backups is timed (wall time, peak RSS via /usr/bin/time -v), and its plan gives the
# objects listed, read and deleted (requests = lists + 2 reads per manifest + deletes + lease ops).
#
# Environment: SCALE=5 (pgbench scale), BACKUPS=30, KEEP=7, TPS_SECONDS=3, WORK=/tmp/tidemark-gc,
# BIN=target/debug (tidemark binaries), PGBIN=/usr/lib/postgresql/15/bin. Runs PostgreSQL as the
# postgres user when started as root. Leaves nothing running; removes $WORK unless KEEP_WORK=1.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-5}; BACKUPS=${BACKUPS:-30}; KEEP=${KEEP:-7}; TPS_SECONDS=${TPS_SECONDS:-3}
WORK=${WORK:-/tmp/tidemark-gc}; BIN=$(cd "${BIN:-$SRC/target/debug}" && pwd)
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}; PORT=${PORT:-55499}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
rm -rf "$WORK"; mkdir -p "$WORK/repo" "$WORK/sock"
[ "$(id -u)" = 0 ] && chown -R postgres "$WORK"
REPO="file://$WORK/repo"; DATA="$WORK/data"
as_pg "$PGBIN/initdb" --data-checksums --auth=trust -U postgres -D "$DATA" >/dev/null
cat >>"$DATA/postgresql.conf" <<CONF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$WORK/sock'
archive_mode = on
archive_command = '$BIN/tidemark-agent wal-push --repo $REPO %p'
fsync = off
max_wal_size = 256MB
CONF
cleanup() { as_pg "$PGBIN/pg_ctl" stop -m immediate -D "$DATA" >/dev/null 2>&1 || true; [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"; }
trap cleanup EXIT
as_pg "$PGBIN/pg_ctl" start -w -D "$DATA" -l "$WORK/server.log" >/dev/null
export PGHOST="$WORK/sock" PGPORT=$PORT PGUSER=postgres
as_pg env PGHOST="$PGHOST" PGPORT=$PORT "$PGBIN/pgbench" -q -i -s "$SCALE" postgres >/dev/null 2>&1
for i in $(seq 1 "$BACKUPS"); do
  as_pg env PGHOST="$PGHOST" PGPORT=$PORT "$PGBIN/pgbench" -n -T "$TPS_SECONDS" -c 2 postgres >/dev/null 2>&1
  as_pg env PGHOST="$PGHOST" PGPORT=$PORT PGUSER=postgres "$BIN/tidemark-agent" backup --repo "$REPO" --pgdata "$DATA" --archive-timeout 120 --json >/dev/null
done
as_pg env PGHOST="$PGHOST" PGPORT=$PORT "$PGBIN/psql" -qAtc "SELECT pg_switch_wal()" postgres >/dev/null
sleep 2
before=$(du -sb "$WORK/repo" | cut -f1)
as_pg "$BIN/tidemark-agent" info --repo "$REPO" --json >"$WORK/info.json"
/usr/bin/time -v -o "$WORK/time.txt" runuser -u postgres -- "$BIN/tidemark-agent" expire --repo "$REPO" \
  --retain-last "$KEEP" --gc-grace 0s --json >"$WORK/plan.json"
after=$(du -sb "$WORK/repo" | cut -f1)
python3 - "$WORK" "$before" "$after" <<'PY'
import json, sys, re
work, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
plan = json.load(open(f"{work}/plan.json")); info = json.load(open(f"{work}/info.json"))
t = open(f"{work}/time.txt").read()
wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
n = len(plan["backups"]); removed = sum(1 for b in plan["backups"] if b["action"] == "remove")
deletes = removed + len(plan["packs"]["delete"]) + len(plan["wal"]["delete"]) + len(plan["stale_leases"])
lists = 5  # locks, backups, packs, gc, wal (one page each below 1000 keys)
reads = 2 * n  # header prefix + full manifest per backup
lease = 4  # put, list, head before deletes, delete
print(f"backups {n}, removed {removed}; repository {before/2**20:.1f} MiB -> {after/2**20:.1f} MiB "
      f"(packs {info['space']['packs']}, dedup ratio {info['space']['dedup_ratio']:.2f}); "
      f"expire wall {wall}, peak RSS {rss/1024:.1f} MiB; requests ~{lists + reads + deletes + lease} "
      f"({lists} lists, {reads} manifest reads, {deletes} deletes: {removed} manifests, "
      f"{len(plan['packs']['delete'])} packs, {len(plan['wal']['delete'])} WAL objects)")
PY
