#!/usr/bin/env bash
# Validates deploy/ offline: builds the kustomization, checks every resource against the Kubernetes
# OpenAPI schemas (kubernetes-validate --strict, from PyPI), then checks the rules the schemas
# cannot: Pod Security Standards "restricted" on every pod, secrets only from Secrets, the CronJob
# safety settings. No cluster is needed.
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
