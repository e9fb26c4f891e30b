#!/usr/bin/env bash
# Cost of expire + garbage collection on a repository of N nightly-style backups of a pgbench
# database: each "night" runs pgbench for a few seconds, then a backup. Then one expire that keeps
# the last KEEP backups is timed (wall time, peak RSS via /usr/bin/time -v), and its plan gives the
# objects listed, read and deleted (requests = lists + 2 reads per manifest + deletes + lease ops).
#
# Environment: SCALE=5 (pgbench scale), BACKUPS=30, KEEP=7, TPS_SECONDS=3, WORK=/tmp/tidemark-gc,
# BIN=target/debug (tidemark binaries; TIDEMARK_BIN is accepted too), PGBIN=/usr/lib/postgresql/15/bin.
# COUNT_REQUESTS=1 (needs strace): the same expire also runs under strace on a hard-linked copy of
# the repository taken just before the timed one, and the file-system operations on the repository
# are counted as the requests they stand for on an object store: file opens for reading = GET,
# link() of a finished temp file = PUT, unlink() = DELETE, stat of a key = HEAD, directory reads =
# LIST (per directory; an object store lists a prefix in pages of 1,000 keys instead).
# Runs PostgreSQL as the postgres user when started as root. Leaves nothing running; removes
# $WORK unless KEEP_WORK=1.
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCALE=${SCALE:-5}; BACKUPS=${BACKUPS:-30}; KEEP=${KEEP:-7}; TPS_SECONDS=${TPS_SECONDS:-3}
WORK=${WORK:-/tmp/tidemark-gc}; BIN=$(cd "${BIN:-${TIDEMARK_BIN:-$SRC/target/debug}}" && pwd)
COUNT_REQUESTS=${COUNT_REQUESTS:-1}
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
objects=$(find "$WORK/repo" -type f | wc -l)
if [ "$COUNT_REQUESTS" = 1 ]; then cp -al "$WORK/repo" "$WORK/repo-strace"; fi
sync
# Two passes, as a nightly schedule runs them: pass 1 removes the expired manifests and WAL,
# condemns the packs nothing references any more and repacks mostly-garbage packs (condemning the
# originals); pass 2 (grace 0s here) deletes the condemned packs.
count_requests() {  # strace log, repository root -> "GET n, PUT n, ..."
  python3 - "$1" "$2" <<'PY'
import re, sys
path, root = sys.argv[1], sys.argv[2]
c = {"GET": 0, "PUT": 0, "DELETE": 0, "HEAD": 0, "LIST (directories read)": 0}
for line in open(path):
    m = re.match(r"(\d+)\s+(\w+)\((.*)\)\s+=\s+(-?\d+)", line)
    if not m:
        continue
    call, args, rc = m.group(2), m.group(3), int(m.group(4))
    under = [p for p in re.findall(r'"([^"]*)"', args) if p.startswith(root)]
    if not under:
        continue
    if call == "openat" and rc >= 0:
        if "O_DIRECTORY" in args:
            c["LIST (directories read)"] += 1
        elif "O_CREAT" not in args:
            c["GET"] += 1
    elif call in ("link", "linkat") and rc == 0:
        c["PUT"] += 1
    elif call in ("unlink", "unlinkat") and rc == 0 and "/.tmp." not in under[-1]:
        c["DELETE"] += 1
    elif call in ("statx", "newfstatat") and "AT_FDCWD" in args:
        c["HEAD"] += 1
print(", ".join(f"{k} {v}" for k, v in c.items()) + f"; total {sum(c.values())}")
PY
}
for pass in 1 2; do
  /usr/bin/time -v -o "$WORK/time-$pass.txt" runuser -u postgres -- "$BIN/tidemark-agent" expire --repo "$REPO" \
    --retain-last "$KEEP" --gc-grace 0s --json >"$WORK/plan-$pass.json"
  du -sb "$WORK/repo" | cut -f1 >"$WORK/size-$pass"
  if [ "$COUNT_REQUESTS" = 1 ]; then
    strace -f -qq -o "$WORK/strace-$pass.txt" -e trace=openat,link,linkat,unlink,unlinkat,statx,newfstatat,getdents64 \
      runuser -u postgres -- "$BIN/tidemark-agent" expire --repo "file://$WORK/repo-strace" \
      --retain-last "$KEEP" --gc-grace 0s --json >"$WORK/plan-strace-$pass.json"
    count_requests "$WORK/strace-$pass.txt" "$WORK/repo-strace" >"$WORK/requests-$pass.txt"
  fi
done
python3 - "$WORK" "$before" "$objects" <<'PY'
import json, os, sys, re
work, before, objects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
info = json.load(open(f"{work}/info.json"))
print(f"repository before: {before/2**20:.1f} MiB, {objects} objects (packs {info['space']['packs']}, "
      f"dedup ratio {info['space']['dedup_ratio']:.2f})")
for p in (1, 2):
    plan = json.load(open(f"{work}/plan-{p}.json"))
    after = int(open(f"{work}/size-{p}").read())
    t = open(f"{work}/time-{p}.txt").read()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", t).group(1)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
    n = len(plan["backups"]); removed = sum(1 for b in plan["backups"] if b["action"] == "remove")
    pk = plan["packs"]
    deletes = removed + len(pk["delete"]) + len(plan["wal"]["delete"]) + len(plan["stale_leases"])
    lists = 5  # locks, backups, packs, gc, wal (one page each below 1000 keys)
    reads = 2 * n  # header prefix + full manifest per backup
    lease = 4  # put, list, head before deletes, delete
    print(f"pass {p}: backups {n}, removed {removed}; packs total {pk['total']}, referenced {pk['referenced']}, "
          f"condemned {len(pk['condemn'])}, deleted {len(pk['delete'])} ({pk['delete_bytes']/2**20:.1f} MiB), waiting {pk['waiting']}; "
          f"WAL deleted {len(plan['wal']['delete'])} ({plan['wal']['delete_bytes']/2**20:.1f} MiB); "
          f"repository -> {after/2**20:.1f} MiB; wall {wall}, peak RSS {rss/1024:.1f} MiB; "
          f"requests derived from the plan ~{lists + reads + deletes + lease} "
          f"({lists} lists, {reads} manifest reads, {deletes} deletes)")
    rp = plan.get("repack", {})
    if rp.get("packs") or rp.get("over_budget"):
        print(f"pass {p} repack: {len(rp['packs'])} mostly-garbage packs, {rp['live_bytes']/2**20:.1f} MiB live copied, "
              f"{len(rp['rewrite_manifests'])} manifests relocated, {rp['reclaim_bytes']/2**20:.1f} MiB freed after the grace period, "
              f"{rp['over_budget']} packs left over the budget")
    if os.path.exists(f"{work}/requests-{p}.txt"):
        print(f"pass {p} counted (strace of the same expire on a hard-linked copy): " + open(f"{work}/requests-{p}.txt").read().strip())
PY
