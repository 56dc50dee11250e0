"""Where a TorchServe worker's time goes under load: py-spy on every worker while wrk drives the server.

    python -m bench.profile [--concurrency 32] [--duration 20] [--output reports/profile]

Starts the project's archive on free ports (as `make bench` does), drives it with wrk at the given
concurrency, and meanwhile samples each worker with py-spy (100 Hz, idle stacks included, so the shares
are of wall time). Writes one flame graph per worker (SVG) and prints, for all workers together, the share
of samples in each stage of a request: waiting for TorchServe to send work, reading the request off the
socket, decoding the image, resizing (EvalPreset), the model, top-k + JSON, the handler's metrics and input
log, TorchServe's own per-request bookkeeping and sending the response. py-spy needs ptrace permission
(root, or CAP_SYS_PTRACE in a container).
"""

import argparse
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.inputs import DATA_ROOT, make_images
from bench.rss import torchserve_processes
from bench.servers import CONFIG, MODEL, PREDICTIONS_PATH
from bench.wrk import ensure_wrk, run_wrk, write_inputs
from tools import archive, torchserve_ctl

# First match wins, tested from the innermost frame outwards: a stage is the innermost function we know.
STAGES = [
    ("model forward (TorchScript)", ("forward", "_call_impl", "inference (gtsrb_handler")),
    ("decode image (Pillow)", ("decode_image", "request_bytes")),
    ("resize to 32 px (EvalPreset)", ("__call__ (presets", "stack (torch")),
    ("top-k + JSON (postprocess)", ("postprocess (gtsrb_handler",)),
    ("handler metrics + input log", ("_monitor", "serving_metrics", "image_stats")),
    ("wait for work (socket recv)", ("retrieve_msg", "_retrieve_buffer", "recv_into", "recv (")),
    ("send response (TorchServe protocol)", ("create_predict_response", "send_intermediate", "sendall")),
    ("TorchServe per-batch bookkeeping", ("service.py", "metric", "context.py")),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, keys in STAGES:
            if any(k in frame for k in keys):
                return name
    return "other"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=int, default=20, help="seconds of load (py-spy samples all but 5 of them)")
    p.add_argument("--output", type=Path, default=Path("reports/profile"))
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    args = p.parse_args(argv)
    ensure_wrk()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gtsrb-profile-"))
    images = make_images(args.data_root, work / "images", 200)
    script, listing = write_inputs(work, images)
    store = work / "model_store"
    archive.build(model=MODEL, export_path=store)
    with torchserve_ctl.serving(work / "ts", store, CONFIG) as ts:
        url = ts.urls["inference"] + PREDICTIONS_PATH
        run_wrk(url, 8, 3, script, listing)  # warm-up
        workers, java = torchserve_processes(ts.proc.pid)

        # Pass 1, no profiler: how the two cores are shared between the load generator, Java and the workers.
        load = start_load(url, args.concurrency, args.duration, script, listing)
        time.sleep(2)
        procs = {"Java frontend": java, "Python workers": workers, "wrk (load generator)": wrk_of(load)}
        before = {k: cpu_seconds(v) for k, v in procs.items()}
        t0 = time.monotonic()
        time.sleep(args.duration - 5)
        elapsed = time.monotonic() - t0
        shares = {k: (cpu_seconds(v) - before[k]) / elapsed for k, v in procs.items()}
        print(f"load without profiler: {load.communicate()[0].strip()}")

        # Pass 2: py-spy on each worker (one writes a flame graph, the other the raw stacks counted below).
        load = start_load(url, args.concurrency, args.duration, script, listing)
        time.sleep(2)
        spies = []
        for i, w in enumerate(workers):
            out = args.output / (f"worker-{i}.svg" if i == 0 else f"worker-{i}.txt")
            fmt = ["--format", "flamegraph"] if i == 0 else ["--format", "raw"]
            cmd = [py_spy, "record", "--pid", str(w.pid), "--rate", "100", "--idle", "--nonblocking", *fmt]
            spies.append((out, subprocess.Popen([*cmd, "-o", str(out), "-d", str(args.duration - 5)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))  # fmt: skip
        for path, spy in spies:
            if spy.wait() != 0:
                raise RuntimeError(f"py-spy failed for {path.name}: {spy.stderr.read()}")
        print(f"load with py-spy:      {load.communicate()[0].strip()}")

    print(f"\n| CPU use during the load (c={args.concurrency}, {os.cpu_count()} cores) | cores |")
    print("|---|---:|")
    for name, cores in shares.items():
        print(f"| {name} | {cores:.2f} |")
    counts = collections.Counter()
    raws = [p for p, _ in spies if p.suffix == ".txt"] or [p for p, _ in spies]
    for line in raws[-1].read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[stage_of(stack)] += int(n)
    total = sum(counts.values())
    print(f"\n| stage of a worker's wall time (c={args.concurrency}, py-spy, idle included) | share |")
    print("|---|---:|")
    for name, n in counts.most_common():
        print(f"| {name} | {100 * n / total:.1f}% |")
    print(f"\nflame graph: {spies[0][0]}")


def start_load(url, concurrency, duration, script, listing) -> subprocess.Popen:
    cmd = [sys.executable, "-c", _WRK_CALL, url, str(concurrency), str(duration), str(script), str(listing)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def wrk_of(load: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(load.pid).children(recursive=True) if p.name() == "wrk"]


def cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


_WRK_CALL = """
import sys
from pathlib import Path
from bench.wrk import failed_requests, run_wrk
url, c, d, script, listing = sys.argv[1:]
r = run_wrk(url, int(c), int(d), Path(script), Path(listing))
lat = r["latency_us"]
print(f"{r['rps']:.0f} req/s, p50 {lat.get('p50', 0) / 1e3:.1f} ms, p99 {lat.get('p99', 0) / 1e3:.1f} ms, "
      f"failed requests {failed_requests(r)}")
"""

if __name__ == "__main__":
    main()
