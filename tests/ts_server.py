"""A real TorchServe (Java) serving the project's archive with its config.properties, every listener moved to a
free loopback port; stopped with no process left behind. Shared by the end-to-end test modules."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import requests

from tests.conftest import ROOT
from tools import archive, torchserve_ctl


def processes_under(path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(path) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@contextlib.contextmanager
def serving(base: Path) -> Iterator[dict]:
    """-> {"inference", "management", "metrics": HTTP urls, "grpc_inference": port, "logs": its log folder}."""
    store = base / "model_store"
    archive.build(export_path=store)
    ports = torchserve_ctl.free_ports()
    urls = torchserve_ctl.write_config(ROOT / "config.properties", base / "config.properties", ports)
    proc = torchserve_ctl.start(base / "config.properties", store, base / "logs", tmpdir=base / "tmp", foreground=True)
    try:
        torchserve_ctl.wait_ready(urls["management"], timeout=180, proc=proc)
        yield {**urls, "grpc_inference": ports["grpc_inference"], "logs": base / "logs"}
    finally:
        torchserve_ctl.stop(base / "logs", tmpdir=base / "tmp")
        proc.wait(timeout=60)
        leftovers = processes_under(base)
        for p in leftovers:
            p.kill()
        assert not leftovers, f"processes left behind: {[p.info['cmdline'] for p in leftovers]}"


def worker_pids(server) -> set[int]:
    desc = requests.get(f"{server['management']}/models/gtsrb", timeout=5).json()[0]
    assert all(w["status"] == "READY" for w in desc["workers"])
    return {w["pid"] for w in desc["workers"]}
