"""Alerts, adapter rules and the dashboard: promtool checks and unit-tests the rules rendered from the
overlays; the dashboard and adapter rules are checked for what they must show and serve.
(Whether each metric they name really exists is tests/test_k8s_crosscheck.py's job.)"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import k8s_checks as kc
from tests.requirements import require_tool

ALERTS_TEST = kc.K8S / "monitoring" / "alerts-test.yaml"
BROKEN = Path(__file__).parent / "fixtures" / "k8s-broken"
REQUIRED_ALERTS = {"ImgserveP99LatencyHigh", "ImgserveErrorRatioHigh", "ImgserveBackendDown",
                   "ImgserveQueueSaturated", "TritonDown", "TritonPodDown", "TritonQueueSaturated"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool")


@pytest.fixture(scope="module")
def gpu_docs() -> list[kc.Doc]:
    return kc.render(kc.K8S / "overlays" / "gpu", require_tool("kubectl"))


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def unit_test(promtool: str, docs: list[kc.Doc], work: Path) -> subprocess.CompletedProcess[str]:
    kc.rules_file(docs, work / "rules.yaml")
    shutil.copy(ALERTS_TEST, work / "alerts-test.yaml")
    return run_promtool(promtool, "test", "rules", "alerts-test.yaml", cwd=work)


def alert_names(docs: list[kc.Doc]) -> set[str]:
    return {r["alert"] for d in kc.find(docs, "PrometheusRule") for g in d["spec"]["groups"] for r in g["rules"]}


def test_every_required_alert_exists_and_is_unit_tested(gpu_docs: list[kc.Doc]) -> None:
    assert alert_names(gpu_docs) == REQUIRED_ALERTS
    tested = {t["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for t in test["alert_rule_test"]}
    assert tested == REQUIRED_ALERTS


@pytest.mark.parametrize("overlay", ["cpu", "sidecar", "gpu"])
def test_rendered_rules_pass_promtool_check(promtool: str, overlay: str, tmp_path: Path) -> None:
    docs = kc.render(kc.K8S / "overlays" / overlay)
    kc.rules_file(docs, tmp_path / "rules.yaml")
    result = run_promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_as_the_unit_tests_expect(promtool: str, gpu_docs: list[kc.Doc], tmp_path: Path) -> None:
    result = unit_test(promtool, gpu_docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unit_tests_catch_a_broken_alert(promtool: str, gpu_docs: list[kc.Doc], tmp_path: Path) -> None:
    broken = json.loads(json.dumps(gpu_docs))
    for doc in kc.find(broken, "PrometheusRule", "imgserve-gateway"):
        for rule in doc["spec"]["groups"][0]["rules"]:
            if rule["alert"] == "ImgserveBackendDown":
                rule["expr"] = "imgserve_backend_up == 2"   # never true: the alert would never fire
    result = unit_test(promtool, broken, tmp_path)
    assert result.returncode != 0 and "ImgserveBackendDown" in result.stdout + result.stderr


def test_promtool_check_catches_the_broken_fixture(promtool: str, tmp_path: Path) -> None:
    kc.rules_file(kc.load(BROKEN / "objects.yaml"), tmp_path / "rules.yaml")
    result = run_promtool(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "BrokenSyntax" in result.stdout + result.stderr


def test_queue_alert_threshold_is_80_percent_of_the_configured_queue(gpu_docs: list[kc.Doc]) -> None:
    (rule,) = [r for d in kc.find(gpu_docs, "PrometheusRule") for g in d["spec"]["groups"] for r in g["rules"]
               if r["alert"] == "ImgserveQueueSaturated"]
    threshold = float(rule["expr"].rsplit(">", 1)[1])
    assert threshold == int(0.8 * int(kc.gateway_env(gpu_docs)["IMGSERVE_MAX_QUEUE_SIZE"]))


def test_dashboard_shows_what_operators_need() -> None:
    board = json.loads(kc.DASHBOARD.read_text())
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    joined = "\n".join(exprs)
    for needle in ("histogram_quantile(0.50, sum by (model, le) (rate(imgserve_request_duration_seconds_bucket",
                   "histogram_quantile(0.99, sum by (model, le) (rate(imgserve_request_duration_seconds_bucket",
                   "sum by (model) (rate(imgserve_request_duration_seconds_count",
                   "imgserve_batch_size_", "imgserve_queue_depth",
                   "sum by (code) (rate(imgserve_request_errors_total", "nv_inference_queue_duration_us"):
        assert needle in joined, needle
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace", "model"}
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])


def test_dashboard_ships_as_a_grafana_sidecar_configmap(gpu_docs: list[kc.Doc]) -> None:
    config_map = kc.one(gpu_docs, "ConfigMap", "imgserve-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["imgserve.json"]) == json.loads(kc.DASHBOARD.read_text())


def test_adapter_rules_read_the_series_they_discover() -> None:
    for rule in yaml.safe_load(kc.ADAPTER_VALUES.read_text())["rules"]["custom"]:
        (series,) = kc.promql_metric_names(rule["seriesQuery"])
        assert rule["name"]["matches"] == f"^{series}$"
        used = kc.promql_metric_names(rule["metricsQuery"]) | ({series} if "<<.Series>>" in rule["metricsQuery"] else set())
        assert series in used
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
