"""Alerts reach a receiver: monitoring/prometheus.yml, alerts.yml and alertmanager.yml run in the real Prometheus,
Alertmanager and node_exporter (Debian's binaries), with a webhook sink in this test as the receiver.

A stand-in for TorchServe's metrics port is stopped: the sink gets TorchServeDown, then its resolution when the
port is back. The hourly drift report (tools/drift_check.py) writes a drifted result: GTSRBInputDrift is held back
while TorchServeDown fires (inhibition), delivered once the server is back, and resolved by a clean report.
Intervals are shortened to seconds (scrape, evaluation, `for`, group wait and interval); routing, grouping,
inhibition and the rules' expressions are the files' own."""

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from tests.conftest import ROOT
from tests.test_monitoring import eventually, query, ready, stop_process
from tools import drift_check, torchserve_ctl

MONITORING = ROOT / "monitoring"
ALERTMANAGER = MONITORING / "alertmanager.yml"
PACKAGES = "apt-get install -y prometheus prometheus-alertmanager prometheus-node-exporter"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: {PACKAGES}")
    return path


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary("amtool"), *args], capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------------------------------------ static checks


def test_alertmanager_config_is_valid_and_routes_by_severity():
    r = amtool("check-config", str(ALERTMANAGER))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    cfg = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in cfg["receivers"]}
    assert receivers["webhook"]["webhook_configs"][0]["send_resolved"] is True
    assert cfg["route"]["group_by"] == ["alertname", "instance"]
    # Every alert of alerts.yml is routed, and the routes name only alerts that exist.
    alerts = {r["alert"]: r["labels"]["severity"] for g in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
              for r in g["rules"] if "alert" in r}  # fmt: skip
    for name, severity in alerts.items():
        r = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER}", "--verify.receivers=webhook",
                   f"alertname={name}", f"severity={severity}")  # fmt: skip
        assert r.returncode == 0, (name, r.stdout + r.stderr)
    named = " ".join(str(m) for route in cfg["route"]["routes"] for m in route["matchers"])
    named += " ".join(
        str(m) for rule in cfg["inhibit_rules"] for m in rule["source_matchers"] + rule["target_matchers"]
    )
    for word in set(__import__("re").findall(r"(?:TorchServe|GTSRB)\w+", named)):
        assert word in alerts, f"alertmanager.yml names {word}, which alerts.yml does not define"


# -------------------------------------------------------------------------------------------- the real stack


class Sink(BaseHTTPRequestHandler):
    """The webhook receiver: keeps every notification Alertmanager POSTs."""

    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Metrics(BaseHTTPRequestHandler):
    """Stands in for TorchServe's metrics port: what `up` needs, nothing more."""

    def do_GET(self):  # noqa: N802
        body = b'ts_inference_requests_total{model_name="gtsrb",model_version="default"} 0\n'
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(handler, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def shorten(route: dict) -> None:
    route.update(group_wait="1s", group_interval="2s", repeat_interval="1h")
    for child in route.get("routes", []):
        shorten(child)


def write_drift(textfile: Path, reference: dict, drifted: bool) -> None:
    """A real drift_check run on 300 requests: training-like, or much darker than the training images."""
    rng = np.random.default_rng(0)
    k = len(reference["stats"])
    stats = rng.uniform(0.0, 0.02, (300, k)) if drifted else np.column_stack([
        np.quantile(np.r_[0, e, 1], rng.uniform(size=300)) for e in reference["stats"].values()
    ])  # fmt: skip
    classes = rng.choice(len(reference["class_prior"]), 300, p=reference["class_prior"])
    result = drift_check.check(reference, stats, classes)
    assert bool(result["drifted"]) == drifted, result["drifted"]
    drift_check.write_atomically(textfile, drift_check.textfile(result, 0, 1e9))


@pytest.fixture(scope="module")
def alerting(tmp_path_factory):
    prometheus, alertmanager = binary("prometheus"), binary("prometheus-alertmanager")
    node_exporter = binary("prometheus-node-exporter")
    base = tmp_path_factory.mktemp("alerting")
    ports = {k: torchserve_ctl.free_port() for k in ("metrics", "sink", "node", "am", "prom")}
    Sink.received = []
    sink = serve(Sink, ports["sink"])
    target = serve(Metrics, ports["metrics"])

    am_cfg = yaml.safe_load(ALERTMANAGER.read_text())
    am_cfg["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{ports['sink']}/alerts"
    shorten(am_cfg["route"])
    (base / "alertmanager.yml").write_text(yaml.safe_dump(am_cfg))

    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    (base / "alerts.yml").write_text(yaml.safe_dump(rules))
    prom_cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    prom_cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    prom_cfg["rule_files"] = [str(base / "alerts.yml")]
    prom_cfg["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{ports['am']}"]}]
    jobs = {j["job_name"]: j for j in prom_cfg["scrape_configs"]}
    jobs["gtsrb-serve"]["static_configs"] = [{"targets": [f"127.0.0.1:{ports['metrics']}"]}]
    jobs["gtsrb-drift"]["static_configs"] = [{"targets": [f"127.0.0.1:{ports['node']}"]}]
    prom_cfg["scrape_configs"] = [jobs["gtsrb-serve"], jobs["gtsrb-drift"]]  # no blackbox exporter here
    (base / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))

    textfiles = base / "textfile"
    textfiles.mkdir()
    reference = json.loads((ROOT / "models" / "gtsrb_reference.json").read_text())
    write_drift(textfiles / "gtsrb_drift.prom", reference, drifted=False)
    commands = {
        "alertmanager": [alertmanager, f"--config.file={base / 'alertmanager.yml'}", f"--storage.path={base / 'am'}",
                         f"--web.listen-address=127.0.0.1:{ports['am']}", "--cluster.listen-address="],
        "node_exporter": [node_exporter, "--collector.disable-defaults", "--collector.textfile",
                          f"--collector.textfile.directory={textfiles}", f"--web.listen-address=127.0.0.1:{ports['node']}"],
        "prometheus": [prometheus, f"--config.file={base / 'prometheus.yml'}", f"--storage.tsdb.path={base / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{ports['prom']}", "--rules.alert.resend-delay=1s"],
    }  # fmt: skip
    procs = []
    try:
        for name, argv in commands.items():
            with open(base / f"{name}.log", "w") as log:
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        prom, am = f"http://127.0.0.1:{ports['prom']}", f"http://127.0.0.1:{ports['am']}"
        eventually(lambda: ready(prom) and ready(am), what="Prometheus and Alertmanager ready")
        yield {"prometheus": prom, "alertmanager": am, "target": target, "port": ports["metrics"],
               "textfile": textfiles / "gtsrb_drift.prom", "reference": reference, "base": base}  # fmt: skip
    finally:
        for p in reversed(procs):
            stop_process(p)
        sink.shutdown()
        target.shutdown()
    assert all(p.returncode is not None for p in procs)


def notifications(alertname: str, status: str) -> list[dict]:
    """Alerts of that name and status in what the sink received so far."""
    return [
        a for n in Sink.received for a in n["alerts"] if a["labels"]["alertname"] == alertname and a["status"] == status
    ]


@pytest.mark.slow
def test_a_stopped_server_and_a_drift_report_reach_the_webhook_then_resolve(alerting):
    prom, am = alerting["prometheus"], alerting["alertmanager"]
    eventually(lambda: query(prom, 'up{job="gtsrb-serve"} == 1') and query(prom, 'up{job="gtsrb-drift"} == 1'),
               what="both targets up")  # fmt: skip
    eventually(lambda: query(prom, "gtsrb_drift_detected == 0"), what="a clean drift report scraped")
    assert Sink.received == []  # nothing fires on a healthy server

    alerting["target"].shutdown()  # TorchServe's metrics port stops answering
    alerting["target"].server_close()
    eventually(lambda: notifications("TorchServeDown", "firing"), timeout=60, what="TorchServeDown at the webhook")
    (down,) = notifications("TorchServeDown", "firing")
    assert down["labels"]["severity"] == "critical" and down["labels"]["job"] == "gtsrb-serve"
    assert "does not answer on its metrics port" in down["annotations"]["summary"]

    # The drift report flags the window while the server is down: the alert fires, and is held back.
    write_drift(alerting["textfile"], alerting["reference"], drifted=True)
    eventually(lambda: query(prom, 'ALERTS{alertname="GTSRBInputDrift", alertstate="firing"}'), what="drift firing")
    inhibited = eventually(
        lambda: [a for a in requests.get(f"{am}/api/v2/alerts", timeout=5).json()
                 if a["labels"]["alertname"] == "GTSRBInputDrift" and a["status"]["inhibitedBy"]],
        what="GTSRBInputDrift inhibited by TorchServeDown",
    )  # fmt: skip
    assert inhibited and not notifications("GTSRBInputDrift", "firing")

    alerting["target"] = serve(Metrics, alerting["port"])  # the server is back
    eventually(lambda: notifications("TorchServeDown", "resolved"), timeout=60, what="TorchServeDown resolved")
    eventually(lambda: notifications("GTSRBInputDrift", "firing"), timeout=60, what="GTSRBInputDrift at the webhook")
    (drift,) = notifications("GTSRBInputDrift", "firing")
    assert "flagged" in drift["annotations"]["description"] and "brightness" in drift["annotations"]["description"]

    write_drift(alerting["textfile"], alerting["reference"], drifted=False)  # the next hourly report is clean
    eventually(lambda: notifications("GTSRBInputDrift", "resolved"), timeout=60, what="GTSRBInputDrift resolved")
    assert len(notifications("TorchServeDown", "firing")) == 1  # grouped: one notification, not one a second
