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
