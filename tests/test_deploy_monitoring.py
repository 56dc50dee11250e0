"""What each VM runs besides the server (deploy/cloud-init.yaml, deploy/vm_monitoring.py): the same alert rules and
Alertmanager routing as monitoring/, checked by promtool and amtool as the VM would load them, and the hourly
drift report whose result the rules watch."""

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_deploy import IMAGE, SECURE, DryRun, docker_run_argv

HOOK = "https://hooks.example.com/gtsrb"


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    run = DryRun("deploy", *SECURE, "--alert-webhook", HOOK)
    files = run.cloud_init()
    run.user_data.unlink()
    return files


def test_the_vm_loads_the_same_rules_and_routing(vm, tmp_path):
    conf = "/etc/gtsrb/monitoring"
    assert vm[f"{conf}/alerts.yml"] == (ROOT / "monitoring" / "alerts.yml").read_text()  # byte for byte
    assert vm[f"{conf}/blackbox.yml"] == (ROOT / "monitoring" / "blackbox.yml").read_text()
    routing, local = (
        yaml.safe_load(vm[f"{conf}/alertmanager.yml"]),
        yaml.safe_load((ROOT / "monitoring" / "alertmanager.yml").read_text()),
    )
    assert routing["receivers"][0]["webhook_configs"][0]["url"] == HOOK
    routing["receivers"][0]["webhook_configs"][0]["url"] = local["receivers"][0]["webhook_configs"][0]["url"]
    assert routing == local  # only the receiver's URL differs
    prom = yaml.safe_load(vm[f"{conf}/prometheus.yml"])
    assert prom["rule_files"] == ["alerts.yml"] and prom["global"]["external_labels"] == {"host": "${VM_NAME}"}
    assert prom["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["127.0.0.1:9093"]}]
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["gtsrb-ready"]["static_configs"] == [{"targets": ["http://127.0.0.1:8080/ready"]}]  # HAProxy's READY
    assert set(jobs) == {"gtsrb-serve", "gtsrb-ready", "gtsrb-drift"}
    # What the containers would load, checked by the tools the packages ship.
    for name in ("prometheus.yml", "alerts.yml", "alertmanager.yml"):
        (tmp_path / name).write_text(vm[f"{conf}/{name}"])
    if not (shutil.which("promtool") and shutil.which("amtool")):
        pytest.skip("promtool/amtool missing: apt-get install -y prometheus prometheus-alertmanager")
    r = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["amtool", "check-config", str(tmp_path / "alertmanager.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_alertmanager_and_exporters_run_on_the_loopback(vm):
    units = {p.rsplit("/", 1)[1]: c for p, c in vm.items() if p.startswith("/etc/systemd/system/")}
    prom = docker_run_argv(units["gtsrb-prometheus.service"])
    assert "--network=host" in prom and "--web.listen-address=127.0.0.1:9090" in prom
    assert "--enable-feature=expand-external-labels" in prom and "VM_NAME=%H" in prom
    am = docker_run_argv(units["gtsrb-alertmanager.service"])
    assert "--web.listen-address=127.0.0.1:9093" in am and "--cluster.listen-address=" in am
    exporters = units["gtsrb-exporters.service"]
    assert "--web.listen-address=127.0.0.1:9100" in exporters and "--web.listen-address=127.0.0.1:9115" in exporters
    assert "--collector.textfile.directory=/textfile" in exporters
    for unit in ("gtsrb-prometheus.service", "gtsrb-alertmanager.service", "gtsrb-exporters.service"):
        assert " -p " not in units[unit] and "--publish" not in units[unit], unit  # nothing published
    started = " ".join(vm["runcmd"])
    for unit in (
        "gtsrb-exporters.service",
        "gtsrb-alertmanager.service",
        "gtsrb-prometheus.service",
        "gtsrb-drift.timer",
    ):
        assert unit in started, unit


def test_the_drift_report_runs_hourly_from_the_serving_image_into_the_textfile(vm):
    service = vm["/etc/systemd/system/gtsrb-drift.service"]
    argv = docker_run_argv(service)
    image = argv[argv.index("--entrypoint") + 2]
    serving = docker_run_argv(vm["/etc/systemd/system/gtsrb.service"])[-1]
    # the very image (and model reference) the VM serves, by digest (a dry run cannot know it)
    assert image == serving == f"{IMAGE.rsplit(':', 1)[0]}@sha256:UNRESOLVED"
    assert argv[argv.index(image) + 1 :] == ["/opt/gtsrb/tools/drift_check.py", "--log", "/logs/gtsrb_inputs.jsonl*",
                                              "--textfile", "/textfile/gtsrb_drift.prom"]  # fmt: skip
    assert "--network=none" in argv and "/var/lib/gtsrb/logs:/logs:ro" in argv
    # locked down like the server (deploy/cloud-init.yaml, docker/run.sh): it writes the textfile folder only
    assert {"--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"} <= set(argv)
    assert "SuccessExitStatus=1" in service and "Type=oneshot" in service  # drift is a result, not a failure
    assert "OnUnitActiveSec=1h" in vm["/etc/systemd/system/gtsrb-drift.timer"]
    # The image carries the script and the model's reference.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "tools/drift_check.py" in dockerfile and "COPY models/gtsrb_reference.json /opt/gtsrb/models/" in dockerfile
    # The collector names each VM's series after it (the canary checks tell the VMs apart).
    otel = yaml.safe_load(vm["/etc/gtsrb/otelcol.yaml"])
    (job,) = otel["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job["relabel_configs"] == [{"target_label": "instance", "replacement": "${env:VM_NAME}"}]
    assert "-e VM_NAME=%H" in vm["/etc/systemd/system/gtsrb-metrics.service"]
