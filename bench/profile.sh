#!/usr/bin/env bash
# CPU profile of tidemark's full backup and restore on the bench's realistic dataset, grouped by
# pipeline stage (issue 16: "the profile that shows where the time goes"), plus this machine's
# raw speeds for the same work (the hardware limit).
#
# Needs a dataset left by `KEEP=1 bench/run.sh` ($D = $WORK/<dataset>: pgdata/, sock/,
# repo-tidemark-z1/ holding the bench's full and nightly backups). Run as root:
#
#   sudo D=/tmp/tidemark-bench-prof/realistic BIN=/work/target-prof/release bench/profile.sh
#
# BIN: tidemark-agent and tidemark-restore built with symbols and debug info, e.g.
#   CARGO_TARGET_DIR=/work/target-prof CARGO_PROFILE_RELEASE_DEBUG=true \
#     cargo build --release -p tidemark-agent -p tidemark-restore
#
# What it does:
#   1. starts $D/pgdata (PORT, socket $D/sock), points archive_command at two fresh tidemark
#      repositories (prof-a, prof-b) only, switches WAL so both exist;
#   2. full backup into prof-a under /usr/bin/time (CPU s without perf), then the same into
#      prof-b under `perf record --call-graph dwarf` (page cache dropped before each);
#   3. restore of repo-tidemark-z1's newest backup (the bench's nightly: what the bench's restore
#      step times) into a fresh directory, once under /usr/bin/time, once under perf;
#   4. perfstages.py groups the samples by stage; CPU s per stage = share x CPU s measured
#      without perf;
#   5. raw speeds: cold sequential read of the data directory, sha256 (openssl, 8 KiB blocks),
#      zstd -1 on 8 KiB blocks of pgbench_accounts (zstd -b), write + fsync of 600 MiB.
# Output (Markdown) on stdout and in $OUT/profile.md; perf data in $OUT (deleted unless KEEP=1).
#
# Environment: D (required), BIN (/work/target-prof/release), OUT ($D/profile), FREQ (perf
# sampling Hz, 499), PORT (55432, as run.sh), DWARF_STACK (16384 bytes copied per sample),
# LIMITS (1: also measure the raw speeds), KEEP (0).
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=${D:?set D to a dataset directory left by KEEP=1 bench/run.sh}
BIN=${BIN:-/work/target-prof/release}
OUT=${OUT:-$D/profile}
FREQ=${FREQ:-499}
PORT=${PORT:-55432}
DWARF_STACK=${DWARF_STACK:-16384}
LIMITS=${LIMITS:-1}
KEEP=${KEEP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}

[[ $(id -u) == 0 ]] || { echo "profile.sh: run as root" >&2; exit 2; }
command -v perf >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
log() { printf '%s [profile] %s\n' "$(date +%T)" "$*" >&2; }
as_pg() { runuser -u postgres -- "$@"; }
sql() { as_pg "$PGBIN/psql" -h "$D/sock" -p "$PORT" -U postgres -d postgres -X -q -At -v ON_ERROR_STOP=1 -c "$1"; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
cpu_of() { awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} /Elapsed/ {e=$2} END {printf "%.2f %.2f %s\n", u+s, u, e}' "$1"; }

mkdir -p "$OUT"
chmod 0755 "$OUT"
chown postgres: "$OUT"
install -m 0755 "$BIN/tidemark-agent" "$BIN/tidemark-restore" "$OUT/"
A=$OUT/tidemark-agent
R=$OUT/tidemark-restore

stop() { [[ -f $D/pgdata/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$D/pgdata" -m fast -w stop >/dev/null || true; }
cleanup() {
  local rc=$?
  stop
  for r in "$OUT"/restore-*; do [[ -d $r ]] && rm -rf "$r"; done
  exit $rc
}
trap cleanup EXIT

log "starting $D/pgdata"
as_pg "$PGBIN/pg_ctl" -D "$D/pgdata" -l "$OUT/postgresql.log" -w -t 600 start >/dev/null
rm -rf "$OUT/repo-prof-a" "$OUT/repo-prof-b"
install -d -m 0700 -o postgres -g postgres "$OUT/repo-prof-a" "$OUT/repo-prof-b"
push() { echo "$A wal-push --repo file://$OUT/repo-prof-$1 --compress-level 1 %p"; }
sql "ALTER SYSTEM SET archive_command = '$(push a) && $(push b)'"
sql "SELECT pg_reload_conf()" >/dev/null
seg=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
for _ in $(seq 600); do
  [[ $(sql "SELECT coalesce(last_archived_wal >= '$seg', false) FROM pg_stat_archiver") == t ]] && break
  sleep 0.2
done

backup() { # $1 = repo letter; the rest: the wrapper (time or perf)
  local r=$1
  shift
  "$@" runuser -u postgres -- env PGHOST="$D/sock" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres \
    "$A" backup --pgdata "$D/pgdata" --repo "file://$OUT/repo-prof-$r" --compress-level 1 --json >"$OUT/backup-$r.json"
}
restore() { # $1 = name; the rest: the wrapper
  local n=$1
  shift
  rm -rf "$OUT/restore-$n"
  install -d -m 0700 -o postgres -g postgres "$OUT/restore-$n"
  "$@" runuser -u postgres -- "$R" restore --pgdata "$OUT/restore-$n" --repo "file://$D/repo-tidemark-z1" \
    --target latest --json >"$OUT/restore-$n.json"
  rm -rf "$OUT/restore-$n"
}
PERF=(perf record -q -F "$FREQ" --call-graph "dwarf,$DWARF_STACK" -o)

log "full backup without perf"
drop
backup a /usr/bin/time -v -o "$OUT/backup-time.txt"
log "full backup under perf"
drop
backup b "${PERF[@]}" "$OUT/backup.perf.data" --
stop
log "restore without perf"
drop
restore a /usr/bin/time -v -o "$OUT/restore-time.txt"
log "restore under perf"
drop
restore b "${PERF[@]}" "$OUT/restore.perf.data" --

read -r bcpu bu bwall < <(cpu_of "$OUT/backup-time.txt")
read -r rcpu ru rwall < <(cpu_of "$OUT/restore-time.txt")
stages() { # $1 = kind, $2 = perf data, $3 = CPU s
  perf script -i "$2" --no-inline -F comm,tid,period,ip,sym,dso 2>/dev/null | python3 "$BENCH/perfstages.py" "$1" "$3"
}
{
  echo "#### Full backup (tidemark-agent backup --pgdata, zstd 1, fresh repository)"
  echo
  echo "Without perf: wall $bwall, CPU $bcpu s (user $bu s). Under perf (-F $FREQ, dwarf call graphs):"
  echo
  stages backup "$OUT/backup.perf.data" "$bcpu"
  echo
  echo "#### Restore (tidemark-restore restore --target latest of the bench's nightly)"
  echo
  echo "Without perf: wall $rwall, CPU $rcpu s (user $ru s). Under perf:"
  echo
  stages restore "$OUT/restore.perf.data" "$rcpu"
  echo
} >"$OUT/profile.md"

if [[ $LIMITS == 1 ]]; then
  log "raw speeds"
  acc=$(find "$D/pgdata/base" -type f -printf '%s %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
  drop
  t0=$(date +%s.%N)
  find "$D/pgdata" -path "$D/pgdata/pg_wal" -prune -o -type f -print0 | xargs -0 cat >/dev/null
  t1=$(date +%s.%N)
  bytes=$(du -sb --exclude=pg_wal "$D/pgdata" | cut -f1)
  sha=$(openssl speed -seconds 3 -bytes 8192 -evp sha256 2>/dev/null | awk '/^sha256/ {print $2}')
  z=$(zstd -b1 -B8192 -T1 -i3 "$acc" 2>&1 | tr '\r' '\n' | grep -E '^ *1#' | tail -n 1)
  zw=$(zstd -b1 -T1 -i3 "$acc" 2>&1 | tr '\r' '\n' | grep -E '^ *1#' | tail -n 1)
  t2=$(date +%s.%N)
  dd if=/dev/zero of="$OUT/ddtest" bs=1M count=600 conv=fsync status=none
  t3=$(date +%s.%N)
  rm -f "$OUT/ddtest"
  python3 - "$t0" "$t1" "$bytes" "$sha" "$z" "$zw" "$t2" "$t3" "${acc#$D/pgdata/}" <<'EOF' >>"$OUT/profile.md"
import sys
t0, t1, b, sha, z, zw, t2, t3 = sys.argv[1:9]
rd = float(t1) - float(t0)
print("#### Raw speeds on this machine (same minute, shared machine)")
print()
print(f"- cold read of the data directory (find | xargs cat, page cache dropped): {int(b) / 2**20:,.0f} MiB in {rd:.2f} s = {int(b) / 2**20 / rd:,.0f} MiB/s")
print(f"- sha256, openssl speed -evp sha256 -bytes 8192, one core: {sha} (1000s of bytes per second)")
print(f"- zstd -1 on 8 KiB blocks of the largest relation segment ({sys.argv[9]}), one core (zstd -b1 -B8192 -T1): `{z.strip()}`")
print(f"- zstd -1 whole file, one core (zstd -b1 -T1): `{zw.strip()}`")
print(f"- write + fsync of 600 MiB (dd conv=fsync): {float(t3) - float(t2):.2f} s")
EOF
fi
cat "$OUT/profile.md"
if [[ $KEEP != 1 ]]; then
  rm -rf "$OUT/repo-prof-a" "$OUT/repo-prof-b" "$OUT"/*.perf.data
fi
