"""The monitoring files each VM runs (deploy/cloud-init.yaml): monitoring/'s Prometheus config, alert rules,
blackbox module and Alertmanager routing, as cloud-init write_files entries.

The rules (alerts.yml), the blackbox module and the routing (alertmanager.yml) go to the VM unchanged. Two
things differ on the VM, and only these: the READY probe asks HAProxy's /ready on :8080 (the management API
is not published out of the container), and the alerts carry the VM's name (`host`, an external label), since
every scrape target there is 127.0.0.1. `--alert-webhook` sets the webhook receiver's URL.
"""

from pathlib import Path

import yaml

from deploy.commands import PORT, READY_PATH, Config

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
# The VM's monitoring containers (host network, loopback only). Pin them by digest, like the base image, once
# you depend on them (docker/README.md).
IMAGES = {
    "prometheus_image": "prom/prometheus:v2.53.0",
    "alertmanager_image": "prom/alertmanager:v0.27.0",
    "node_exporter_image": "prom/node-exporter:v1.8.1",
    "blackbox_image": "prom/blackbox-exporter:v0.25.0",
}
CONFIG_DIR = "/etc/gtsrb/monitoring"  # on the VM


def prometheus_config() -> dict:
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    # Expanded by Prometheus (--enable-feature=expand-external-labels) from the unit's -e VM_NAME=%H.
    cfg["global"]["external_labels"] = {"host": "${VM_NAME}"}
    for job in cfg["scrape_configs"]:
        if job["job_name"] == "gtsrb-ready":
            job["static_configs"] = [{"targets": [f"http://127.0.0.1:{PORT}{READY_PATH}"]}]
    return cfg


def alertmanager_config(webhook: str) -> dict:
    cfg = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    if webhook:
        (receiver,) = [r for r in cfg["receivers"] if r["name"] == "webhook"]
        receiver["webhook_configs"][0]["url"] = webhook
    return cfg


def files(cfg: Config) -> dict[str, str]:
    """{path on the VM: content}."""
    dump = yaml.safe_dump
    return {
        f"{CONFIG_DIR}/prometheus.yml": dump(prometheus_config(), sort_keys=False),
        f"{CONFIG_DIR}/alerts.yml": (MONITORING / "alerts.yml").read_text(),
        f"{CONFIG_DIR}/blackbox.yml": (MONITORING / "blackbox.yml").read_text(),
        f"{CONFIG_DIR}/alertmanager.yml": dump(alertmanager_config(cfg.alert_webhook), sort_keys=False),
    }


def write_files_yaml(cfg: Config) -> str:
    """The files as write_files entries, indented for the list in deploy/cloud-init.yaml."""
    out = []
    for path, content in files(cfg).items():
        out += [f"  - path: {path}", '    permissions: "0644"', "    owner: root", "    content: |"]
        out += [f"      {line}".rstrip() for line in content.splitlines()]
    return "\n".join(out)


def substitutions(cfg: Config) -> dict[str, str]:
    return {**IMAGES, "monitoring_files": write_files_yaml(cfg)}
