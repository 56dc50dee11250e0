"""Faults and sustained load against the project's TorchServe -> reports/soak/soak.md.

    python -m bench.soak [--soak-seconds 300] [--output reports/soak/soak.md]

1. kill -9 a worker under load (wrk, concurrency 32): failed requests, time until every worker is READY
   again, whether readiness (tools.torchserve_ctl.model_status: a worker READY) ever went down.
2. overload beyond job_queue_size (a copy of the config with a small queue): the refusals are clean 503s
   with a JSON message, and a normal load right after has no failed request.
3. soak: --soak-seconds at concurrency 64: failed requests, worker RSS at the start and the end.

A failed request is one with no answer (socket error, timeout) or with HTTP status >= 400
(bench.wrk.failed_requests).
The report is generated output (reports/, git-ignored); RELIABILITY.md is written by hand and quotes it.
"""

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from bench.inputs import DATA_ROOT, make_images
from bench.rss import rss_mib
from bench.rss import torchserve_processes as processes
from bench.servers import CONFIG, MODEL, PREDICTIONS_PATH, ROOT
from bench.wrk import ensure_wrk, failed_requests, http_4xx_5xx, run_wrk, socket_errors, write_inputs
from tools import archive, torchserve_ctl


def kill_worker_under_load(urls, proc, wrk_files) -> dict:
    result: dict = {}
    url = urls["inference"] + PREDICTIONS_PATH
    load = threading.Thread(target=lambda: result.update(wrk=run_wrk(url, 32, 20, *wrk_files)))
    load.start()
    time.sleep(5)
    workers, _ = processes(proc.pid)
    victim = workers[0].pid
    killed = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    saw_outage, recovered = False, None
    while time.monotonic() - killed < 60:
        status = torchserve_ctl.model_status(urls["management"])
        saw_outage |= not status["ready"]  # no worker READY (one of two was killed: expected False)
        if status["all_ready"] and victim not in {w.get("pid") for w in status["workers"]}:
            recovered = time.monotonic() - killed
            break
        time.sleep(0.05)
    load.join()
    r = result["wrk"]
    return {
        "victim": victim,
        "recovery_s": recovered,
        "readiness_saw_outage": saw_outage,
        "requests": r["requests"],
        "failed_requests": failed_requests(r),
        "timeouts": r["errors"]["timeout"],
        "p99_ms": r["latency_us"].get("p99", 0) / 1e3,
    }


def overload(base: Path, store: Path, wrk_files) -> dict:
    extra = {"job_queue_size": 8}
    with torchserve_ctl.serving(base, store, CONFIG, extra) as ts:
        url = ts.urls["inference"] + PREDICTIONS_PATH
        sample = None
        burst = {}
        t = threading.Thread(target=lambda: burst.update(r=run_wrk(url, 256, 10, *wrk_files)))
        t.start()
        deadline = time.monotonic() + 9
        body = Path(wrk_files.listing.read_text().split()[0]).read_bytes()
        while sample is None and time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                r = requests.put(url, data=body, timeout=30)
                if r.status_code == 503:
                    sample = {"status": r.status_code, "body": r.text[:300]}
        t.join()
        time.sleep(3)  # let the queued requests drain
        after = run_wrk(url, 8, 10, *wrk_files)
        return {
            "job_queue_size": 8,
            "burst_requests": burst["r"]["requests"],
            "burst_http_4xx_5xx": http_4xx_5xx(burst["r"]),
            "burst_socket_errors": socket_errors(burst["r"]),
            "sample_503": sample,
            "after_requests": after["requests"],
            "after_failed_requests": failed_requests(after),
        }


def soak(urls, proc, wrk_files, seconds: int) -> dict:
    workers, _ = processes(proc.pid)
    url = urls["inference"] + PREDICTIONS_PATH
    run_wrk(url, 64, 15, *wrk_files)  # warm-up, so that RSS has settled
    start_rss = rss_mib(processes(proc.pid)[0])
    r = run_wrk(url, 64, seconds, *wrk_files)
    end_workers, _ = processes(proc.pid)
    end_rss = rss_mib(end_workers)
    return {
        "seconds": seconds,
        "requests": r["requests"],
        "rps": r["rps"],
        "failed_requests": failed_requests(r),
        "p99_ms": r["latency_us"].get("p99", 0) / 1e3,
        "rss_start_mib": start_rss,
        "rss_end_mib": end_rss,
        "rss_growth_pct": 100 * (end_rss - start_rss) / start_rss,
        "same_workers": {p.pid for p in workers} == {p.pid for p in end_workers},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--soak-seconds", type=int, default=300)
    p.add_argument("--output", type=Path, default=ROOT / "reports" / "soak" / "soak.md")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = p.parse_args()
    ensure_wrk()
    work = Path(tempfile.mkdtemp(prefix="gtsrb-soak-"))
    try:
        images = make_images(args.data_root, work / "images", 300)
        wrk_files = write_inputs(work, images)
        store = work / "model_store"
        archive.build(model=MODEL, export_path=store)
        with torchserve_ctl.serving(work / "ours", store, CONFIG) as ts:
            print("[kill] kill -9 a worker under load", flush=True)
            kill = kill_worker_under_load(ts.urls, ts.proc, wrk_files)
            print(json.dumps(kill), flush=True)
            print(f"[soak] {args.soak_seconds}s at concurrency 64", flush=True)
            long = soak(ts.urls, ts.proc, wrk_files, args.soak_seconds)
            print(json.dumps(long), flush=True)
        print("[overload] job_queue_size 8, 256 connections", flush=True)
        over = overload(work / "overload", store, wrk_files)
        print(json.dumps(over), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args.output, kill, long, over)


def write_report(path: Path, kill: dict, long: dict, over: dict) -> None:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cpu = psutil.cpu_count()
    lines = [
        "# Faults and sustained load (generated by `make soak`; RELIABILITY.md quotes it)",
        "",
        f"`make soak` (`python -m bench.soak`), run {when} on a {cpu}-core machine, load from `wrk` on the same",
        "machine, real GTSRB signs as 64-px PNG bodies. The server is the project's archive and config.",
        "",
        "## A worker killed with SIGKILL under load (concurrency 32, 20 s)",
        "",
        f"- requests: {kill['requests']}, failed requests: **{kill['failed_requests']}** (timeouts: {kill['timeouts']}), p99 {kill['p99_ms']:.0f} ms",
        f"- TorchServe restarted the worker; every worker READY again after **{kill['recovery_s']:.2f} s**"
        if kill["recovery_s"] is not None
        else "- the worker did **not** come back within 60 s",
        f"- readiness (a worker READY on the management API, the container's /ready) went down: {kill['readiness_saw_outage']}",
        "- no request hung: wrk's timeout is 30 s, the same as `responseTimeout`, and the timeouts above are 0",
        "  unless stated otherwise.",
        "",
        f"## Sustained load: {long['seconds']} s at concurrency 64",
        "",
        f"- {long['requests']} requests, {long['rps']:.0f} req/s, failed requests: **{long['failed_requests']}**, p99 {long['p99_ms']:.0f} ms",
        f"- worker RSS (sum of both): {long['rss_start_mib']:.0f} MiB after warm-up, {long['rss_end_mib']:.0f} MiB at the end:"
        f" **{long['rss_growth_pct']:+.1f}%**; same worker processes throughout: {long['same_workers']}",
        "",
        f"## Overload beyond job_queue_size ({over['job_queue_size']}, 256 connections, 10 s)",
        "",
        f"- {over['burst_requests']} requests answered, of which {over['burst_http_4xx_5xx']} with HTTP 4xx/5xx"
        f" (refusals; one is quoted below); socket errors: {over['burst_socket_errors']}",
        f"- a refusal: `{json.dumps(over['sample_503'])}`",
        f"- right after, 10 s at concurrency 8: {over['after_requests']} requests, failed requests: **{over['after_failed_requests']}**",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"report written to {path}")


if __name__ == "__main__":
    main()
