#!/usr/bin/env bash
# Peak memory of the sidecar draining a backlog of ready WAL segments (issue: memory stays bounded
# whatever the backlog). Builds a data directory whose pg_wal holds N ready segments — hard links
# to one real 16 MiB pgbench segment under N consecutive names, so the source costs one segment
# of disk — and lets `tidemark-agent sidecar` archive all of them into a fresh file:// repository,
# for each backlog size in SIZES, reporting wall time, CPU and peak RSS (/usr/bin/time %M).
#
# Environment: SIZES="50 500", CONCURRENCY=4, WORK=/tmp/tidemark-sidecar-mem,
# SEGMENT=<path of a real WAL segment> (default: one is made with a throwaway cluster and pgbench).
set -euo pipefail
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZES=${SIZES:-50 500}
CONCURRENCY=${CONCURRENCY:-4}
WORK=${WORK:-/tmp/tidemark-sidecar-mem}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
BIN=$SRC/target/release/tidemark-agent
[[ -x $BIN ]] || (cd "$SRC" && cargo build --release -q -p tidemark-agent)
rm -rf "$WORK"
mkdir -p "$WORK"
chown postgres: "$WORK"
as_pg() { runuser -u postgres -- "$@"; }

if [[ -z ${SEGMENT:-} ]]; then
  as_pg "$PGBIN/initdb" -D "$WORK/src" -U postgres --auth=trust >/dev/null
  as_pg "$PGBIN/pg_ctl" -D "$WORK/src" -o "-c listen_addresses='' -c unix_socket_directories='$WORK'" -w start >/dev/null
  as_pg "$PGBIN/pgbench" -h "$WORK" -i -q -s 5 postgres >/dev/null 2>&1
  SEGMENT=$(ls "$WORK/src/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort | head -1)
  cp "$WORK/src/pg_wal/$SEGMENT" "$WORK/segment"
  as_pg "$PGBIN/pg_ctl" -D "$WORK/src" -m immediate stop >/dev/null
  SEGMENT=$WORK/segment
fi
chown postgres: "$SEGMENT"

echo "| ready segments | concurrency | wall (s) | CPU user+sys (s) | peak RSS (MiB) |"
echo "|---|---|---|---|---|"
for n in $SIZES; do
  d=$WORK/pgdata-$n
  rm -rf "$d" "$WORK/repo-$n" "$WORK/state-$n"
  as_pg mkdir -p "$d/pg_wal/archive_status" "$WORK/state-$n"
  for ((i = 0; i < n; i++)); do
    name=$(printf '00000001%08X%08X' $((i / 256 + 1)) $((i % 256)))
    ln "$SEGMENT" "$d/pg_wal/$name"
    as_pg touch "$d/pg_wal/archive_status/$name.ready"
  done
  sync
  t0=$(date +%s.%N)
  as_pg /usr/bin/time -f '%M %U %S' -o "$WORK/time-$n" "$BIN" sidecar --pgdata "$d" \
    --repo "file://$WORK/repo-$n" --state-dir "$WORK/state-$n" --concurrency "$CONCURRENCY" \
    --listen 127.0.0.1:0 >"$WORK/sidecar-$n.log" 2>&1 &
  until (($(find "$WORK/repo-$n/wal" -type f 2>/dev/null | wc -l) >= n)); do sleep 0.1; done
  t1=$(date +%s.%N)
  pkill -TERM -f "^$BIN sidecar --pgdata $d" || true
  wait
  read -r kb u s <"$WORK/time-$n"
  python3 -c "print('| $n | $CONCURRENCY | %.1f | %.1f | %.1f |' % ($t1 - $t0, $u + $s, $kb / 1024))"
  rm -rf "$WORK/repo-$n" "$d"
done
rm -rf "$WORK"
