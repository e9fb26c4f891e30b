#!/usr/bin/env bash
# Side-by-side benchmark of tidemark against pgBackRest 2.45 on one machine, same data, same run:
# full backup, nightly backup after a scattered 1% update, restore and PITR on pgbench data.
# Prints a table of absolute numbers and tidemark/pgBackRest ratios and appends it to
# bench/results.md. How to run and what each number means: bench/README.md.
#
# Environment:
#   SCALE=100            pgbench scale (100 ≈ 1.5 GiB data directory)
#   DATASET=both         initialised | realistic | both
#   TM_LEVELS="1"        tidemark zstd levels, one tidemark repository per level
#   TM_REPL_LEVELS="1"   tidemark backup --source replication (BASE_BACKUP over a replication
#                        connection on the unix socket) at these zstd levels, one repository each
#                        ("" = only --pgdata backups)
#   TM_ENC_LEVELS=""     tidemark into an encrypted repository (--key-file) at these zstd levels:
#                        the cost of encryption, side by side with tidemark-zN
#   PITR=1               0: skip the restore/PITR step (backups only)
#   RESTORE_ROUNDS=0     N > 0: after the PITR step, N more rounds of restore only (no replay) of
#                        the same backup by every variant, the order reversed every other round
#                        (tidemark first, then pgBackRest first, ...), page cache dropped before
#                        each; the report adds their median, which a single restore (±0.2× from run
#                        to run on this disk) cannot give
#   PGBR_FIRST=0         1: run pgBackRest's variants (zst first) before tidemark's in every step
#                        (by default tidemark goes first)
#   PITR_FLOOR=0         1: also measure PostgreSQL's replay floor: tidemark's restore of the same
#                        backup (not timed) into a fresh directory, every WAL segment from the
#                        backup's start extracted beforehand as a plain file (tidemark-restore
#                        wal-fetch, not timed), restore_command = 'cp <dir>/%f %p', then server
#                        start to promotion timed as for the other variants: the replay time
#                        with the cheapest possible restore_command, the floor for any tool
#   DISK_FLOOR=0         1: also measure the disk's floor for the restore (bench/disk_floor.py):
#                        writing as many bytes as tidemark's restore writes with O_DIRECT, reading
#                        its repository's packs cold, and both at once, best of 2, page cache
#                        dropped before each; reported against the restore and its target
#   DELTA=1              restore the nightly to its consistency point, change 1% of the copy's
#                        rows (one range), restore over it with --delta (pgBackRest: --delta),
#                        start and check both (0 = skip)
#   PGBR_ZST_LEVEL=1     also run pgBackRest with compress-type=zst at this level ("" = only gz-6)
#   PGBR_PROCESS_MAX=2   pgBackRest process-max (tidemark uses one worker per core)
#   WORK=/tmp/tidemark-bench   work directory (clusters, repositories, logs); wiped per dataset
#   DROP_CACHES=1        drop the page cache before every timed step (cold reads for both tools)
#   QUIET_BUSY=30        before a timed step, wait until other work uses < this % of the CPUs ...
#   QUIET_MAX_WAIT=600   ... for at most this many seconds
#   UPDATE_PATTERN=random  rows the "1% update" touches: random (random() < 0.01, seeded, so
#                        reproducible) or modulo (aid % 100 = 0: a perfectly regular pattern that
#                        touches a row every 1.6 pages, so it changes more chunks than random rows)
#   CHUNKS=1             chunk-size measurement on the realistic dataset
#   CHUNK_SIZES=8192,16384,65536,1048576,0   chunk sizes compared (0 = whole 1 GiB segment files)
#   BUILD=1              cargo build --release the two binaries first (0: use target/release as is)
#   BUILD_FROM=tree      tree: build the working tree in place (target/release); HEAD: build a
#                        clean export of the committed HEAD in $WORK/build (reproducible while
#                        others edit the tree; the commit reported is exactly what ran)
#   TIDEMARK_BIN=DIR     use prebuilt tidemark-agent / tidemark-restore from DIR (implies BUILD=0)
#   TIDEMARK_COMMIT=...  the commit those prebuilt binaries were built from (for the report)
#   RESULTS=bench/results.md   where the Markdown results are appended ("" = don't append)
#   KEEP=0               1: keep clusters and repositories of the last dataset under $WORK
#   NICE=-10             PostgreSQL and each timed command run in a scheduler autogroup with
#                        this nice (and ionice best-effort 0), so that other users' work on a
#                        shared machine disturbs both tools less; both get the same ("" = don't)
#   PORT=55432           port of the benchmark cluster (unix socket only); restores use PORT+1
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$BENCH/.." && pwd)

SCALE=${SCALE:-100}
DATASET=${DATASET:-both}
TM_LEVELS=${TM_LEVELS:-1}
TM_REPL_LEVELS=${TM_REPL_LEVELS-1}
TM_ENC_LEVELS=${TM_ENC_LEVELS-}
RESTORE_ROUNDS=${RESTORE_ROUNDS:-0}
PITR=${PITR:-1}
PITR_FLOOR=${PITR_FLOOR:-0}
DISK_FLOOR=${DISK_FLOOR:-0}
DELTA=${DELTA:-1}
PGBR_ZST_LEVEL=${PGBR_ZST_LEVEL-1}
PGBR_PROCESS_MAX=${PGBR_PROCESS_MAX:-2}
WORK=${WORK:-/tmp/tidemark-bench}
DROP_CACHES=${DROP_CACHES:-1}
QUIET_BUSY=${QUIET_BUSY:-30}
QUIET_MAX_WAIT=${QUIET_MAX_WAIT:-600}
CHUNKS=${CHUNKS:-1}
UPDATE_PATTERN=${UPDATE_PATTERN:-random}
CHUNK_SIZES=${CHUNK_SIZES:-8192,16384,65536,1048576,0}
BUILD=${BUILD:-1}
BUILD_FROM=${BUILD_FROM:-tree}
TIDEMARK_BIN=${TIDEMARK_BIN:-}
RESULTS=${RESULTS-$BENCH/results.md}
KEEP=${KEEP:-0}
PORT=${PORT:-55432}
NICE=${NICE--10}
RPORT=$((PORT + 1))
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
RECOVERY_TIMEOUT=${RECOVERY_TIMEOUT:-3600}

case "$DATASET" in
  both) DATASETS=(initialised realistic) ;;
  initialised | realistic) DATASETS=("$DATASET") ;;
  *) echo "run.sh: DATASET must be initialised, realistic or both, not '$DATASET'" >&2; exit 2 ;;
esac
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: SCALE must be a positive integer" >&2; exit 2; }
[[ $UPDATE_PATTERN == random || $UPDATE_PATTERN == modulo ]] || { echo "run.sh: UPDATE_PATTERN must be random or modulo" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "run.sh: run as root (servers and tools run as postgres via runuser)" >&2; exit 2; }

log() { printf '%s [bench] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools and binaries
# ---------------------------------------------------------------------------------------------

ensure_packages() {
  local missing=()
  command -v pgbackrest >/dev/null || missing+=(pgbackrest)
  [[ -x /usr/bin/time ]] || missing+=(time)
  command -v python3 >/dev/null || missing+=(python3)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  [[ -x $PGBIN/postgres ]] || die "PostgreSQL 15 not found at $PGBIN"
  PGBR_VERSION=$(pgbackrest version | awk '{print $2}')
  [[ $PGBR_VERSION == 2.45 ]] || log "warning: pgBackRest $PGBR_VERSION, the targets were set against 2.45"
}

build() {
  BIN=$WORK/bin
  mkdir -p "$BIN"
  local from
  COMMIT=$(git -C "$SRC" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  if [[ -n $TIDEMARK_BIN ]]; then
    from=$TIDEMARK_BIN
    COMMIT="${TIDEMARK_COMMIT:-unknown} (prebuilt binaries from $TIDEMARK_BIN)"
  elif [[ $BUILD_FROM == HEAD ]]; then
    log "building tidemark $COMMIT (clean export of HEAD) in $WORK/build"
    rm -rf "$WORK/build/src"
    mkdir -p "$WORK/build/src"
    git -C "$SRC" archive HEAD | tar -x -C "$WORK/build/src"
    (cd "$WORK/build/src" && CARGO_TARGET_DIR=$WORK/build/target \
      cargo build --release --locked -q -p tidemark-agent -p tidemark-restore)
    from=$WORK/build/target/release
  else
    if [[ $BUILD == 1 ]]; then
      log "building tidemark (cargo build --release) in $SRC"
      (cd "$SRC" && cargo build --release -q -p tidemark-agent -p tidemark-restore)
    fi
    from=$SRC/target/release
  fi
  # A private copy: other builds may replace target/release mid-run, and the postgres user
  # must be able to execute it (restore_command points at it).
  install -m 0755 "$from/tidemark-agent" "$from/tidemark-restore" "$BIN/"
  chmod 0755 "$WORK"
  if [[ -z $TIDEMARK_BIN && $BUILD_FROM != HEAD && -n $(git -C "$SRC" status --porcelain --untracked-files=no -- . ':(exclude)bench' 2>/dev/null) ]]; then
    COMMIT+="+uncommitted-changes"
  fi
  BIN_SHA=$(sha256sum "$BIN/tidemark-agent" | cut -c1-16)
}

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

PRIO=()
MEASURE_NICE=()
if [[ -n $NICE ]]; then
  PRIO=(ionice -c 2 -n 0)
  MEASURE_NICE=(--nice "$NICE")
fi
as_pg() { runuser -u postgres -- "$@"; }
sql() { as_pg "$PGBIN/psql" -h "$D/sock" -p "$PORT" -U postgres -d postgres -X -q -At -v ON_ERROR_STOP=1 -c "$1"; }
rsql() { as_pg "$PGBIN/psql" -h "$D/sock-r" -p "$RPORT" -U postgres -d postgres -X -q -At -v ON_ERROR_STOP=1 -c "$1"; }
record() { python3 "$BENCH/report.py" record "$D/results.jsonl" "$DS" "$@"; }
jget() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$@"; }
now() { date +%s.%N; }
elapsed() { python3 -c 'import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 3))' "$1" "$2"; }

# CPU busy share of the whole machine over $1 seconds, in percent.
busy_pct() {
  local a b
  read -r -a a </proc/stat
  sleep "$1"
  read -r -a b </proc/stat
  local busy=$(((b[1] + b[2] + b[3] + b[6] + b[7] + b[8]) - (a[1] + a[2] + a[3] + a[6] + a[7] + a[8])))
  local idle=$(((b[4] + b[5]) - (a[4] + a[5])))
  echo $((100 * busy / (busy + idle + 1)))
}

# Waits until the machine is quiet (other engineers' builds share it); prints the last busy %.
wait_quiet() {
  local waited=0 b
  while b=$(busy_pct 2); ((b > QUIET_BUSY)); do
    ((waited += 2))
    if ((waited >= QUIET_MAX_WAIT)); then
      log "machine still ${b}% busy after ${waited}s; measuring anyway"
      break
    fi
    if ((waited % 30 == 0)); then log "waiting for a quiet machine (${b}% busy)"; fi
  done
  echo "$b"
}

drop_caches() {
  sync
  if [[ $DROP_CACHES == 1 ]]; then
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || log "warning: cannot drop the page cache"
  fi
}

# Waits until every finished WAL segment has been archived by every tool.
wait_archived() {
  local t=0 failed
  while compgen -G "$D/pgdata/pg_wal/archive_status/*.ready" >/dev/null; do
    sleep 0.2
    t=$((t + 1))
    if ((t > 9000)); then
      failed=$(sql "SELECT failed_count || ' failures, last ' || coalesce(last_failed_wal, '-') FROM pg_stat_archiver")
      die "WAL archiving stalled ($failed); see $D/logs/postgresql.log"
    fi
  done
}

# Switches to a new WAL segment and waits until the finished one is archived everywhere.
switch_and_archive() {
  local seg
  seg=$(sql "SELECT pg_walfile_name(pg_switch_wal())")
  local t=0
  until [[ $(sql "SELECT coalesce(last_archived_wal >= '$seg', false) FROM pg_stat_archiver") == t ]]; do
    sleep 0.2
    t=$((t + 1))
    ((t < 9000)) || die "wal segment $seg was not archived; see $D/logs/postgresql.log"
  done
  wait_archived
}

# ---------------------------------------------------------------------------------------------
# Variants: tidemark-zN (one repository per zstd level), tidemark-repl-zN (--source replication),
# pgbackrest-gz6, pgbackrest-zstN
# ---------------------------------------------------------------------------------------------

VARIANTS=()
for l in $TM_LEVELS; do VARIANTS+=("tidemark-z$l"); done
for l in $TM_REPL_LEVELS; do VARIANTS+=("tidemark-repl-z$l"); done
for l in $TM_ENC_LEVELS; do VARIANTS+=("tidemark-enc-z$l"); done
VARIANTS+=(pgbackrest-gz6)
[[ -n $PGBR_ZST_LEVEL ]] && VARIANTS+=("pgbackrest-zst$PGBR_ZST_LEVEL")
# PGBR_FIRST=1: pgBackRest's variants run first in every step (to see what the order costs).
if [[ ${PGBR_FIRST:-0} == 1 ]]; then
  mapfile -t VARIANTS < <(printf '%s\n' "${VARIANTS[@]}" | grep '^pgbackrest-' | sort -r; printf '%s\n' "${VARIANTS[@]}" | grep -v '^pgbackrest-')
fi

tm_level() { echo "${1##*-z}"; }
# The key options of an encrypted variant (the key file is made by the setup step).
tm_key() { [[ $1 == tidemark-enc-* ]] && echo "--key-file $D/tidemark.key" || true; }
stanza() { [[ $1 == pgbackrest-gz6 ]] && echo bench || echo benchzst; }
pgbr() { as_pg pgbackrest --config="$D/pgbackrest.conf" "$@"; }

push_cmd() {
  case $1 in
    tidemark-*) echo "$BIN/tidemark-agent wal-push --repo file://$D/repo-$1 $(tm_key "$1") --compress-level $(tm_level "$1") %p" ;;
    pgbackrest-*) echo "pgbackrest --config=$D/pgbackrest.conf --stanza=$(stanza "$1") archive-push %p" ;;
  esac
}

# archive_command pushes every segment to every repository; the measured tool goes first so
# that its backup never waits on another tool's archive-push.
archive_chain() {
  local first=$1 cmd v
  cmd=$(push_cmd "$first")
  for v in "${VARIANTS[@]}"; do
    [[ $v == "$first" ]] || cmd+=" && $(push_cmd "$v")"
  done
  echo "$cmd"
}

set_archive_first() {
  sql "ALTER SYSTEM SET archive_command = '$(archive_chain "$1")'"
  sql "SELECT pg_reload_conf()" >/dev/null
}

write_pgbackrest_conf() {
  cat >"$D/pgbackrest.conf" <<EOF
[global]
log-path=$D/pgbr/log
lock-path=$D/pgbr/lock
spool-path=$D/pgbr/spool
log-level-console=warn
log-level-file=info
process-max=$PGBR_PROCESS_MAX
start-fast=y
repo1-retention-full=99

[bench]
pg1-path=$D/pgdata
pg1-port=$PORT
pg1-socket-path=$D/sock
repo1-path=$D/repo-pgbackrest-gz6
EOF
  if [[ -n $PGBR_ZST_LEVEL ]]; then
    cat >>"$D/pgbackrest.conf" <<EOF

[benchzst]
pg1-path=$D/pgdata
pg1-port=$PORT
pg1-socket-path=$D/sock
repo1-path=$D/repo-pgbackrest-zst$PGBR_ZST_LEVEL
compress-type=zst
compress-level=$PGBR_ZST_LEVEL
EOF
  fi
  chown postgres: "$D/pgbackrest.conf"
}

# Runs one timed command; name is used for the result and log files.
measure() {
  local name=$1
  shift
  python3 "$BENCH/measure.py" --out "$D/m/$name.json" --stdout "$D/m/$name.out" \
    --stderr "$D/logs/$name.log" "${MEASURE_NICE[@]}" -- "${PRIO[@]}" "$@"
  local rc
  rc=$(jget "$D/m/$name.json" rc)
  if [[ $rc != 0 ]]; then
    log "$name failed with exit code $rc: $*"
    tail -n 30 "$D/logs/$name.log" >&2 || true
    tail -n 10 "$D/m/$name.out" >&2 || true
    die "$name failed"
  fi
  log "$name: $(jget "$D/m/$name.json" wall_s)s"
}

# "<count> <bytes>" of files under $1 that are not listed in snapshot $2 (created if absent).
list_files() { { find "$@" -type f -printf '%P %s\n' 2>/dev/null || true; } | sort; }
new_files() { comm -13 "$1" "$2" | awk '{n++; s += $2} END {print n + 0, s + 0}'; }

# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------

start_source() {
  "${PRIO[@]}" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$D/pgdata" -l "$D/logs/postgresql.log" -w -t 600 "$@" start >/dev/null
  boost_pg "$D/pgdata"
}

# pg_ctl starts the postmaster in a session (so an autogroup) of its own: give it NICE too.
boost_pg() {
  [[ -n $NICE && -e /proc/self/autogroup ]] || return 0
  local i pid
  for i in $(seq 100); do
    [[ -s $1/postmaster.pid ]] && break
    sleep 0.05
  done
  pid=$(head -n 1 "$1/postmaster.pid")
  echo "$NICE" >"/proc/$pid/autogroup" || log "warning: cannot set the autogroup nice of postmaster $pid"
}
stop_pg() {
  [[ -f $1/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$1" -m "${2:-fast}" -w -t 600 stop >/dev/null || true
}

cleanup() {
  local rc=$?
  if [[ -n ${D:-} ]]; then
    stop_pg "$D/pgdata" immediate
    for r in "$D"/restore-*; do
      if [[ -d $r ]]; then stop_pg "$r" immediate; fi
    done
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

prepare() {
  log "[$DS] preparing cluster (pgbench scale $SCALE)"
  if [[ -d $D ]]; then
    stop_pg "$D/pgdata" immediate
    for r in "$D"/restore-*; do
      if [[ -d $r ]]; then stop_pg "$r" immediate; fi
    done
    rm -rf "$D"
  fi
  mkdir -p "$D"/{sock,sock-r,logs,m,snap,pgbr/log,pgbr/lock,pgbr/spool}
  chown -R postgres: "$D"
  : >"$D/results.jsonl"
  as_pg "$PGBIN/initdb" -D "$D/pgdata" --data-checksums -U postgres --auth=trust -E UTF8 --locale=C >"$D/logs/initdb.log"
  cat >>"$D/pgdata/postgresql.conf" <<EOF

# tidemark bench
listen_addresses = ''
port = $PORT
unix_socket_directories = '$D/sock'
shared_buffers = 1GB
max_wal_size = 8GB
min_wal_size = 1GB
checkpoint_timeout = 30min
wal_level = replica
archive_mode = on
archive_command = '$(archive_chain "${VARIANTS[0]}")'
EOF
  write_pgbackrest_conf
  head -c 32 /dev/urandom | base64 >"$D/tidemark.key"
  chown postgres: "$D/tidemark.key"
  chmod 0600 "$D/tidemark.key"
  # Load with minimal WAL (COPY / INSERT into a table truncated in the same transaction skip WAL),
  # then restart with archiving on: the repositories start with the first backup.
  start_source -o "-c wal_level=minimal -c max_wal_senders=0 -c archive_mode=off"
  local t0
  t0=$(now)
  if [[ $DS == initialised ]]; then
    as_pg "$PGBIN/pgbench" -h "$D/sock" -p "$PORT" -i -q -s "$SCALE" postgres >"$D/logs/pgbench-init.log" 2>&1
  else
    # Random hex in pgbench_accounts.filler (char(84)): the same row width as pgbench's blank
    # filler, but incompressible beyond hex's 2:1. Generated in place instead of UPDATE + VACUUM
    # FULL: same compact table, a fraction of the time.
    as_pg "$PGBIN/pgbench" -h "$D/sock" -p "$PORT" -i -q -I dt -s "$SCALE" postgres >"$D/logs/pgbench-init.log" 2>&1
    sql "SELECT setseed(0.42);
      BEGIN;
      TRUNCATE pgbench_accounts, pgbench_branches, pgbench_tellers;
      INSERT INTO pgbench_branches (bid, bbalance) SELECT b, 0 FROM generate_series(1, $SCALE) b;
      INSERT INTO pgbench_tellers (tid, bid, tbalance) SELECT t, (t - 1) / 10 + 1, 0 FROM generate_series(1, 10 * $SCALE) t;
      INSERT INTO pgbench_accounts (aid, bid, abalance, filler)
        SELECT a, (a - 1) / 100000 + 1, 0,
               substr(md5(random()::text) || md5(random()::text) || md5(random()::text), 1, 84)
        FROM generate_series(1, 100000 * $SCALE) a;
      COMMIT;"
    as_pg "$PGBIN/pgbench" -h "$D/sock" -p "$PORT" -i -q -I vp -s "$SCALE" postgres >>"$D/logs/pgbench-init.log" 2>&1
  fi
  sql "CHECKPOINT"
  log "[$DS] data loaded in $(elapsed "$t0" "$(now)")s"
  stop_pg "$D/pgdata"
  start_source
  pgbr --stanza=bench stanza-create
  [[ -n $PGBR_ZST_LEVEL ]] && pgbr --stanza=benchzst stanza-create
  pgbr --stanza=bench check
  [[ -n $PGBR_ZST_LEVEL ]] && pgbr --stanza=benchzst check
  switch_and_archive
  record source dataset \
    pgdata_bytes="$(du -sb --exclude=pg_wal "$D/pgdata" | cut -f1)" \
    accounts_bytes="$(sql "SELECT pg_relation_size('pgbench_accounts')")"
}

backup_tidemark() {
  local v=$1 step=$2 repo=$D/repo-$1 before after objs
  list_files "$repo/packs" "$repo/backups" >"$D/m/files-before"
  local src=(--pgdata "$D/pgdata")
  # --source replication: BASE_BACKUP over a replication=database connection on the unix socket
  # (initdb's default "local all all trust" line admits it; postgres has REPLICATION).
  [[ $v == tidemark-repl-* ]] && src=(--source replication)
  measure "$step-$v" runuser -u postgres -- env PGHOST="$D/sock" PGPORT="$PORT" PGUSER=postgres \
    PGDATABASE=postgres "$BIN/tidemark-agent" backup "${src[@]}" --repo "file://$repo" $(tm_key "$v") \
    --json --compress-level "$(tm_level "$v")"
  list_files "$repo/packs" "$repo/backups" >"$D/m/files-after"
  read -r objs bytes < <(new_files "$D/m/files-before" "$D/m/files-after")
  record "$v" "$step" --measure "$D/m/$step-$v.json" --tool "$D/m/$step-$v.out" \
    objects="$objs" stored_bytes="$bytes" busy_before="$BUSY"
}

backup_pgbackrest() {
  local v=$1 step=$2 st type label
  st=$(stanza "$v")
  type=$([[ $step == full ]] && echo full || echo incr)
  measure "$step-$v" runuser -u postgres -- pgbackrest --config="$D/pgbackrest.conf" --stanza="$st" --type="$type" backup
  pgbr --stanza="$st" info --output=json >"$D/m/$step-$v.info.json"
  label=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["backup"][-1]["label"])' "$D/m/$step-$v.info.json")
  python3 -c 'import json,sys; b=json.load(open(sys.argv[1]))[0]["backup"][-1]; print(json.dumps({"label": b["label"], "logical_bytes": b["info"]["size"], "new_chunk_bytes": b["info"]["delta"], "info_repo_delta": b["info"]["repository"]["delta"]}))' \
    "$D/m/$step-$v.info.json" >"$D/m/$step-$v.out"
  local dir=$D/repo-$v/backup/$st/$label
  record "$v" "$step" --measure "$D/m/$step-$v.json" --tool "$D/m/$step-$v.out" \
    objects="$(find "$dir" -type f | wc -l)" stored_bytes="$(du -sb "$dir" | cut -f1)" busy_before="$BUSY"
}

backups() {
  local step=$1 v
  for v in "${VARIANTS[@]}"; do
    set_archive_first "$v"
    wait_archived
    drop_caches
    BUSY=$(wait_quiet)
    log "[$DS] $step backup: $v"
    case $v in
      tidemark-*) backup_tidemark "$v" "$step" ;;
      pgbackrest-*) backup_pgbackrest "$v" "$step" ;;
    esac
  done
}

# Empties the directory $1 for a restore, drops the page cache and waits for a quiet machine
# (BUSY: its busy share then).
fresh_target() {
  rm -rf "$1"
  install -d -m 0700 -o postgres -g postgres "$1"
  drop_caches
  BUSY=$(wait_quiet)
}

# Timed restore (measure step $1) of variant $2's latest backup into the empty directory $3.
restore_latest() {
  local name=$1 v=$2 target=$3
  case $v in
    tidemark-*)
      measure "$name" runuser -u postgres -- "$BIN/tidemark-restore" restore --pgdata "$target" \
        --repo "file://$D/repo-$v" $(tm_key "$v") --target latest --json ;;
    pgbackrest-*)
      measure "$name" runuser -u postgres -- pgbackrest --config="$D/pgbackrest.conf" --stanza="$(stanza "$v")" \
        --pg1-path="$target" restore ;;
  esac
}

pitr() {
  local v=$1 target=$D/restore-$1 t0 t1 t2 got
  wait_archived
  fresh_target "$target"
  log "[$DS] restore + PITR: $v"
  t0=$(now)
  restore_latest "pitr-$v" "$v" "$target"
  if [[ $v == pgbackrest-* ]]; then echo '{}' >>"$D/m/pitr-$v.out"; fi
  t1=$(now)
  start_until_promoted "$v" "$target"
  t2=$(now)
  local ok
  ok=$(check_restored "$v" "$EXPECTED")
  record "$v" pitr --measure "$D/m/pitr-$v.json" --tool "$D/m/pitr-$v.out" \
    restore_s="$(jget "$D/m/pitr-$v.json" wall_s)" pitr_s="$(elapsed "$t0" "$t2")" \
    recovery_s="$(elapsed "$t1" "$t2")" verified="\"$ok\"" busy_before="$BUSY"
  stop_pg "$target"
  rm -rf "$target"
}

# Restore only (no replay) of variant $1's latest backup, round $2 (RESTORE_ROUNDS), recorded as
# step "restore<round>".
restore_round() {
  local v=$1 r=$2 target=$D/restore-$1
  fresh_target "$target"
  log "[$DS] restore round $r: $v"
  restore_latest "restore$r-$v" "$v" "$target"
  record "$v" "restore$r" --measure "$D/m/restore$r-$v.json" busy_before="$BUSY"
  rm -rf "$target"
}

restore_rounds() {
  local r v order
  for ((r = 1; r <= RESTORE_ROUNDS; r++)); do
    order=("${VARIANTS[@]}")
    if ((r % 2 == 0)); then
      order=()
      for v in "${VARIANTS[@]}"; do order=("$v" "${order[@]}"); done
    fi
    for v in "${order[@]}"; do restore_round "$v" "$r"; done
  done
}

# Untimed restore of variant $1's newest backup into a fresh directory $2, once the archive is
# idle; output and log named after $3, messages after $4.
untimed_restore() {
  local v=$1 target=$2 name=$3 what=$4
  rm -rf "$target"
  install -d -m 0700 -o postgres -g postgres "$target"
  wait_archived
  log "[$DS] $what: restoring $v's newest backup (not timed)"
  as_pg "$BIN/tidemark-restore" restore --pgdata "$target" --repo "file://$D/repo-$v" $(tm_key "$v") \
    --target latest --json >"$D/m/$name-restore.out" 2>"$D/logs/$name-restore.log" ||
    { tail -n 30 "$D/logs/$name-restore.log" >&2; die "$what: restore failed"; }
}

# PostgreSQL's replay floor (PITR_FLOOR=1) for tidemark variant $1: its restore of the same
# backup (--target latest, not timed) into a fresh directory; every archived WAL segment from
# the backup's start segment on, and the timeline history files, extracted beforehand with
# wal-fetch as plain files into $D/wal-plain (not timed); restore_command replaced by cp from
# there (a missing segment promotes a restore to the end of the archive, as wal-fetch does:
# $D/floor-fetch.sh); then start to promotion timed exactly as the PITR step does. The
# extracted WAL is left in the page cache (a floor: no restore_command can deliver a segment
# faster than cp from memory); the restored files are in it too, as after the PITR step's
# restore. Recorded as step "floor" of variant $1.
pitr_floor() {
  local v=$1 target=$D/restore-floor wal=$D/wal-plain t1 t2 start f name n=0 bytes
  rm -rf "$wal"
  install -d -m 0755 -o postgres -g postgres "$wal"
  untimed_restore "$v" "$target" floor "replay floor"
  start=$(sed -n 's/^START WAL LOCATION: .*(file \([0-9A-F]\{24\}\)).*/\1/p' "$target/backup_label" 2>/dev/null || true)
  if ! [[ $start =~ ^[0-9A-F]{24}$ ]]; then
    log "[$DS] replay floor: no start segment in $target/backup_label: extracting every archived segment"
    start=000000000000000000000000
  fi
  while read -r f; do
    name=${f##*/}
    if [[ $name =~ ^[0-9A-F]{24}$ && ! $name < $start ]] || [[ $name =~ ^[0-9A-F]{8}\.history$ ]]; then
      as_pg "$BIN/tidemark-restore" wal-fetch --prefetch 0 --repo "file://$D/repo-$v" $(tm_key "$v") \
        "$name" "$wal/$name" 2>>"$D/logs/floor-wal-fetch.log" || die "wal-fetch $name failed"
      n=$((n + 1))
    fi
  done < <(find "$D/repo-$v/wal" -type f | sort)
  bytes=$(du -sb "$wal" | cut -f1)
  log "[$DS] replay floor: $n WAL files ($bytes bytes) from $start on extracted to $wal"
  grep -q '^restore_command = ' "$target/postgresql.auto.conf" || die "no restore_command in $target/postgresql.auto.conf"
  # cp; a segment missing ends the replay as wal-fetch does: a restore to the end of the archive
  # (standby.signal and its marker) is promoted as pg_ctl promote does it.
  cat >"$D/floor-fetch.sh" <<'EOF'
#!/bin/sh
cp "$1/$2" "$3" && exit 0
case $2 in
  ????????????????????????)
    if [ -f .tidemark-promote-at-end ] && [ -f standby.signal ]; then
      : >promote && kill -USR1 "$(head -n 1 postmaster.pid)" && rm -f .tidemark-promote-at-end
    fi ;;
esac
exit 1
EOF
  chmod 0755 "$D/floor-fetch.sh"
  sed -i "s|^restore_command = .*|restore_command = '$D/floor-fetch.sh $wal %f %p'|" "$target/postgresql.auto.conf"
  sync
  BUSY=$(wait_quiet)
  log "[$DS] replay floor: start to promotion with restore_command = cp"
  t1=$(now)
  start_until_promoted floor "$target"
  t2=$(now)
  local ok
  ok=$(check_restored floor "$EXPECTED")
  record "$v" floor floor_recovery_s="$(elapsed "$t1" "$t2")" floor_wal_files="$n" floor_wal_bytes="$bytes" \
    floor_verified="\"$ok\"" floor_busy_before="$BUSY"
  stop_pg "$target"
  rm -rf "$target" "$wal"
}

# The disk's floor for variant $1's restore (DISK_FLOOR=1): its restore of the newest backup (not
# timed) gives the bytes a restore writes; bench/disk_floor.py then times writing as many bytes
# with O_DIRECT, reading the repository's packs cold, and both at once (best of 2 each).
# Recorded as step "diskfloor" of variant $1.
disk_floor() {
  local v=$1 target=$D/restore-disk bytes
  untimed_restore "$v" "$target" disk "disk floor"
  bytes=$(du -sb "$target" | cut -f1)
  rm -rf "$target"
  BUSY=$(wait_quiet)
  log "[$DS] disk floor: writing $bytes bytes with O_DIRECT, reading $D/repo-$v/packs, and both"
  python3 "$BENCH/disk_floor.py" --dir "$D" --write-bytes "$bytes" --read "$D/repo-$v/packs" \
    >"$D/m/diskfloor.json" || die "bench/disk_floor.py failed"
  record "$v" diskfloor --tool "$D/m/diskfloor.json" busy_before="$BUSY"
}

# Starts the restored cluster of variant $1 in $2 and waits until it is promoted.
start_until_promoted() {
  local v=$1 target=$2 n=0
  # archive_mode=off: the promoted copy must not archive into the repositories under test.
  "${PRIO[@]}" runuser -u postgres -- "$PGBIN/pg_ctl" -D "$target" -l "$D/logs/postgresql-restore-$v.log" -W \
    -o "-c port=$RPORT -c unix_socket_directories='$D/sock-r' -c listen_addresses='' -c archive_mode=off" start >/dev/null
  boost_pg "$target"
  until [[ $(rsql "SELECT pg_is_in_recovery()" 2>/dev/null || true) == f ]]; do
    sleep 0.1
    n=$((n + 1))
    if ((n > RECOVERY_TIMEOUT * 10)) || ! as_pg "$PGBIN/pg_ctl" -D "$target" status >/dev/null 2>&1; then
      sleep 1
      if [[ $(rsql "SELECT pg_is_in_recovery()" 2>/dev/null || true) == f ]]; then break; fi
      tail -n 30 "$D/logs/postgresql-restore-$v.log" >&2
      die "restored cluster of $v did not reach promotion"
    fi
  done
}

# "yes" when the running restored cluster of variant $1 holds the rows $2 says, else what it holds.
check_restored() {
  local got
  got=$(rsql "SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts")
  if [[ $got == "$2" ]]; then
    echo yes
  else
    log "[$DS] $1 restored WRONG data: $got, want $2"
    echo "NO (got $got, want $2)"
  fi
}

# Restores variant $1's newest backup to its consistency point into $2 (measured as $3), with
# the further restore options given after.
restore_immediate() {
  local v=$1 target=$2 name=$3
  shift 3
  case $v in
    tidemark-*)
      measure "$name" runuser -u postgres -- "$BIN/tidemark-restore" restore --pgdata "$target" \
        --repo "file://$D/repo-$v" $(tm_key "$v") --target immediate --json "$@" ;;
    pgbackrest-*)
      measure "$name" runuser -u postgres -- pgbackrest --config="$D/pgbackrest.conf" --stanza="$(stanza "$v")" \
        --pg1-path="$target" --type=immediate --target-action=promote "$@" restore
      echo '{}' >>"$D/m/$name.out" ;;
  esac
}

# Delta restore: the nightly backup restored to its consistency point (full restore, measured),
# promoted, then 1% of pgbench_accounts changed as one range of rows (aid <= 1%: about 1% of the
# table's pages, as when a day's writes go to recent rows), stopped, and restored over with
# --delta (pgBackRest --delta, which compares whole files by checksum); both restores are
# started, promoted and checked against the rows at the nightly backup.
delta() {
  local v=$1 target=$D/delta-$1 ok1 ok2 written
  fresh_target "$target"
  log "[$DS] full restore to the nightly's consistency point: $v"
  restore_immediate "$v" "$target" "full-imm-$v"
  start_until_promoted "$v" "$target"
  ok1=$(check_restored "$v" "$EXPECTED_NIGHTLY")
  rsql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= $((SCALE * 1000))" >/dev/null
  rsql "CHECKPOINT" >/dev/null
  stop_pg "$target"
  drop_caches
  BUSY=$(wait_quiet)
  log "[$DS] delta restore over the copy after a 1% change: $v"
  restore_immediate "$v" "$target" "delta-$v" --delta
  start_until_promoted "$v" "$target"
  ok2=$(check_restored "$v" "$EXPECTED_NIGHTLY")
  written=$(python3 -c 'import json,sys
for l in reversed(open(sys.argv[1]).read().splitlines()):
    if l.startswith("{"):
        d = json.loads(l).get("delta") or {}
        print(d.get("bytes_written", "null")); break
else: print("null")' "$D/m/delta-$v.out")
  stop_pg "$target"
  record "$v" delta --measure "$D/m/delta-$v.json" \
    full_immediate_s="$(jget "$D/m/full-imm-$v.json" wall_s)" delta_s="$(jget "$D/m/delta-$v.json" wall_s)" \
    delta_written_bytes="$written" verified="\"$ok1 / $ok2\"" busy_before="$BUSY"
  rm -rf "$target"
}

wal_stats() {
  local v=$1 dir
  case $v in
    tidemark-*) dir=$D/repo-$v/wal ;;
    pgbackrest-*) dir=$D/repo-$v/archive/$(stanza "$v") ;;
  esac
  record "$v" wal objects="$(find "$dir" -type f | wc -l)" stored_bytes="$(du -sb "$dir" | cut -f1)"
}

# Copies the main-fork segment files of pgbench_accounts and its primary key right after a
# CHECKPOINT (the server is idle, so the copies are the on-disk state a backup would read).
snapshot() {
  local to=$D/snap/$1 rel
  sql "CHECKPOINT"
  mkdir -p "$to"
  for rel in pgbench_accounts pgbench_accounts_pkey; do
    local p
    p=$(sql "SELECT pg_relation_filepath('$rel')")
    cp "$D/pgdata/$p" "$to/"
    for f in "$D/pgdata/$p".[0-9]*; do
      if [[ -e $f ]]; then cp "$f" "$to/"; fi
    done
  done
}

CHUNK_ORDER=0
chunk_diff() {
  local from=$1 to=$2 update=$3 rel
  for rel in pgbench_accounts pgbench_accounts_pkey; do
    local node
    node=$(basename "$(sql "SELECT pg_relation_filepath('$rel')")")
    python3 "$BENCH/blockdiff.py" --json --sizes "$CHUNK_SIZES" "$D/snap/$from" "$D/snap/$to" "$node" >"$D/m/chunks-$to-$rel.json"
    CHUNK_ORDER=$((CHUNK_ORDER + 1))
    record source "chunks-$to-$rel" --tool "$D/m/chunks-$to-$rel.json" \
      relation="\"$rel\"" update="\"$update\"" order="$CHUNK_ORDER"
  done
}

# Updates one row in every $1 of pgbench_accounts (abalance + 1), in the UPDATE_PATTERN ($2 is
# the pattern; $3 a seed 1..99 that also picks the modulo offset); prints a description.
update_rows() {
  local every=$1 pattern=$2 seed=$3 pct
  pct=$(python3 -c "print(f'{100 / $every:g}%')")
  if [[ $pattern == random ]]; then
    sql "SELECT setseed(0.$seed); UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE random() < 1.0 / $every" >/dev/null
    echo "$pct random rows"
  else
    sql "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid % $every = $((seed % every))" >/dev/null
    echo "$pct, aid % $every = $((seed % every))"
  fi
}

lsn_bytes() { sql "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$1')::int8"; }

run_dataset() {
  DS=$1
  D=$WORK/$DS
  local load0 load1 lsn
  load0=$(cut -d' ' -f1-3 /proc/loadavg)
  prepare

  backups full

  local chunks=0
  [[ $CHUNKS == 1 && $DS == realistic ]] && chunks=1
  ((chunks)) && snapshot pre-nightly
  lsn=$(sql "SELECT pg_current_wal_lsn()")
  local what
  what=$(update_rows 100 "$UPDATE_PATTERN" 10)
  log "[$DS] updated pgbench_accounts: $what"
  sql "CHECKPOINT"
  local update_wal
  update_wal=$(lsn_bytes "$lsn")
  if ((chunks)); then
    snapshot nightly
    chunk_diff pre-nightly nightly "$what on the fresh table (the nightly measured above)"
    rm -rf "$D/snap/pre-nightly" "$D/snap/nightly"
  fi

  backups incr
  EXPECTED_NIGHTLY=$(sql "SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts")

  # WAL written after the nightly backup, so that PITR has something to replay.
  lsn=$(sql "SELECT pg_current_wal_lsn()")
  what=$(update_rows 100 "$UPDATE_PATTERN" 20)
  log "[$DS] wrote WAL for PITR to replay: $what"
  local replay_wal
  replay_wal=$(lsn_bytes "$lsn")
  switch_and_archive
  EXPECTED=$(sql "SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts")
  record source dataset update_wal_bytes="$update_wal" replay_wal_bytes="$replay_wal"

  if [[ $PITR == 1 ]]; then
    for v in "${VARIANTS[@]}"; do pitr "$v"; done
  fi
  if ((RESTORE_ROUNDS > 0)); then restore_rounds; fi
  if [[ $PITR_FLOOR == 1 ]]; then
    for v in "${VARIANTS[@]}"; do
      if [[ $v == tidemark-z* ]]; then pitr_floor "$v"; break; fi
    done
  fi
  if [[ $DISK_FLOOR == 1 ]]; then
    for v in "${VARIANTS[@]}"; do
      if [[ $v == tidemark-z* ]]; then disk_floor "$v"; break; fi
    done
  fi
  if [[ $DELTA == 1 ]]; then
    for v in "${VARIANTS[@]}"; do delta "$v"; done
  fi
  for v in "${VARIANTS[@]}"; do wal_stats "$v"; done

  if ((chunks)); then
    log "[$DS] chunk-size measurement: 0.1% and 1% updates, random rows and aid modulo"
    local n=0 every pattern
    for pattern in random modulo; do
      for every in 1000 100; do
        n=$((n + 1))
        # Settle first: a full scan sets the hint bits left by the previous update (which would
        # otherwise show up as changed pages of this one), then checkpoint and copy.
        sql "SELECT sum(abalance) FROM pgbench_accounts" >/dev/null
        snapshot "base$n"
        what=$(update_rows "$every" "$pattern" $((30 + n)))
        snapshot "after$n"
        chunk_diff "base$n" "after$n" "$what, table settled after earlier updates"
        rm -rf "${D:?}/snap/base$n" "${D:?}/snap/after$n"
      done
    done
  fi
  stop_pg "$D/pgdata"
  load1=$(cut -d' ' -f1-3 /proc/loadavg)

  local table
  table=$(python3 "$BENCH/report.py" table "$D/results.jsonl" "$DS" \
    "date=$(date -u '+%Y-%m-%d %H:%M UTC')" \
    "tidemark commit=$COMMIT (agent binary sha256 $BIN_SHA)" \
    "pgBackRest=$PGBR_VERSION, process-max=$PGBR_PROCESS_MAX" \
    "machine=$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM" \
    "load average at start / end=$load0 / $load1" \
    "parameters=SCALE=$SCALE, PITR=$PITR, PITR_FLOOR=$PITR_FLOOR, DISK_FLOOR=$DISK_FLOOR, UPDATE_PATTERN=$UPDATE_PATTERN, DROP_CACHES=$DROP_CACHES, QUIET_BUSY=$QUIET_BUSY%, QUIET_MAX_WAIT=${QUIET_MAX_WAIT}s, NICE=${NICE:-none}" |
    python3 "$BENCH/floor.py" "$D/results.jsonl" "$DS")
  echo "$table"
  if [[ -n $RESULTS ]]; then
    printf '\n%s\n' "$table" >>"$RESULTS"
    log "[$DS] results appended to $RESULTS"
  fi
  if [[ $KEEP != 1 ]]; then
    rm -rf "$D"
  fi
}

main() {
  mkdir -p "$WORK"
  cd "$WORK"
  ensure_packages
  build
  log "tidemark $COMMIT, pgBackRest $PGBR_VERSION, variants: ${VARIANTS[*]}, datasets: ${DATASETS[*]}"
  for ds in "${DATASETS[@]}"; do
    run_dataset "$ds"
  done
  D=
}

main
