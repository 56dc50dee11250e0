"""monitoring/: the alert rules pass promtool's checks and unit tests, the Grafana dashboard and the rules name
only metrics that exist, and a real Prometheus (Debian's binary) scraping a real TorchServe reads the handler's
metrics back as the clients saw them, evaluates every rule and dashboard query, and sees a worker die."""

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest
import requests
import yaml

from tests.conftest import ROOT
from tests.ts_server import processes_under, serving
from tools import drift_check, torchserve_ctl
from training.data import render_sign

MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "gtsrb.json"
# Metrics that do not come from TorchServe: Prometheus's own, the blackbox exporter's, the drift report's.
OTHER_METRICS = {"up", "probe_success", *drift_check.METRICS}
GRAFANA_VARS = {"$__rate_interval": "1m", "$instance": ".*"}


def binary(name: str) -> str:
    """A Debian package's program; CI installs them (.ci/run), elsewhere the test says what is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: apt-get install -y prometheus prometheus-blackbox-exporter"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


def declared_metrics() -> set[str]:
    """Every metric TorchServe may export: metrics.yaml declares the frontend's and the handler's."""
    doc = yaml.safe_load((ROOT / "metrics.yaml").read_text())
    return {m["name"] for section in doc.values() if isinstance(section, dict) for ms in section.values() for m in ms}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges and label lists removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)|\bgroup_(left|right)\b(\s*\([^)]*\))?", " ", expr)
    expr = re.sub(r"\boffset\s+\w+", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        after = expr[m.end() :].lstrip()
        if not after.startswith("(") and m.group() not in ("and", "or", "unless", "bool"):
            names.add(m.group())
    return names


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


# ---------------------------------------------------------------------------------------------- static checks


def test_promtool_checks_the_rules_and_the_prometheus_config():
    promtool = binary("promtool")
    for args in (["check", "rules", str(ALERTS)], ["check", "config", str(MONITORING / "prometheus.yml")]):
        r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"SUCCESS: {len(rules())} rules found" in r.stdout  # the config loads alerts.yml too


def test_alert_unit_tests_pass():
    """alerts_test.yml: each alert fires on its bad series after its `for`, never on the healthy ones beside."""
    r = subprocess.run(
        [binary("promtool"), "test", "rules", str(MONITORING / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # Every alert of the file is exercised by a test that expects it to fire.
    tested = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    firing = {c["alertname"] for t in tested for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    assert firing == {r["alert"] for r in rules() if "alert" in r}


def test_rules_and_dashboard_name_only_metrics_that_exist():
    recorded = {r["record"] for r in rules() if "record" in r}
    known = declared_metrics() | OTHER_METRICS | recorded
    assert metric_names('sum by (Outcome) (rate(GTSRBRequests{Outcome!="x"}[5m])) / 1e3 > up offset 1h') == {
        "GTSRBRequests",
        "up",
    }
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    for expr in exprs:
        names = metric_names(expr)
        assert names and names <= known, (expr, names - known)
    used = set().union(*map(metric_names, exprs))
    handler = {"GTSRBRequests", "GTSRBPredictedClass", "GTSRBConfidence", "GTSRBLowConfidence"}
    assert handler | {"GTSRBPreprocessTime", "GTSRBInferenceTime"} <= used  # every handler metric is watched


def test_dashboard_is_importable_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"] and p["targets"], p
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"] and t["expr"]
            assert set(re.findall(r"\$\w+", t["expr"])) <= set(GRAFANA_VARS), t["expr"]


# ----------------------------------------------------------------------------------- a real Prometheus stack


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def prometheus_config(ts: dict, blackbox_port: int) -> dict:
    """monitoring/prometheus.yml with the targets moved to this test's ports and a 1 s scrape/evaluation; no
    drift exporter or Alertmanager (tests/test_alerting.py runs those)."""
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(ALERTS)]
    del cfg["alerting"]
    cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if j["job_name"] != "gtsrb-drift"]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["gtsrb-serve"]["static_configs"] = [{"targets": [ts["metrics"].removeprefix("http://")]}]
    jobs["gtsrb-ready"]["static_configs"] = [{"targets": [f"{ts['management']}/models/gtsrb"]}]
    (address,) = [r for r in jobs["gtsrb-ready"]["relabel_configs"] if r.get("target_label") == "__address__"]
    address["replacement"] = f"127.0.0.1:{blackbox_port}"
    return cfg


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """TorchServe (free ports) + blackbox exporter + Prometheus, all real, stopped and checked for leftovers."""
    prometheus, blackbox = binary("prometheus"), binary("prometheus-blackbox-exporter")
    base = tmp_path_factory.mktemp("monitoring")
    with serving(base / "ts") as ts:
        bb_port, prom_port = torchserve_ctl.free_port(), torchserve_ctl.free_port()
        (base / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(ts, bb_port)))
        procs = []
        try:
            with open(base / "blackbox.log", "w") as log:
                procs.append(subprocess.Popen(
                    [blackbox, f"--config.file={MONITORING / 'blackbox.yml'}",
                     f"--web.listen-address=127.0.0.1:{bb_port}"],
                    stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            with open(base / "prometheus.log", "w") as log:
                procs.append(subprocess.Popen(
                    [prometheus, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{prom_port}"],
                    stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            prom = f"http://127.0.0.1:{prom_port}"
            eventually(lambda: ready(prom), what="Prometheus ready")
            yield {**ts, "prometheus": prom, "base": base}
        finally:
            for p in reversed(procs):
                stop_process(p)
    leftovers = processes_under(base)
    for p in leftovers:
        p.kill()
    assert not leftovers, f"processes left behind: {[p.info['cmdline'] for p in leftovers]}"


def ready(prom: str) -> bool:
    try:
        return requests.get(f"{prom}/-/ready", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def query(prom: str, expr: str) -> list[dict]:
    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def eventually(check, timeout: float = 60, what: str = ""):
    """Poll ``check`` (returns a truthy value when done) every 0.5 s: Prometheus scrapes once a second."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"not seen through Prometheus within {timeout:.0f} s: {what}"
        time.sleep(0.5)


def by_label(result: list[dict], label: str) -> dict[str, float]:
    return {s["metric"].get(label, ""): float(s["value"][1]) for s in result}


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def predict(stack, body: bytes) -> requests.Response:
    return requests.put(f"{stack['inference']}/predictions/gtsrb", data=body, timeout=30)


@pytest.mark.e2e
def test_prometheus_reads_the_handler_metrics_as_the_clients_saw_them(stack):
    prom = stack["prometheus"]
    eventually(lambda: by_label(query(prom, "up"), "job") == {"gtsrb-serve": 1.0, "gtsrb-ready": 1.0}, what="up")
    eventually(lambda: query(prom, "probe_success == 1"), what="the READY probe")

    rng = random.Random(0)
    answers = []
    for cls in (1, 12, 14, 14, 17, 25, 33, 38):
        r = predict(stack, png(render_sign(cls, rng)))
        assert r.status_code == 200, r.text
        answers.append(next(iter(r.json())))
    for body in (b"not an image", b"\x89PNG\r\n\x1a\n broken"):
        assert predict(stack, body).status_code == 400

    outcomes = {"predicted": float(len(answers)), "bad_input": 2.0}
    eventually(
        lambda: by_label(query(prom, "sum by (Outcome) (GTSRBRequests)"), "Outcome") == outcomes,
        what=f"GTSRBRequests == {outcomes}",
    )
    classes = by_label(query(prom, "sum by (ClassName) (GTSRBPredictedClass)"), "ClassName")
    assert classes == {name: float(n) for name, n in Counter(answers).items()}
    assert float(query(prom, "sum(GTSRBConfidence)")[0]["value"][1]) == len(answers)
    assert float(query(prom, "sum(ts_inference_requests_total)")[0]["value"][1]) == len(answers) + 2
    for gauge in ("GTSRBPreprocessTime", "GTSRBInferenceTime"):
        assert float(query(prom, gauge)[0]["value"][1]) > 0, gauge


@pytest.mark.e2e
def test_every_rule_and_dashboard_query_evaluates_on_real_data(stack):
    prom = stack["prometheus"]
    names = {r.get("alert") or r.get("record") for r in rules()}

    def evaluated():
        groups = requests.get(f"{prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        done = all(not r["lastEvaluation"].startswith("0001") for r in loaded)
        return loaded if done and {r["name"] for r in loaded} == names else None

    for rule in eventually(evaluated, what="every rule evaluated once"):
        assert rule["health"] == "ok", rule
    assert predict(stack, png(render_sign(13, random.Random(1)))).status_code == 200
    eventually(lambda: query(prom, "GTSRBRequests"), what="handler metrics (after traffic)")
    for expr in dashboard_exprs():
        query(prom, substitute(expr))  # parses and runs
    # The panels of what every served request moves show data (low-confidence ones need unsure predictions).
    served = {"GTSRBRequests", "GTSRBPredictedClass", "GTSRBConfidence", "GTSRBPreprocessTime", "GTSRBInferenceTime"}
    panels = [
        e for e in dashboard_exprs() if metric_names(e) & served and metric_names(e) <= served | {"PredictionTime"}
    ]
    assert len(panels) >= 4
    for expr in panels:
        eventually(lambda e=expr: query(prom, substitute(e)), timeout=30, what=expr)
    firing = query(prom, 'ALERTS{alertstate="firing"}')
    assert not [a for a in firing if a["metric"]["alertname"] != "GTSRBWorkerRestarted"], firing


@pytest.mark.e2e
def test_a_dead_worker_is_seen_by_the_probe_and_alerted(stack):
    prom = stack["prometheus"]
    desc = requests.get(f"{stack['management']}/models/gtsrb", timeout=5).json()[0]
    for w in desc["workers"]:  # what the OOM killer does to both workers at once
        os.kill(w["pid"], signal.SIGKILL)
    eventually(
        lambda: query(prom, 'min_over_time(probe_success{job="gtsrb-ready"}[1m]) == 0'),
        timeout=30,
        what="the probe failing while no worker is READY",
    )
    torchserve_ctl.wait_ready(stack["management"], timeout=120)
    eventually(
        lambda: query(prom, 'ALERTS{alertname="GTSRBWorkerRestarted", alertstate="firing"}'),
        timeout=30,
        what="GTSRBWorkerRestarted firing",
    )
    eventually(lambda: query(prom, 'probe_success{job="gtsrb-ready"} == 1'), timeout=30, what="READY again")
