"""Serving benchmark: the in-process limit, our TorchServe, stock TorchServe and a FastAPI peer, in one run.

    python -m bench.bench [--concurrency 1,8,32,64] [--duration 15] [--warmup 30] [--skip-stock] [--skip-fastapi]
                          [--output reports/bench/bench.md] [--quick] [--container IMAGE]

a. limit:   models/gtsrb.pt in this process at handler.torch_threads threads (and 2 for reference), batch 1
            and the served batchSize (handler/model-config.yaml), plus PIL decode + EvalPreset per image.
b. ours:    the project's archive and config.properties on free ports, driven by wrk at each concurrency.
c. stock:   TorchServe with its defaults (ports only) and the built-in image_classifier handler serving the
            same timm network traced at 224 px with random weights (only speed is compared).
d. fastapi: bench/fastapi_peer.py under uvicorn, one process.

The load is a few hundred real GTSRB training images (../shared/data or $GTSRB_ROOT), upscaled to 64x64 and
sent as PNG bodies (PUT, application/octet-stream), cycling (bench/wrk.py). The report is generated output
(reports/, git-ignored); BENCHMARKS.md is written by hand and quotes it. Every server is stopped in a finally
block; nothing is left running.
"""

import argparse
import datetime
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

from bench import report, servers
from bench.inputs import DATA_ROOT, make_images
from bench.limit import measure_limit
from bench.rss import RssSampler, torchserve_processes
from bench.servers import PREDICTIONS_PATH, ROOT
from bench.wrk import ensure_wrk, http_4xx_5xx, run_wrk, socket_errors, write_inputs
from tools import archive, torchserve_ctl

# TorchServe's own counters (metrics_mode=prometheus): requests answered, and the microseconds they spent in
# the frontend, of which waiting in the model's queue (the batch window included).
TS_COUNTERS = ("ts_inference_requests_total", "ts_inference_latency_microseconds", "ts_queue_latency_microseconds")


def torchserve_counters(metrics_url: str | None) -> dict | None:
    """``TS_COUNTERS`` summed over models, or None where the server exports no such counters."""
    if not metrics_url:
        return None
    try:
        with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    sums = {}
    for line in text.splitlines():
        name = line.partition("{")[0]
        if name in TS_COUNTERS:
            sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums if len(sums) == len(TS_COUNTERS) else None


def frontend_time(before: dict | None, after: dict | None) -> tuple[float, float] | None:
    """(ms in the frontend, ms of it queued) per request answered between two ``torchserve_counters``."""
    if before is None or after is None:
        return None
    done = after[TS_COUNTERS[0]] - before[TS_COUNTERS[0]]
    if done <= 0:
        return None
    return tuple((after[k] - before[k]) / done / 1e3 for k in TS_COUNTERS[1:])


def drive(
    name: str, url: str, levels: list[int], seconds: int, warmup: int, wrk_files, find, metrics_url: str | None = None
) -> list[dict]:
    """wrk at each concurrency in ``levels`` against ``url``, RSS of ``find()``'s processes sampled meanwhile,
    and for a TorchServe with ``metrics_url`` its own account of where each request's time went."""
    print(f"[{name}] warm-up {warmup}s at concurrency {min(8, max(levels))}", flush=True)
    run_wrk(url, min(8, max(levels)), warmup, *wrk_files)
    rows = []
    for c in levels:
        before = torchserve_counters(metrics_url)
        with RssSampler(find) as rss:
            r = run_wrk(url, c, seconds, *wrk_files)
        frontend = frontend_time(before, torchserve_counters(metrics_url))
        row = {
            "server": name,
            "concurrency": c,
            "rps": r["rps"],
            "requests": r["requests"],
            "p50_ms": r["latency_us"].get("p50", 0) / 1e3,
            "p90_ms": r["latency_us"].get("p90", 0) / 1e3,
            "p99_ms": r["latency_us"].get("p99", 0) / 1e3,
            "socket_errors": socket_errors(r),
            "http_4xx_5xx": http_4xx_5xx(r),
            "rss_mib": rss.peak,
            "frontend_mib": rss.frontend_peak,
            "frontend_ms": frontend[0] if frontend else None,
            "queued_ms": frontend[1] if frontend else None,
        }
        rows.append(row)
        print(
            f"[{name}] c={c:<3} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms"
            f"  socket errors {row['socket_errors']}  HTTP 4xx/5xx {row['http_4xx_5xx']}  RSS {row['rss_mib']:.0f} MiB"
            + (f"  frontend {frontend[0]:.2f} ms/request, queued {frontend[1]:.2f}" if frontend else ""),
            flush=True,
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", help="comma-separated wrk connection counts (default 1,8,32,64; quick: 1,4)")
    p.add_argument("--duration", type=int, help="seconds of load per level (default 15; quick: 2)")
    p.add_argument("--skip-stock", action="store_true", help="do not run stock TorchServe")
    p.add_argument("--skip-fastapi", action="store_true", help="do not run the FastAPI peer")
    p.add_argument("--output", type=Path, default=ROOT / "reports" / "bench" / "bench.md", help="markdown report")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--container", metavar="IMAGE", help="also drive the serving image (e.g. gtsrb-serve:latest)")
    p.add_argument("--images", type=int, help="distinct PNG bodies (default 300; quick: 40)")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--warmup", type=int, help="seconds of load before each server's levels (default 30; quick: 1)")
    a = p.parse_args(argv)
    a.levels = [int(c) for c in (a.concurrency or ("1,4" if a.quick else "1,8,32,64")).split(",") if c.strip()]
    a.duration = a.duration or (2 if a.quick else 15)
    a.images = a.images or (40 if a.quick else 300)
    # 30 s: the Java frontend's JIT settles (its CPU per request halves over the first ~40 s of load,
    # BENCHMARKS.md "Latency"); every server gets the same warm-up.
    a.warmup = a.warmup if a.warmup is not None else 1 if a.quick else 30
    a.limit_seconds = 0.5 if a.quick else min(5.0, a.duration / 3)
    return a


def wait_for_quiet(seconds: float) -> bool:
    """Wait up to ``seconds`` for the 1-minute load average to drop below half the cores; True if it did not."""
    deadline = time.monotonic() + seconds  # the load average lags by about a minute
    while os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1) and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)


def main(argv=None) -> None:
    args = parse_args(argv)
    ensure_wrk()
    torchserve_ctl.check_java()
    cfg = yaml.safe_load(report.MODEL_CONFIG.read_text())
    threads, batch, workers = int(cfg["handler"]["torch_threads"]), int(cfg["batchSize"]), int(cfg["minWorkers"])
    info = report.machine_info()
    busy = wait_for_quiet(0 if args.quick else 120)  # let whatever ran just before settle
    if busy:
        print(f"WARNING: the machine is busy (load average {os.getloadavg()[0]:.1f}): numbers will be low", flush=True)
    started = datetime.datetime.now().astimezone()
    rows, notes = [], []
    work = Path(tempfile.mkdtemp(prefix="gtsrb-bench-"))
    try:
        images = make_images(args.data_root, work / "images", args.images)
        wrk_files = write_inputs(work, images)

        def run(name: str, url: str, find, metrics_url: str | None = None) -> None:
            rows.extend(
                drive(
                    name, url + PREDICTIONS_PATH, args.levels, args.duration, args.warmup, wrk_files, find, metrics_url
                )
            )

        print(f"[limit] in-process, {threads} torch thread(s), batch 1 and {batch}", flush=True)
        limit = measure_limit(images, batch, threads, args.limit_seconds)
        per_image = 1 / limit[f"b{batch}_t{threads}"] + 1 / limit["decode"]
        parallel = max(1, min(workers, psutil.cpu_count(logical=True) // threads))
        ceiling = parallel * limit[f"b{batch}_t{threads}"]
        ceiling_decode = parallel / per_image

        print("[ours] building the archive and starting TorchServe", flush=True)
        store = work / "ours" / "model_store"
        archive.build(model=servers.MODEL, export_path=store)
        t0 = time.monotonic()
        # What `make serve` serves: the serving environment (.venv-serve, the container's CPU-only torch).
        with torchserve_ctl.serving(work / "ours", store, servers.CONFIG, python=torchserve_ctl.SERVE_PYTHON) as ts:
            notes.append(f"ours: {ts.workers} workers READY {time.monotonic() - t0:.1f} s after TorchServe was started")
            run("ours", ts.urls["inference"], lambda: torchserve_processes(ts.proc.pid), ts.urls["metrics"])

        if args.container:
            print(f"[container] starting {args.container}", flush=True)
            with servers.container(args.container) as (url, find):
                torch_in_image = subprocess.run(
                    ["docker", "run", "--rm", "--entrypoint", "python3", args.container, "-c",
                     "import torch; print(torch.__version__)"],
                    capture_output=True, text=True,
                ).stdout.strip()  # fmt: skip
                notes.append(f"container: image {args.container}, torch {torch_in_image}, same archive and settings")
                run("container", url, find)

        if args.skip_stock:
            notes.append("stock TorchServe: skipped (--skip-stock)")
        elif importlib.util.find_spec("captum") is None:
            msg = "stock TorchServe: skipped, captum is not installed (pip install -r requirements/bench.txt)"
            print(msg, flush=True)
            notes.append(msg)
        else:
            print("[stock] tracing the 224 px net, packing image_classifier, starting TorchServe", flush=True)
            try:
                with servers.stock(work / "stock") as ts:
                    notes.append(f"stock: {ts.workers} workers READY (TorchServe's default for this machine)")
                    run("stock", ts.urls["inference"], lambda: torchserve_processes(ts.proc.pid), ts.urls["metrics"])
            except RuntimeError as e:
                print(f"stock TorchServe failed: {e}", file=sys.stderr, flush=True)
                notes.append(f"stock TorchServe: failed ({str(e).splitlines()[0]})")

        if args.skip_fastapi:
            notes.append("FastAPI peer: skipped (--skip-fastapi)")
        elif not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn")):
            msg = "FastAPI peer: skipped, fastapi/uvicorn not installed (pip install -r requirements/bench.txt)"
            print(msg, flush=True)
            notes.append(msg)
        else:
            print("[fastapi] starting uvicorn bench.fastapi_peer:app", flush=True)
            omp = os.environ.get("OMP_NUM_THREADS")
            notes.append(f"fastapi: torch threads {f'{omp} (OMP_NUM_THREADS)' if omp else 'default (one per core)'}")
            with servers.fastapi_peer(work / "fastapi") as (url, proc):
                ps = psutil.Process(proc.pid)
                run("fastapi", url, lambda: ([ps], []))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    at = 32 if 32 in args.levels else max(args.levels)
    ratio_lines = report.ratios(rows, ceiling, at)
    print("\n" + report.table(rows))
    for line in ratio_lines:
        print(line)
    text = report.render(
        started=started,
        cmdline="python -m bench.bench " + " ".join(sys.argv[1:] if argv is None else argv),
        quick=args.quick,
        busy=busy,
        info=info,
        duration=args.duration,
        warmup=args.warmup,
        rows=rows,
        ratio_lines=ratio_lines,
        notes=notes,
        limit_md_lines=report.limit_lines(limit, threads, batch, parallel, ceiling, ceiling_decode),
        limit_seconds=args.limit_seconds,
        workers=workers,
        threads=threads,
        batch=batch,
        n_images=len(images),
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"\nreport written to {args.output}")


if __name__ == "__main__":
    main()
