#!/usr/bin/env bash
# Peak memory of backup --pgdata, restore, expire and check as the cluster grows (issue 16: "peak
# memory bounded by configuration, not by database size: show it flat from scale 100 to a
# cluster 10x larger in file count and bytes").
#
# One PostgreSQL 15 cluster (pgbench -i -s $SCALE) archives with `tidemark-agent wal-push`. It is
# measured as it is, then grown in place to each size in SIZES by adding synthetic relation-like
# files to its database directory (base/<oid>/<relfilenode>[.<segment>]; PostgreSQL ignores
# relfilenodes no catalog names): many small files of 1-8 pages plus 1 GiB segment files for the
# bulk of the bytes. Every 8 KiB page is 4 KiB of random bytes and 4 KiB of zeros: every page is
# unique (no dedup shortcut) and compresses about 2:1 like real table data. No sparse files.
#
# At each size, in a fresh file:// repository (archive_command is switched to it first):
#   backup-1      tidemark-agent backup --pgdata (full, no parent)
#   backup-2      after rewriting every 10th small synthetic file and the first 10% of the bulk
#                 bytes: a backup with a parent manifest
#   restore       tidemark-restore restore --target immediate of backup-2 into an empty directory
#   expire        tidemark-agent expire --retain-last 1 --gc-grace 0s (drops backup-1, condemns
#                 the packs only it used), then expire-2: the same again (deletes them)
#   check         tidemark-restore check, and check --read-data (READ_DATA=1)
# each under /usr/bin/time -f '%e %M %U %S' (wall, peak RSS of the process, CPU), as postgres.
#
# Environment:
#   SIZES="1:3000 3:10000 10:30000"  targets GiB:files of the data directory (pg_wal excluded); the
#                            cluster as pgbench made it is always measured first ("base")
#   SCALE=10                 pgbench scale of the base cluster
#   READ_DATA=1              also measure check --read-data (0: skip)
#   SPARSE_GIB=              after SIZES, grow to this many GiB with sparse zero-page segments
#                            (no disk; every page a chunk reference) and measure again without
#                            the restore (e.g. SPARSE_GIB=100 after 10:30000: 10x the bytes)
#   TIDEMARK_BIN=DIR         dir with tidemark-agent and tidemark-restore
#                            (default: $CARGO_TARGET_DIR/release or target/release; built if missing)
#   TIDEMARK_COMMIT=...      the commit those binaries were built from (for the report; default:
#                            "HEAD <hash>, binaries from DIR")
#   WORK=/tmp/tidemark-memory  work directory (deleted at the end unless KEEP=1)
#   RESULTS=bench/results.md where the Markdown table is appended ("" = stdout only)
#   PORT=55442               port of the cluster (unix socket only)
# Needs root (everything that touches the data runs as postgres via runuser), PostgreSQL 15 in
# /usr/lib/postgresql/15/bin and /usr/bin/time. Disk: about 2.6x the largest size in WORK.
set -euo pipefail
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$BENCH/.." && pwd)
SIZES=${SIZES:-1:3000 3:10000 10:30000}
SPARSE_GIB=${SPARSE_GIB:-}
SCALE=${SCALE:-10}
READ_DATA=${READ_DATA:-1}
WORK=${WORK:-/tmp/tidemark-memory}
RESULTS=${RESULTS-$BENCH/results.md}
PORT=${PORT:-55442}
KEEP=${KEEP:-0}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
TIDEMARK_BIN=${TIDEMARK_BIN:-${CARGO_TARGET_DIR:-$SRC/target}/release}

[[ $(id -u) == 0 ]] || { echo "memory.sh: run as root" >&2; exit 2; }
[[ -x /usr/bin/time ]] || { echo "memory.sh: needs /usr/bin/time (apt-get install time)" >&2; exit 2; }
log() { printf '%s [memory] %s\n' "$(date +%T)" "$*" >&2; }
as_pg() { runuser -u postgres -- "$@"; }
sql() { as_pg "$PGBIN/psql" -h "$WORK/sock" -p "$PORT" -U postgres -d postgres -X -q -At -v ON_ERROR_STOP=1 -c "$1"; }

if [[ ! -x $TIDEMARK_BIN/tidemark-agent || ! -x $TIDEMARK_BIN/tidemark-restore ]]; then
  log "building tidemark into $TIDEMARK_BIN/.."
  (cd "$SRC" && CARGO_TARGET_DIR=$(dirname "$TIDEMARK_BIN") cargo build --release -q -p tidemark-agent -p tidemark-restore)
fi
COMMIT=${TIDEMARK_COMMIT:-"HEAD $(git -C "$SRC" rev-parse --short=12 HEAD 2>/dev/null || echo unknown), binaries from $TIDEMARK_BIN"}

if [[ -e $WORK/pgdata/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$WORK/pgdata" -m immediate stop >/dev/null 2>&1 || true; fi
rm -rf "$WORK"
mkdir -p "$WORK/bin" "$WORK/sock" "$WORK/m"
install -m 0755 "$TIDEMARK_BIN/tidemark-agent" "$TIDEMARK_BIN/tidemark-restore" "$WORK/bin/"
BIN=$WORK/bin
chown -R postgres: "$WORK"
chmod 0755 "$WORK"
PG=$WORK/pgdata
ROWS=$WORK/rows.tsv
: >"$ROWS"

cleanup() {
  if [[ -e $PG/postmaster.pid ]]; then as_pg "$PGBIN/pg_ctl" -D "$PG" -m fast stop >/dev/null 2>&1 || true; fi
  if [[ $KEEP != 1 ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------
log "cluster: initdb, pgbench -i -s $SCALE"
as_pg "$PGBIN/initdb" -D "$PG" --data-checksums -U postgres --auth=trust -E UTF8 --locale=C >"$WORK/initdb.log"
cat >>"$PG/postgresql.conf" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$WORK/sock'
shared_buffers = 256MB
max_wal_size = 4GB
wal_level = replica
archive_mode = on
archive_command = '$BIN/tidemark-agent wal-push --repo file://$WORK/repo-base %p'
EOF
as_pg "$PGBIN/pg_ctl" -D "$PG" -l "$WORK/postgresql.log" -w start >/dev/null
as_pg "$PGBIN/pgbench" -h "$WORK/sock" -p "$PORT" -i -q -s "$SCALE" postgres >"$WORK/pgbench.log" 2>&1
sql "CHECKPOINT"
DBDIR=$PG/base/$(sql "SELECT oid FROM pg_database WHERE datname = 'postgres'")

data_files() { find "$PG" -path "$PG/pg_wal" -prune -o -type f -print | wc -l; }
data_bytes() { du -sb --exclude=pg_wal "$PG" | cut -f1; }

# Adds synthetic relation files to $DBDIR until the data directory holds $1 bytes in $2 files
# (prints nothing; idempotent over growing targets: names continue where the last call stopped).
grow() {
  python3 - "$DBDIR" "$1" "$2" "$(data_bytes)" "$(data_files)" <<'PY'
import os, sys
d, want_b, want_f, have_b, have_f = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
PAGE, SEG = 8192, 1 << 30
state = os.path.join(d, "..", "..", "..", "grow.state")
nxt_small, nxt_big = 3_000_000, 4_000_000
if os.path.exists(state):
    nxt_small, nxt_big = map(int, open(state).read().split())
def pages(n):
    # n pages: 4 KiB random + 4 KiB zeros each, written 128 pages at a time.
    zero = bytes(4096)
    while n > 0:
        k = min(n, 128)
        r = os.urandom(4096 * k)
        yield b"".join(r[i * 4096:(i + 1) * 4096] + zero for i in range(k))
        n -= k
def write(path, npages):
    with open(path, "wb") as f:
        for b in pages(npages):
            f.write(b)
need_f, need_b = max(0, want_f - have_f), max(0, want_b - have_b)
# small files: 1..8 pages (4.5 on average), capped at a third of the bytes to add
small_pages = [1 + i % 8 for i in range(need_f)]
while need_f and sum(small_pages) * PAGE > need_b / 3:
    small_pages = [max(1, p // 2) for p in small_pages]
    if all(p == 1 for p in small_pages):
        break
big_bytes = max(0, need_b - sum(small_pages) * PAGE)
nbig = (big_bytes + SEG - 1) // SEG
small_pages = small_pages[: max(0, need_f - nbig)]
for p in small_pages:
    write(os.path.join(d, str(nxt_small)), p)
    nxt_small += 1
# big: relations of 1 GiB segments (relfilenode, .1, .2, ...), 8 segments per relation
seg = 0
while big_bytes > 0:
    n = min(big_bytes, SEG) // PAGE or 1
    name = str(nxt_big) + (f".{seg}" if seg else "")
    write(os.path.join(d, name), n)
    big_bytes -= n * PAGE
    seg += 1
    if seg == 8 or big_bytes <= 0:
        nxt_big, seg = nxt_big + 1, 0
open(state, "w").write(f"{nxt_small} {nxt_big}")
PY
  chown -R postgres: "$DBDIR"
}

# The change backup-2 sees: every 10th small synthetic file rewritten with new random pages, and
# the first 10% of the bulk bytes (one contiguous range of the big files, so that some packs of
# backup-1 hold nothing backup-2 uses: expire has whole packs to condemn and delete).
churn() {
  python3 - "$DBDIR" <<'PY'
import os, sys
d = sys.argv[1]
ours = [n for n in os.listdir(d) if n.split(".")[0].isdigit() and int(n.split(".")[0]) >= 3_000_000]
key = lambda n: (int(n.split(".")[0]), int(n.split(".")[1]) if "." in n else 0)
small = sorted((n for n in ours if int(n.split(".")[0]) < 4_000_000), key=key)
big = sorted((n for n in ours if 4_000_000 <= int(n.split(".")[0]) < 5_000_000), key=key)
zero = bytes(4096)
def rewrite(p, npages):
    with open(p, "r+b") as f:
        while npages > 0:
            k = min(npages, 128)
            r = os.urandom(4096 * k)
            f.write(b"".join(r[i * 4096:(i + 1) * 4096] + zero for i in range(k)))
            npages -= k
for n in small[::10]:
    rewrite(os.path.join(d, n), os.path.getsize(os.path.join(d, n)) // 8192)
left = sum(os.path.getsize(os.path.join(d, n)) for n in big) // 10 // 8192
for n in big:
    if left <= 0:
        break
    k = min(left, os.path.getsize(os.path.join(d, n)) // 8192)
    rewrite(os.path.join(d, n), k)
    left -= k
PY
}

# measure SIZE STEP cmd...: runs cmd as postgres under /usr/bin/time, records a row.
measure() {
  local size=$1 step=$2
  shift 2
  local out=$WORK/m/$size-$step
  if ! as_pg /usr/bin/time -f '%e %M %U %S' -o "$out.time" "$@" >"$out.log" 2>&1; then
    log "$size $step FAILED:"
    tail -n 20 "$out.log" >&2
    exit 1
  fi
  local e kb u s
  read -r e kb u s < <(tail -n 1 "$out.time")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$size" "$FILES" "$BYTES" "$step" "$e" "$kb" "$u" "$s" >>"$ROWS"
  log "$size $step: ${e}s, peak RSS $((kb / 1024)) MiB"
}

# Points archive_command at a fresh repository and waits until the switch segment is in it.
use_repo() {
  REPO=$WORK/repo-$1
  sql "ALTER SYSTEM SET archive_command = '$BIN/tidemark-agent wal-push --repo file://$REPO %p'" >/dev/null
  sql "SELECT pg_reload_conf()" >/dev/null
  sleep 1
  sql "SELECT pg_switch_wal()" >/dev/null
  local t=0
  while compgen -G "$PG/pg_wal/archive_status/*.ready" >/dev/null; do
    sleep 0.2
    t=$((t + 1))
    ((t < 3000)) || { log "archiving stalled"; exit 1; }
  done
}

MANIFEST=()
run_size() {
  local size=$1
  use_repo "$size"
  sql "CHECKPOINT" >/dev/null
  sync
  FILES=$(data_files)
  BYTES=$(data_bytes)
  log "size $size: $FILES files, $((BYTES >> 20)) MiB (pg_wal excluded)"
  local env=(env PGHOST="$WORK/sock" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres)
  measure "$size" backup-1 "${env[@]}" "$BIN/tidemark-agent" backup --pgdata "$PG" --repo "file://$REPO" --json
  churn
  sql "CHECKPOINT" >/dev/null
  sync
  measure "$size" backup-2 "${env[@]}" "$BIN/tidemark-agent" backup --pgdata "$PG" --repo "file://$REPO" --json
  MANIFEST+=("$size $(find "$REPO/backups" -type f -printf '%s %p\n' | sort -n | tail -n 1 | cut -d' ' -f1) $(du -sb "$REPO" | cut -f1)")
  if [[ ${NO_RESTORE:-0} != 1 ]]; then
    install -d -m 0700 -o postgres -g postgres "$WORK/restore"
    measure "$size" restore "$BIN/tidemark-restore" restore --pgdata "$WORK/restore" --repo "file://$REPO" --target immediate --json
    rm -rf "$WORK/restore"
  fi
  measure "$size" expire "$BIN/tidemark-agent" expire --repo "file://$REPO" --retain-last 1 --gc-grace 0s --json
  measure "$size" expire-2 "$BIN/tidemark-agent" expire --repo "file://$REPO" --retain-last 1 --gc-grace 0s --json
  measure "$size" check "$BIN/tidemark-restore" check --repo "file://$REPO" --json
  if [[ $READ_DATA == 1 ]]; then
    measure "$size" check-read-data "$BIN/tidemark-restore" check --read-data --repo "file://$REPO" --json
  fi
  rm -rf "$REPO"
}

T0=$(date +%s)
run_size base
for s in $SIZES; do
  gib=${s%%:*} files=${s##*:}
  log "growing to $gib GiB, $files files"
  grow "$((gib << 30))" "$files"
  run_size "${gib}GiB"
done
if [[ -n $SPARSE_GIB ]]; then
  # Sparse 1 GiB segments of zero pages (relfilenodes 5000000…, untouched by churn) up to
  # SPARSE_GIB GiB: no disk, but every 8 KiB page is a chunk reference in every manifest, so
  # the per-chunk terms show; all pages are one chunk, so nothing is compressed or stored, and
  # the restore (which would write every byte) is left out.
  have=$(data_bytes)
  want=$((SPARSE_GIB << 30))
  n=0
  while ((have < want)); do
    f=$DBDIR/$((5000000 + n / 8))
    if ((n % 8)); then f=$f.$((n % 8)); fi
    truncate -s 1G "$f"
    chown postgres: "$f"
    have=$((have + (1 << 30)))
    n=$((n + 1))
  done
  log "sparse: $n zero-filled 1 GiB segments added"
  NO_RESTORE=1 run_size "${SPARSE_GIB}GiB-sparse"
fi
as_pg "$PGBIN/pg_ctl" -D "$PG" -m fast stop >/dev/null

TABLE=$(python3 - "$ROWS" "$COMMIT" "$SCALE" "$(($(date +%s) - T0))" "${MANIFEST[@]}" <<'PY'
import sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
commit, scale, total = sys.argv[2], sys.argv[3], sys.argv[4]
man = {a.split()[0]: a.split()[1:] for a in sys.argv[5:]}
out = []
out.append("| size | files | GiB | step | wall (s) | CPU user+sys (s) | peak RSS (MiB) |")
out.append("|---|---:|---:|---|---:|---:|---:|")
by = collections.OrderedDict()
for size, files, b, step, e, kb, u, s in rows:
    out.append(f"| {size} | {int(files):,} | {int(b) / 2**30:.2f} | {step} | {float(e):.1f} | {float(u) + float(s):.1f} | {int(kb) / 1024:.0f} |")
    by.setdefault(step, []).append((int(files), int(b), int(kb) / 1024))
out.append("")
out.append("| size | manifest of backup-2 (MiB) | repository after backup-2 (MiB) |")
out.append("|---|---:|---:|")
for k, (m, r) in man.items():
    out.append(f"| {k} | {int(m) / 2**20:.1f} | {int(r) / 2**20:.0f} |")
out.append("")
out.append("Peak RSS at each size, and its slope: a least-squares line through the grown sizes (the base cluster left out: there the bounded buffers are not filled), per GiB of data directory and per 1000 files (both grew together, so these are two views of one slope, not two costs):")
out.append("")
out.append("| step | peak RSS at each size (MiB) | largest / smallest | MiB per GiB | MiB per 1000 files |")
out.append("|---|---|---:|---:|---:|")
for step, v in by.items():
    g = v[1:] if len(v) > 2 else v
    def slope(xs, ys):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    per_gib = slope([x[1] / 2**30 for x in g], [x[2] for x in g])
    per_kfiles = slope([x[0] / 1000 for x in g], [x[2] for x in g])
    out.append(f"| {step} | {' → '.join(f'{x[2]:.0f}' for x in v)} | {v[-1][2] / v[0][2]:.2f} | {per_gib:.1f} | {per_kfiles:.1f} |")
print("\n".join(out))
print(f"\n(tidemark {commit}; base = pgbench -i -s {scale}; total run {total} s)")
PY
)
echo "$TABLE"
if [[ -n $RESULTS ]]; then
  {
    printf '\n## Memory as the cluster grows (bench/memory.sh), %s\n\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/^Mem:/ {print $2}') GiB RAM, shared (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)). SIZES=\"$SIZES\"."
    echo
    echo "$TABLE"
  } >>"$RESULTS"
  log "appended to $RESULTS"
fi
