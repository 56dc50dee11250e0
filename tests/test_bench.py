"""The serving benchmark: a --quick run against a real TorchServe and the FastAPI peer, how wrk's counts are read,
where the report goes."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.mark.e2e
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
    for server, conc, rps, socket_errors, http_4xx_5xx in rows:
        assert float(rps) > 0, (server, conc)
        assert socket_errors == "0" and http_4xx_5xx == "0", (server, conc, socket_errors, http_4xx_5xx)
    # TorchServe's own account of a request's time: ours has it at every level, with the queued part inside it;
    # the FastAPI peer exports no such counters.
    accounts = dict(
        ((s, c), a) for s, c, a in re.findall(r"^\| (ours|fastapi) \| (\d+) \|.*\| ([^|]+) \|$", text, re.M)
    )
    for c in ("1", "4"):
        frontend, queued = map(float, re.fullmatch(r"([\d.]+) \(([\d.]+)\)", accounts["ours", c]).groups())
        assert 0 < queued < frontend, (c, accounts["ours", c])
        if fastapi:
            assert accounts["fastapi", c] == "-", accounts["fastapi", c]
    assert "## In-process limit" in text and "config.properties" in text


WRK_TEXT = """Running 2s test @ http://127.0.0.1:8080/predictions/gtsrb
  1 threads and 4 connections
  Latency Distribution
     50%    8.10ms
     75%   10.00ms
     90%   12.50ms
     99%    1.20s
  100 requests in 2.00s, 10.00KB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 3
Requests/sec:     50.00
"""


def test_wrk_counts_unanswered_requests_apart_from_error_answers():
    """Without the Lua summary, wrk's own text is read; a request with no answer (socket error, timeout) is a
    socket error, an answer >= 400 is not, and a failed request is either."""
    from bench.wrk import failed_requests, http_4xx_5xx, parse_wrk, socket_errors

    r = parse_wrk(WRK_TEXT)
    assert (r["requests"], r["rps"]) == (100, 50.0)
    assert r["latency_us"] == {"p50": 8100.0, "p90": 12500.0, "p99": 1.2e6}
    assert (socket_errors(r), http_4xx_5xx(r), failed_requests(r)) == (3, 3, 6)


def test_bench_report_is_not_the_written_document():
    """make bench writes its tables to the git-ignored reports/, never over the hand-written BENCHMARKS.md."""
    from bench.bench import parse_args

    out = parse_args([]).output
    assert out.parent == ROOT / "reports" / "bench"
    assert subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=ROOT).returncode == 0
