"""A real TorchServe (Java) serving the project's archive with its config.properties, every listener moved to a
free loopback port; stopped with no process left behind. Shared by the end-to-end test modules."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import requests

from tools import archive, torchserve_ctl
from tools.torchserve_ctl import processes_under


@contextlib.contextmanager
def serving(base: Path) -> Iterator[dict]:
    """-> {"inference", "management", "metrics": HTTP urls, "grpc_inference": port, "logs": its log folder}.
    Started as tools.torchserve_ctl.serving() starts it; stopped with TorchServe's own stop, and then no process
    may be left (asserted, not reaped)."""
    store = base / "model_store"
    archive.build(export_path=store)
    proc, ports, urls, _ = torchserve_ctl.start_on_free_ports(base, store)
    try:
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
