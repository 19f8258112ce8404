"""deploy/monitoring checked by real tools: promtool, a real Prometheus scraping a server."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from gristmill.client import DecodeClient, Hub, Loader
from gristmill.v1 import decode_pb2
from scripts.k8s_render import render
from scripts.prometheus_rule import prometheus_rule
from scripts.sample_data import make_sample_folder
from tests.helpers import ROOT, Running, spawn_server, stop_process

MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "rules.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
#: Metrics that alerts or panels use before a service exports them: name -> who adds it.
#: docs/monitoring.md lists the same.
AWAITED: dict[str, str] = {}
TRANSFORM = decode_pb2.Transform(buckets=decode_pb2.BucketConfig(image_size=256, downsampling=16))


def exported_metric_names() -> set[str]:
    """Every sample name the installed services can export (prometheus_client's registry)."""
    import gristmill.decode.service  # noqa: F401 - each service registers its metrics
    import gristmill.ingest.service  # noqa: F401
    import gristmill.store.service  # noqa: F401
    with contextlib.suppress(ImportError):
        import gristmill.annotate.metrics  # noqa: F401
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgristmill_[a-z0-9_]+", expr))


def rule_exprs() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 8 rules found" in out.stdout


def test_promtool_check_can_fail(tmp_path: Path) -> None:
    broken = tmp_path / "rules.yaml"
    broken.write_text(RULES.read_text().replace("group_left ()", "group_left"))
    out = subprocess.run([PROMTOOL, "check", "rules", str(broken)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode != 0 and "GristmillDecodeErrorRatioHigh" in out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alerts() -> None:
    tests = MONITORING / "tests" / "rules.test.yaml"
    out = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", tests.read_text()))
    assert len(tested) >= 4, tested


def test_prometheus_rule_wraps_the_same_groups() -> None:
    wrapped = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())
    assert wrapped["kind"] == "PrometheusRule"
    assert wrapped["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert (MONITORING / "prometheus-rule.yaml").read_text() == \
        prometheus_rule(yaml.safe_load(RULES.read_text()))
    out = subprocess.run([sys.executable, "scripts/prometheus_rule.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr


def test_monitoring_kustomization_renders_the_operator_objects() -> None:
    docs = render(MONITORING)
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ConfigMap", "PrometheusRule", "ServiceMonitor", "PodMonitor"}
    assert kinds["ConfigMap"]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(kinds["ConfigMap"]["data"]["gristmill.json"]) == \
        json.loads(DASHBOARD.read_text())
    services = [d for d in render(ROOT / "deploy" / "k8s" / "overlays" / "production")
                if d["kind"] == "Service" and "metrics" in [p["name"] for p in d["spec"]["ports"]]]
    selector = kinds["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    assert len(services) == 4
    assert all(selector.items() <= s["metadata"]["labels"].items() for s in services)
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "metrics"


def test_every_metric_in_rules_and_dashboard_is_exported() -> None:
    exported = exported_metric_names()
    for expr in rule_exprs() + dashboard_exprs():
        missing = metric_names(expr) - exported - set(AWAITED)
        assert not missing, f"{expr} uses metrics no service exports: {missing}"
    for name in AWAITED:
        assert name not in exported, f"{name} is exported now: drop it from AWAITED and the docs"
        assert name in (ROOT / "docs" / "monitoring.md").read_text()
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for wanted in ("gristmill_ingest_rank_batches_total", "gristmill_rpc_duration_seconds_bucket",
                   "gristmill_decode_errors_total", "gristmill_decode_queue_depth",
                   "gristmill_store_bytes_read_total"):
        assert wanted in used


def test_dashboard_is_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "gristmill"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}"


# a real Prometheus --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prom:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=expr)["result"]
        return result

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            got = check()
            if got:
                return got
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.5)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    running = spawn_server(tmp_path / "data")
    yield running
    stop_process(running)


@pytest.fixture
def prometheus(running: Running, tmp_path: Path) -> Iterator[Prom]:
    """Prometheus with the shipped config: targets -> the test server, 1 s intervals,
    rule_files -> the shipped rules with every ``for`` at 0 (the promtool tests cover ``for``).
    """
    assert running.metrics_port
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    [job] = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{running.metrics_port}"]}]
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    config["rule_files"] = [str(tmp_path / "rules.yaml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    prom = Prom(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.3)
        yield prom
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def value(result: list[dict[str, Any]]) -> float:
    return sum(float(r["value"][1]) for r in result)


def test_real_prometheus_scrapes_a_server_and_fires_an_alert(
        running: Running, prometheus: Prom, tmp_path: Path) -> None:
    prom = prometheus
    up = prom.wait("the target to be up", lambda: prom.query('up{job="gristmill"} == 1'))
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{running.metrics_port}"

    groups = prom.get("/api/v1/rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert len(loaded) == 8 and all(r["health"] == "ok" for r in loaded.values()), loaded

    # traffic moves the series
    make_sample_folder(tmp_path / "photos", count=6, max_side=256)
    with Hub(running.address, running.admin_key) as hub:
        hub.import_folder("photos", tmp_path / "photos")
        hub.commit_version("photos")
    prom.wait("store bytes written", lambda: value(
        prom.query("gristmill_store_bytes_written_total")) > 0)
    calls = 'sum(gristmill_rpc_requests_total{method="ListDatasets"})'
    with Hub(running.address, running.admin_key) as hub:
        hub.list_datasets()
    before = value(prom.wait("ListDatasets counted", lambda: prom.query(calls)))
    with Hub(running.address, running.admin_key) as hub:
        for _ in range(3):
            hub.list_datasets()
    prom.wait("ListDatasets to move", lambda: value(prom.query(calls)) >= before + 3)
    with Loader(running.address, "photos", batch_size=2, image_size=128,
                api_key=running.admin_key, rank=1, world_size=2) as loader:
        batches = list(loader)
    assert batches
    progress = prom.wait("per-rank progress", lambda: prom.query(
        'gristmill_ingest_rank_batches_total{rank="1"}'))
    assert value(progress) == len(batches)
    free = prom.query('gristmill_volume_free_bytes{volume="data"}')
    assert value(free) > 0

    # no alert about decoding yet; then a burst of corrupt images fires one
    alert = "GristmillDecodeErrorRatioHigh"
    firing = f'ALERTS{{alertname="{alert}", alertstate="firing"}}'
    assert not prom.query(firing)
    with DecodeClient(running.address, running.admin_key) as client:
        def corrupt(n: int) -> None:
            samples = [decode_pb2.DecodeSample(id=f"bad{i}", image=decode_pb2.ImageSource(
                data=b"\xff\xd8\xff" + bytes(64))) for i in range(n)]
            list(client.decode([decode_pb2.DecodeRequest(transform=TRANSFORM,
                                                         samples=samples)]))
        corrupt(1)  # the series appears; a rate needs it seen before the burst
        prom.wait("the decode error series", lambda: prom.query(
            "gristmill_decode_errors_total"))
        time.sleep(1.5)
        corrupt(40)
    fired = prom.wait(f"{alert} to fire", lambda: prom.query(firing))
    assert fired[0]["metric"]["job"] == "gristmill"
    reason = fired[0]["metric"]["reason"]
    alerts = prom.get("/api/v1/alerts")["alerts"]
    [api_alert] = [a for a in alerts if a["labels"]["alertname"] == alert]
    assert api_alert["state"] == "firing"
    assert f"with reason {reason}" in api_alert["annotations"]["summary"]
    others = {a["labels"]["alertname"] for a in alerts} - {alert}
    assert not others, f"alerts that should not fire on a healthy server: {others}"

    # every dashboard query runs on the real Prometheus
    for expr in dashboard_exprs():
        prom.query(expr.replace("$__rate_interval", "1m").replace("$job", ".*"))
