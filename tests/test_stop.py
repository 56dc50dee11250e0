"""`make stop` (python -m tools.torchserve_ctl stop) against a real TorchServe: requests in flight are answered.

TorchServe's own stop (`torchserve --stop`, i.e. SIGTERM to its frontend) closes every client connection at
once; with 48 requests in flight it lost all 48 (RELIABILITY.md). The container drains with HAProxy in front
(tests/test_container.py); on the host, `make stop` waits until nothing is queued or computing first.
"""

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from tests.conftest import ROOT
from tools import archive, torchserve_ctl

pytestmark = pytest.mark.e2e


def test_make_stop_answers_the_requests_in_flight(tmp_path):
    store = tmp_path / "model_store"
    archive.build(export_path=store)
    urls = torchserve_ctl.write_config(
        ROOT / "config.properties", tmp_path / "config.properties", torchserve_ctl.free_ports()
    )
    proc = torchserve_ctl.start(
        tmp_path / "config.properties", store, tmp_path / "logs", tmpdir=tmp_path / "tmp", foreground=True
    )
    try:
        torchserve_ctl.wait_ready(urls["management"], timeout=180, proc=proc)
        rng = np.random.default_rng(0)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buf, "PNG")
        body, answers = buf.getvalue(), []

        def send():
            try:
                r = requests.post(f"{urls['inference']}/predictions/gtsrb", data=body, timeout=120,
                                  headers={"Content-Type": "image/png"})  # fmt: skip
                answers.append(r.status_code)
            except requests.ConnectionError as e:
                answers.append(f"dropped: {e}")

        clients = [threading.Thread(target=send) for _ in range(48)]
        for t in clients:
            t.start()
        while torchserve_ctl.busy(urls["management"]) is not True:  # the stop must meet work in progress
            pass
        env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}  # where `torchserve --start` left its pid file
        cli = [sys.executable, "-m", "tools.torchserve_ctl", "stop", "--config", str(tmp_path / "config.properties"),
               "--log-dir", str(tmp_path / "logs"), "--drain-timeout", "120"]  # fmt: skip
        out = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        for t in clients:
            t.join(timeout=60)
        assert out.returncode == 0 and "no request in flight" in out.stdout, out.stdout + out.stderr
        assert answers == [200] * len(clients)
        assert proc.wait(timeout=30) is not None  # the stop returned once TorchServe had exited
    finally:
        if proc.poll() is None:
            torchserve_ctl.stop(tmp_path / "logs", tmpdir=tmp_path / "tmp")
            proc.wait(timeout=60)
