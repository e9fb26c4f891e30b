#!/usr/bin/env bash
# WAL archiving benchmark: tidemark (wal-push alone, and wal-push handing off to the sidecar)
# against pgBackRest 2.45 archive-push (sync, and async with process-max=2), same compression
# (zstd level 1), same machine, same WAL, one run. PostgreSQL itself drives every variant through
# its archive_command, as in production.
#
# Two measurements per variant:
#   drain  N segments of pgbench WAL left .ready (a backlog, e.g. after an object-store outage)
#          are archived from a restart of PostgreSQL: segments per second until the last is done.
#   load   pgbench (2 clients, each transaction updating a range of 2,000 accounts: a heavy WAL
#          writer) runs for LOAD_SECONDS while archiving runs; sampled every 0.5 s: how many
#          finished segments wait for the archiver (lag), and at the end how long until caught up.
# Also the sidecar's peak RSS during the drain (memory bound under a backlog), and the busy CPU of the
# whole machine per segment during the drain (the tool, PostgreSQL's archiver, archive_command).
#
# Environment: N=128 segments in the backlog, LOAD_SECONDS=40, SCALE=20 (pgbench scale for the
# write load), WORK=/tmp/tidemark-archive-bench, PORT=55442, BUILD=1 (cargo build --release first),
# DRAIN_ROUNDS=1 (more: extra drains of tidemark-sidecar and pgbackrest-async, order alternating,
# reported as median [min–max]), TIDEMARK_BIN=dir (prebuilt tidemark-agent instead of the tree's; no build; TIDEMARK_COMMIT names it),
# RESULTS=bench/results.md ("" = don't append).
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$BENCH/.." && pwd)
N=${N:-128}
LOAD_SECONDS=${LOAD_SECONDS:-40}
SCALE=${SCALE:-20}
WORK=${WORK:-/tmp/tidemark-archive-bench}
PORT=${PORT:-55442}
BUILD=${BUILD:-1}
TIDEMARK_BIN=${TIDEMARK_BIN:-}
DRAIN_ROUNDS=${DRAIN_ROUNDS:-1}
[[ -z $TIDEMARK_BIN ]] || BUILD=0
RESULTS=${RESULTS-$BENCH/results.md}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
D=$WORK
VARIANTS=(tidemark-push tidemark-sidecar pgbackrest-sync pgbackrest-async)

[[ $(id -u) == 0 ]] || { echo "archive.sh: run as root (servers run as postgres via runuser)" >&2; exit 2; }
log() { printf '%s [archive-bench] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
as_pg() { runuser -u postgres -- "$@"; }
sql() { as_pg "$PGBIN/psql" -h "$D/sock" -p "$PORT" -U postgres -d postgres -X -q -At -v ON_ERROR_STOP=1 -c "$1"; }
now() { date +%s.%N; }
# Busy CPU seconds of the whole machine so far (/proc/stat: user, nice, system, irq, softirq;
# not idle, iowait, or steal: time the hypervisor gave to other guests).
busy() { awk '/^cpu / {print ($2 + $3 + $4 + $7 + $8) / 100}' /proc/stat; }
stolen() { awk '/^cpu / {print $9 / 100}' /proc/stat; }
calc() { python3 -c "print($1)"; }

command -v pgbackrest >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest >/dev/null; }
[[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 not found at $PGBIN"
if [[ $BUILD == 1 ]]; then
  log "building tidemark (release)"
  (cd "$SRC" && cargo build --release -q -p tidemark-agent -p tidemark-restore)
fi
stop_pg() { [[ -f $D/pgdata/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$D/pgdata" -m fast -w -t 600 stop >/dev/null || true; }
SIDECAR_PID=
cleanup() {
  [[ -n $SIDECAR_PID ]] && kill "$SIDECAR_PID" 2>/dev/null || true
  stop_pg
}
trap cleanup EXIT
stop_pg
rm -rf "$D"
mkdir -p "$D/bin" "$D/sock" "$D/logs" "$D/m"
install -m 0755 "${TIDEMARK_BIN:-$SRC/target/release}/tidemark-agent" "$D/bin/"
chown -R postgres: "$D"
chmod 0755 "$D"
BIN=$D/bin
COMMIT=${TIDEMARK_COMMIT:-$(git -C "$SRC" rev-parse --short=12 HEAD)}

cat >"$D/pgbackrest.conf" <<EOF
[global]
compress-type=zst
compress-level=1
spool-path=$D/spool
lock-path=$D/lock
log-path=$D/logs
log-level-console=warn
log-level-file=off
archive-async=n
process-max=2

[bench]
pg1-path=$D/pgdata
pg1-socket-path=$D/sock
pg1-port=$PORT
EOF
chown postgres: "$D/pgbackrest.conf"

archive_cmd() {
  case $1 in
    tidemark-push) echo "$BIN/tidemark-agent wal-push --repo file://$D/repo-$1 --compress-level 1 %p" ;;
    tidemark-sidecar) echo "$BIN/tidemark-agent wal-push --repo file://$D/repo-$1 --compress-level 1 --socket-dir $D/sc-sock %p" ;;
    pgbackrest-*) echo "pgbackrest --config=$D/pgbackrest.conf --stanza=bench --repo1-path=$D/repo-$1 $([[ $1 == pgbackrest-async ]] && echo --archive-async) archive-push %p" ;;
  esac
}

log "initdb, pgbench -i -s $SCALE"
as_pg "$PGBIN/initdb" -D "$D/pgdata" --data-checksums -U postgres --auth=trust -E UTF8 --locale=C >"$D/logs/initdb.log"
cat >>"$D/pgdata/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$D/sock'
port = $PORT
wal_level = replica
archive_mode = on
archive_command = '/bin/false'
max_wal_size = 1GB
wal_keep_size = 16GB
shared_buffers = 256MB
EOF
as_pg "$PGBIN/pg_ctl" -D "$D/pgdata" -l "$D/logs/postgresql.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -h "$D/sock" -p "$PORT" -i -q -s "$SCALE" postgres >"$D/logs/pgbench-init.log" 2>&1

printf '%s\n' '\set a random(1, 100000 * :scale - 2000)' \
  'UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN :a AND :a + 2000;' >"$D/load.sql"
chown postgres: "$D/load.sql"
# The backlog: WAL of the same workload until N segments wait .ready (archive_command fails).
log "writing a backlog of $N segments"
while (($(ls "$D/pgdata/pg_wal/archive_status" | grep -c '\.ready$' || true) < N)); do
  as_pg "$PGBIN/pgbench" -h "$D/sock" -p "$PORT" -n -c 2 -T 5 -f "$D/load.sql" postgres >>"$D/logs/pgbench.log" 2>&1
done
stop_pg
mapfile -t BACKLOG < <(ls "$D/pgdata/pg_wal/archive_status" | grep '\.ready$' | sed 's/\.ready$//' | sort | head -n "$N")
LAST=${BACKLOG[-1]}
log "backlog ${BACKLOG[0]} .. $LAST"

set_archive() {
  sed -i '/^archive_command = /d' "$D/pgdata/postgresql.conf"
  echo "archive_command = '$(archive_cmd "$1")'" >>"$D/pgdata/postgresql.conf"
}
# Puts the backlog segments back to .ready (PostgreSQL keeps them: wal_keep_size); WAL written
# by an earlier variant's load phase stays .done.
reset_status() {
  local s st=$D/pgdata/pg_wal/archive_status
  for s in "${BACKLOG[@]}"; do
    if [[ -e $st/$s.done ]]; then mv "$st/$s.done" "$st/$s.ready"; fi
  done
}
# Waits until PostgreSQL has marked every finished segment archived (.done, no .ready left).
wait_no_ready() {
  local t=0
  while compgen -G "$D/pgdata/pg_wal/archive_status/*.ready" >/dev/null; do
    sleep 0.05
    t=$((t + 1))
    ((t < 36000)) || die "archiving stalled; see $D/logs/postgresql.log"
  done
}
start_sidecar() {
  rm -rf "$D/sc-state" "$D/sc-sock"
  as_pg mkdir -p "$D/sc-state" "$D/sc-sock"
  runuser -u postgres -- /usr/bin/time -f '%M' -o "$D/m/sidecar-rss-$1.txt" \
    "$BIN/tidemark-agent" sidecar --pgdata "$D/pgdata" --repo "file://$D/repo-tidemark-sidecar" \
    --state-dir "$D/sc-state" --socket-dir "$D/sc-sock" --compress-level 1 --listen "127.0.0.1:$((PORT + 7))" \
    >"$D/logs/sidecar-$1.log" 2>&1 &
  SIDECAR_PID=$!
  local t=0
  until [[ -S $D/sc-sock/tidemark.sock ]]; do sleep 0.1; t=$((t + 1)); ((t < 300)) || die "the sidecar did not start; see $D/logs/sidecar-$1.log"; done
}
stop_sidecar() {
  [[ -n $SIDECAR_PID ]] || return 0
  pkill -TERM -f "^$BIN/tidemark-agent sidecar" 2>/dev/null || true
  wait "$SIDECAR_PID" 2>/dev/null || true
  SIDECAR_PID=
}

as_pg "$PGBIN/pg_ctl" -D "$D/pgdata" -l "$D/logs/postgresql.log" -w start >/dev/null
for v in pgbackrest-sync pgbackrest-async; do
  as_pg pgbackrest --config="$D/pgbackrest.conf" --stanza=bench --repo1-path="$D/repo-$v" stanza-create >/dev/null
done
stop_pg

# One drain of the backlog by variant $1 ($2: a tag for the sidecar's files); sets drain (segments
# per second) and cpuseg (busy CPU of the whole machine per segment, in ms: the tool, PostgreSQL's
# archiver, archive_command); leaves PostgreSQL (and the sidecar) running.
drain_once() {
  # An empty archive each time: a segment already archived is verified, not stored.
  case $1 in
    tidemark-*) rm -rf "$D/repo-$1" ;;
    pgbackrest-*) rm -rf "$D/repo-$1/archive/bench/15-1" "$D/spool/archive" ;;
  esac
  reset_status
  set_archive "$1"
  sync
  log "$1: draining $N segments"
  local b0 b1 t0 t1 s0
  b0=$(busy)
  s0=$(stolen)
  t0=$(now)
  if [[ $1 == tidemark-sidecar ]]; then start_sidecar "$2"; fi
  as_pg "$PGBIN/pg_ctl" -D "$D/pgdata" -l "$D/logs/postgresql.log" -w start >/dev/null
  wait_no_ready
  t1=$(now)
  b1=$(busy)
  drain=$(calc "round($N / ($t1 - $t0), 2)")
  cpuseg=$(calc "round(($b1 - $b0) * 1000 / $N, 1)")
  # Share of the two CPUs' time the hypervisor gave to other guests during the drain.
  steal=$(calc "round(100 * ($(stolen) - $s0) / ($(nproc) * ($t1 - $t0)))")
  echo "$1 $drain $cpuseg $steal" >>"$D/m/drains.txt"
}

: >"$D/m/drains.txt"
RES=()
for v in "${VARIANTS[@]}"; do
  drain_once "$v" drain
  rss=-
  # Live load: pgbench writes while archiving goes on; lag sampled every 0.5 s.
  log "$v: $LOAD_SECONDS s of pgbench with archiving"
  as_pg "$PGBIN/pgbench" -h "$D/sock" -p "$PORT" -n -c 2 -T "$LOAD_SECONDS" -f "$D/load.sql" postgres >>"$D/logs/pgbench.log" 2>&1 &
  bpid=$!
  : >"$D/m/lag-$v.txt"
  while kill -0 "$bpid" 2>/dev/null; do
    ls "$D/pgdata/pg_wal/archive_status" | grep -c '\.ready$' >>"$D/m/lag-$v.txt" || true
    sleep 0.5
  done
  wait "$bpid" || true
  sql "SELECT pg_switch_wal()" >/dev/null
  t2=$(now)
  wait_no_ready
  catchup=$(calc "round($(now) - $t2, 2)")
  lagmax=$(sort -n "$D/m/lag-$v.txt" | tail -1)
  lagmean=$(python3 -c "import sys; v=[int(x) for x in open(sys.argv[1]) if x.strip()]; print(round(sum(v)/max(len(v),1),1))" "$D/m/lag-$v.txt")
  stop_pg
  if [[ $v == tidemark-sidecar ]]; then
    stop_sidecar
    rss=$(calc "round($(tail -1 "$D/m/sidecar-rss-drain.txt") / 1024, 1)")
  fi
  log "$v: drain $drain seg/s, $cpuseg ms of machine CPU per segment ($steal% stolen); under load lag max $lagmax mean $lagmean segments, catch-up $catchup s; sidecar RSS $rss MiB"
  RES+=("$v $drain $lagmax $lagmean $catchup $rss $cpuseg")
done

# More drains of the async variants, the order reversed every other round (one drain per variant
# moves the ratio by ±0.1–0.2 on this machine).
order=(tidemark-sidecar pgbackrest-async)
for ((r = 2; r <= DRAIN_ROUNDS; r++)); do
  if ((r % 2 == 0)); then order=(pgbackrest-async tidemark-sidecar); else order=(tidemark-sidecar pgbackrest-async); fi
  for v in "${order[@]}"; do
    drain_once "$v" "drain-$r"
    stop_pg
    if [[ $v == tidemark-sidecar ]]; then stop_sidecar; fi
  done
done

pgbr_async=$(printf '%s\n' "${RES[@]}" | awk '$1 == "pgbackrest-async" {print $2}')
pgbr_sync=$(printf '%s\n' "${RES[@]}" | awk '$1 == "pgbackrest-sync" {print $2}')
{
  echo
  echo "## WAL archiving, $(date -u +%F) commit $COMMIT (bench/archive.sh, N=$N, pgbench -c 2 -T $LOAD_SECONDS range updates, zstd 1)"
  echo
  echo "| variant | drain seg/s | vs pgBackRest async | vs sync | machine CPU per segment in the drain (ms) | lag max (segments) | lag mean | catch-up after load (s) | sidecar peak RSS (MiB) |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for r in "${RES[@]}"; do
    read -r v drain lagmax lagmean catchup rss cpuseg <<<"$r"
    echo "| $v | $drain | $(calc "round($drain / $pgbr_async, 2)")× | $(calc "round($drain / $pgbr_sync, 2)")× | $cpuseg | $lagmax | $lagmean | $catchup | $rss |"
  done
} | tee "$D/m/table.md"
if ((DRAIN_ROUNDS > 1)); then
  python3 - "$D/m/drains.txt" "$DRAIN_ROUNDS" <<'PY' | tee -a "$D/m/table.md"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
by = {}
for v, seg, cpu, steal in rows:
    by.setdefault(v, []).append((float(seg), float(cpu), float(steal)))
med = lambda xs: statistics.median(xs)
a = by["pgbackrest-async"]
print()
print(f"Drains of the backlog, {sys.argv[2]} per async variant (the first is the one above), order alternating:")
print()
print("| variant | drain seg/s, median [min–max] | machine CPU per segment (ms), median [min–max] | CPU stolen by the hypervisor (%), each drain |")
print("|---|---|---|---|")
for v in ("tidemark-sidecar", "pgbackrest-async"):
    xs = by[v]
    s = [x[0] for x in xs]; c = [x[1] for x in xs]
    st = ", ".join(f"{x[2]:.0f}" for x in xs)
    print(f"| {v} | {med(s):.2f} [{min(s):.2f}–{max(s):.2f}] | {med(c):.1f} [{min(c):.1f}–{max(c):.1f}] | {st} |")
t = by["tidemark-sidecar"]
print()
print(f"Sidecar / pgBackRest async, median drain: **{med([x[0] for x in t]) / med([x[0] for x in a]):.2f}×** (target ≥ 1.5×); "
      f"machine CPU per segment: {med([x[1] for x in t]) / med([x[1] for x in a]):.2f}×.")
PY
fi
if [[ -n $RESULTS ]]; then cat "$D/m/table.md" >>"$RESULTS"; fi
