"""The alert rules pass promtool, and a real Prometheus (Debian's package) that
scrapes the three running services evaluates every expression of the dashboards
and the rules; each one parses and refers only to metrics the services export."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from atelier.dev.demo_assets import bar_chart
from tests.conftest import free_port
from tests.deploy.promql import (
    dashboard_expressions,
    metric_names,
    rule_expressions,
    rule_groups,
)


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (make test installs Debian's prometheus package)"
    return path


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rules") / "atelier-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule_groups()}, sort_keys=False))
    return path


def test_promtool_checks_the_rules(rules_file):
    result = subprocess.run([tool("promtool"), "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in result.stdout


def test_every_alert_has_a_runbook_and_severity():
    for group in rule_groups():
        for rule in group["rules"]:
            assert rule["annotations"]["runbook"].strip(), rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
    alerts = set(rule_expressions())
    assert {"AtelierGrpcErrorRatioHigh", "AtelierGrpcLatencyP95High",
            "AtelierGenerationQueueSaturated", "AtelierAnalysisQueueSaturated",
            "AtelierTrainingJobFailed", "AtelierGenerationStalled"} <= alerts


def test_metric_name_extraction():
    assert metric_names('sum by (le, job) (rate(a_bucket{x="y{z}"}[5m])) / b offset 5m') == {
        "a_bucket", "b"}
    assert metric_names('x > 0 unless on (job) max by (job) (y_total{job=~"a.*"})') == {
        "x", "y_total"}
    assert metric_names('label_replace(m{a="b"}, "dst", "$1", "src", "(.*)")') == {"m"}


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _exported_names(metrics_port: int) -> set[str]:
    """Metric names one service exposes, declared (# TYPE) or sampled."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=10).read().decode()
    names = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names |= {name, f"{name}_total"} if kind == "counter" else {name}
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


@pytest.fixture(scope="module")
def prometheus(local_services, rules_file, tmp_path_factory):
    """Prometheus on loopback scraping the services every second, with the rules loaded."""
    from atelier.client import AnalysisClient, GenerationClient, TrainingClient

    # Some traffic, so that request, batch and token series exist.
    with GenerationClient(local_services.targets["generation"]) as client:
        client.generate("a red fox", steps=2, width=64, height=64)
    with AnalysisClient(local_services.targets["analysis"]) as client:
        client.analyze(bar_chart(), instruction="What is shown?", max_new_tokens=4)
    with TrainingClient(local_services.targets["training"]) as client:
        list(client.list_jobs())
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {"job_name": f"atelier-{name}",
             "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"],
                                 "labels": {"namespace": "atelier"}}]}
            for name, metrics_port in local_services.metrics_ports.items()],
    }
    (root / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={root / 'prometheus.yml'}",
         f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                result = _get(f"{base}/api/v1/query?query="
                              + urllib.parse.quote("count_over_time(up[1m]) >= 3 and up == 1"))
                if len(result["data"]["result"]) == 3:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape the 3 services"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def test_prometheus_evaluates_every_expression(prometheus, local_services):
    exported = set(_get(f"{prometheus}/api/v1/label/__name__/values")["data"])
    for metrics_port in local_services.metrics_ports.values():
        exported |= _exported_names(metrics_port)
    assert {"grpc_server_handled_total", "atelier_generation_images_total",
            "atelier_analysis_generated_tokens_total", "atelier_training_steps_total"} <= exported
    expressions = {**dashboard_expressions(), **rule_expressions()}
    assert len(expressions) > 50
    for where, expr in expressions.items():
        reply = _get(f"{prometheus}/api/v1/query?query=" + urllib.parse.quote(expr))
        assert reply["status"] == "success", f"{where}: {reply}"
        unknown = metric_names(expr) - exported
        assert not unknown, f"{where} refers to metrics no service exports: {unknown}"
    # The series the dashboards are about are really there after the traffic.
    images = _get(f"{prometheus}/api/v1/query?query=atelier_generation_images_total")
    assert images["data"]["result"][0]["metric"]["job"] == "atelier-generation"


def test_prometheus_evaluates_the_alert_rules(prometheus):
    deadline = time.monotonic() + 30
    while True:
        groups = _get(f"{prometheus}/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        assert time.monotonic() < deadline, "rules were not evaluated"
        time.sleep(0.5)
    assert len(rules) == len(rule_expressions())
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    # No alert fires on healthy services.
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing, firing
