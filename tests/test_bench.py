"""Smoke test of the serving benchmark: bench.bench --quick against a real TorchServe and the FastAPI peer."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_quick_bench_writes_a_report(tmp_path, gtsrb_root):
    if shutil.which("wrk") is None:
        pytest.skip("wrk (the load generator) is not installed: apt-get install -y wrk")
    fastapi = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn"))  # requirements/bench.txt
    report = tmp_path / "BENCH.md"
    cmd = [sys.executable, "-m", "bench.bench", "--quick", "--concurrency", "1,4", "--duration", "2"]
    cmd += ["--skip-stock", "--output", str(report), "--data-root", str(gtsrb_root)]
    if not fastapi:
        cmd.append("--skip-fastapi")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Plumbing, not speed: with torch's default thread count the peer's forward pass collapses (~0.5 s) on a
    # 2-core box that is busy with something else, and 2 s of load may then complete no request at all.
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    text = report.read_text()
    rows = re.findall(r"^\| (ours|fastapi|stock) \| (\d+) \| ([\d.]+) \|(?:[^|]*\|){3} (\d+) \| (\d+) \|", text, re.M)
    servers = {"ours", "fastapi"} if fastapi else {"ours"}
    assert {(s, c) for s, c, *_ in rows} == {(s, c) for s in servers for c in ("1", "4")}, text
    for server, conc, rps, errors, non2xx in rows:
        assert float(rps) > 0, (server, conc)
        assert errors == "0" and non2xx == "0", (server, conc, errors, non2xx)
    assert "## In-process limit" in text and "config.properties" in text
