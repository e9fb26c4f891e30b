#!/usr/bin/env bash
# Validates deploy/ offline: builds the kustomization, checks every resource against the Kubernetes
# OpenAPI schemas (kubernetes-validate --strict, from PyPI), then checks the rules the schemas
# cannot: Pod Security Standards "restricted" on every pod, secrets only from Secrets, the CronJob
# safety settings; then the alert rules (promtool check and unit tests, deploy/alerts/) and the
# Grafana dashboard's shape. No cluster is needed.
#
# kubectl (for 'kubectl kustomize') is used when installed; otherwise Debian's kubernetes-client
# is tried. If neither is available, each file listed in deploy/kustomization.yaml is validated
# on its own (the same resources, without kustomize's image rewrite) and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install -q --disable-pip-version-check kubernetes-validate
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
if ! command -v kubectl >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends kubernetes-client >/dev/null 2>&1 || true
fi
if command -v kubectl >/dev/null && kubectl kustomize deploy/ >"$out" 2>/dev/null; then
  echo "validate-deploy: built deploy/ with kubectl kustomize"
else
  echo "validate-deploy: kubectl kustomize is not available; validating the files listed in deploy/kustomization.yaml one by one"
  python3 - deploy/kustomization.yaml >"$out" <<'PY'
import sys, yaml, pathlib
k = yaml.safe_load(open(sys.argv[1]))
base = pathlib.Path(sys.argv[1]).parent
docs = []
for r in k["resources"]:
    docs.extend(d for d in yaml.safe_load_all(open(base / r)) if d)
yaml.safe_dump_all(docs, sys.stdout)
PY
fi
kubernetes-validate --strict --quiet - <"$out"
python3 - "$out" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []
def bad(where, what):
    problems.append(f"{where}: {what}")
secretish = ("PASSWORD", "SECRET", "ACCESS_KEY", "TOKEN")
kinds = {d["kind"] for d in docs}
for need in ("Namespace", "StatefulSet", "CronJob", "NetworkPolicy", "ServiceAccount"):
    if need not in kinds:
        bad("deploy/", f"no {need}")
for d in docs:
    name = f'{d["kind"]}/{d["metadata"]["name"]}'
    if d["kind"] == "Namespace":
        if d["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") != "restricted":
            bad(name, "does not enforce the restricted Pod Security Standard")
    if d["kind"] == "ServiceAccount" and d.get("automountServiceAccountToken") is not False:
        bad(name, "mounts a service account token")
    if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
        bad(name, "tidemark needs no Kubernetes API rights")
    pod = None
    if d["kind"] == "StatefulSet":
        pod = d["spec"]["template"]["spec"]
    if d["kind"] == "CronJob":
        s = d["spec"]
        for k, v in (("concurrencyPolicy", "Forbid"),):
            if s.get(k) != v:
                bad(name, f"{k} is not {v}")
        for k in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
            if k not in s:
                bad(name, f"no {k}")
        j = s["jobTemplate"]["spec"]
        for k in ("activeDeadlineSeconds", "backoffLimit"):
            if k not in j:
                bad(name, f"no {k}")
        pod = j["template"]["spec"]
    if pod is None:
        continue
    if pod.get("automountServiceAccountToken") is not False:
        bad(name, "pod mounts a service account token")
    psc = pod.get("securityContext", {})
    if psc.get("runAsNonRoot") is not True:
        bad(name, "pod securityContext.runAsNonRoot is not true")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        bad(name, "pod seccompProfile is not RuntimeDefault")
    for v in pod.get("volumes", []):
        if "hostPath" in v:
            bad(name, f"volume {v['name']} is a hostPath")
        if "emptyDir" in v and "sizeLimit" not in (v["emptyDir"] or {}):
            bad(name, f"emptyDir {v['name']} has no sizeLimit")
    for c in pod.get("initContainers", []) + pod["containers"]:
        cn = f"{name} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(cn, "allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(cn, "readOnlyRootFilesystem is not true")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            bad(cn, "does not drop ALL capabilities")
        if sc.get("privileged") or sc.get("runAsUser") == 0:
            bad(cn, "runs privileged or as root")
        if not c.get("resources", {}).get("requests"):
            bad(cn, "has no resource requests")
        for e in c.get("env", []):
            if any(s in e["name"].upper() for s in secretish) and "value" in e:
                bad(cn, f"env {e['name']} is inlined; take it from a Secret")
        for f in c.get("envFrom", []):
            if "secretRef" not in f:
                bad(cn, "envFrom other than a Secret")
if problems:
    print("validate-deploy: FAILED", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"validate-deploy: {len(docs)} resources pass the schemas and the restricted/secret/CronJob rules")
PY

# Alerts: the plain rule file passes promtool's checks and unit tests (every alert fires on a
# series that should fire it and not on its neighbour), and the PrometheusRule carries exactly
# its groups. The PrometheusRule is not in kustomization.yaml (its CRD is not part of Kubernetes'
# schemas), so it is checked here on its own.
if ! command -v promtool >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
command -v promtool >/dev/null || { echo "validate-deploy: promtool is missing (Debian: apt-get install prometheus; scripts/install-deps.sh)" >&2; exit 1; }
promtool check rules deploy/alerts/rules.yaml
promtool test rules deploy/alerts/tests.yaml
python3 - <<'PY'
import json, sys, yaml
plain = yaml.safe_load(open("deploy/alerts/rules.yaml"))
crd = yaml.safe_load(open("deploy/prometheus-rules.yaml"))
problems = []
if crd.get("apiVersion") != "monitoring.coreos.com/v1" or crd.get("kind") != "PrometheusRule":
    problems.append("deploy/prometheus-rules.yaml is not a monitoring.coreos.com/v1 PrometheusRule")
if crd.get("spec", {}).get("groups") != plain["groups"]:
    problems.append("deploy/prometheus-rules.yaml's groups differ from deploy/alerts/rules.yaml")
tests = yaml.safe_load(open("deploy/alerts/tests.yaml"))
alerts = {r["alert"] for g in plain["groups"] for r in g["rules"] if "alert" in r}
tested = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", [])}
for a in sorted(alerts - tested):
    problems.append(f"alert {a} has no promtool unit test")
fires = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", []) if c.get("exp_alerts")}
quiet = {c["alertname"] for t in tests["tests"] for c in t.get("alert_rule_test", []) if not c.get("exp_alerts")}
for a in sorted(alerts - fires):
    problems.append(f"alert {a} is never shown firing")
for a in sorted(alerts - quiet):
    problems.append(f"alert {a} is never shown quiet")
# The Grafana dashboard: JSON a Grafana can import (title, uid, schemaVersion, panels with a
# type, a position and Prometheus queries). tests/metrics.rs checks its metric names exist.
d = json.load(open("deploy/grafana-dashboard.json"))
for k in ("title", "uid", "schemaVersion", "panels"):
    if k not in d:
        problems.append(f"grafana-dashboard.json has no {k}")
ids = set()
for p in d.get("panels", []):
    where = f"grafana-dashboard.json panel {p.get('title')!r}"
    if not isinstance(p.get("id"), int) or p["id"] in ids:
        problems.append(f"{where}: id missing or repeated")
    ids.add(p.get("id"))
    if not p.get("type") or not p.get("title"):
        problems.append(f"{where}: no type or title")
    g = p.get("gridPos", {})
    if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")) or g.get("x", 0) + g.get("w", 0) > 24:
        problems.append(f"{where}: bad gridPos {g}")
    if not p.get("targets") or not all(t.get("expr") and t.get("refId") for t in p["targets"]):
        problems.append(f"{where}: a target without expr or refId")
if problems:
    print("validate-deploy: FAILED", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"validate-deploy: {len(alerts)} alerts unit-tested, the PrometheusRule matches, the dashboard has {len(ids)} panels")
PY
