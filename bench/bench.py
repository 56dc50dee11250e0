"""Serving benchmark: the in-process limit, our TorchServe, stock TorchServe and a FastAPI peer, in one run.

    python -m bench.bench [--concurrency 1,8,32,64] [--duration 15] [--skip-stock] [--skip-fastapi]
                          [--output BENCHMARKS.md] [--quick]

a. limit:   models/gtsrb.pt in this process at handler.torch_threads threads (and 2 for reference), batch 1
            and the served batchSize (handler/model-config.yaml), plus PIL decode + EvalPreset per image.
b. ours:    the project's archive and config.properties on free ports, driven by wrk at each concurrency.
c. stock:   TorchServe with its defaults (ports only) and the built-in image_classifier handler serving the
            same timm network traced at 224 px with random weights (only speed is compared).
d. fastapi: bench/fastapi_peer.py under uvicorn, one process.

The load is a few hundred real GTSRB training images (../shared/data or $GTSRB_ROOT), upscaled to 64x64 and
sent as PNG bodies (PUT, application/octet-stream), cycling. wrk is a Debian package: apt-get install -y wrk.
Every server is stopped in a finally block; nothing is left running.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import psutil
import torch
import ts
import yaml
from PIL import Image

from handler.presets import EvalPreset
from tools import archive, torchserve_ctl

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gtsrb.pt"
MODEL_CONFIG = ROOT / "handler" / "model-config.yaml"
CONFIG = ROOT / "config.properties"
NAMES = ROOT / "handler" / "index_to_name.json"
PATH = "/predictions/gtsrb"

WRK_SCRIPT = r"""
-- Cycles through the PNG files listed in args[1]; method args[2]; prints a JSON summary in done().
local requests = {}
local n = 0
local i = 0

function init(args)
  local list = assert(io.open(args[1]))
  wrk.method = args[2] or "PUT"
  wrk.headers["Content-Type"] = "application/octet-stream"
  for path in list:lines() do
    local f = assert(io.open(path, "rb"))
    local body = f:read("*a")
    f:close()
    n = n + 1
    requests[n] = wrk.format(nil, nil, nil, body)
  end
  list:close()
  i = math.random(n) - 1
end

function request()
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
    '"errors": {"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f}, ' ..
    '"latency_us": {"p50": %.0f, "p90": %.0f, "p99": %.0f, "mean": %.1f, "max": %.0f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


# ----------------------------------------------------------------------------------------------- inputs


def make_images(data_root: Path, out: Path, count: int, size: int = 64) -> list[Path]:
    """``count`` real training signs, spread over the classes, upscaled to ``size`` px PNGs in ``out``."""
    train = data_root / "gtsrb" / "GTSRB" / "Training"
    if not train.is_dir():
        sys.exit(f"GTSRB training split not found at {train} (set --data-root or $GTSRB_ROOT)")
    folders = sorted(d for d in train.iterdir() if d.is_dir())
    per_class = -(-count // len(folders))
    picks = []
    for d in folders:
        files = sorted(d.glob("*.ppm"))
        picks += files[:: max(1, len(files) // per_class)][:per_class]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, src in enumerate(picks[:count]):
        dst = out / f"{n:04d}.png"
        Image.open(src).convert("RGB").resize((size, size), Image.BICUBIC).save(dst)
        paths.append(dst)
    return paths


# ------------------------------------------------------------------------------------------------ limit


def _rate(fn, items_per_call: int, seconds: float) -> float:
    t0 = time.perf_counter()
    for _ in range(3):  # TorchScript's profiling executor optimises after the first calls
        fn()
        if time.perf_counter() - t0 > seconds:  # a very slow setting: do not spend 3x the budget warming up
            break
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += items_per_call
        if (dt := time.perf_counter() - t0) >= seconds:
            return n / dt


def measure_limit(images: list[Path], batch: int, threads: int, seconds: float) -> dict:
    from training.export import load

    model = load(MODEL)
    preset = EvalPreset(size=int(model.image_size))
    bodies = [p.read_bytes() for p in images]
    tensors = [preset(Image.open(p)) for p in images[:batch]]
    x1, xb = tensors[0].unsqueeze(0), torch.stack((tensors * batch)[:batch])
    saved = torch.get_num_threads()
    out = {"threads": threads, "batch": batch, "seconds": seconds}
    it = iter(range(1 << 62))

    def decode():
        preset(Image.open(io.BytesIO(bodies[next(it) % len(bodies)])))

    try:
        with torch.inference_mode():
            for t in sorted({threads, 2}):
                torch.set_num_threads(t)
                out[f"b1_t{t}"] = _rate(lambda: model(x1), 1, seconds)
                out[f"b{batch}_t{t}"] = _rate(lambda: model(xb), batch, seconds)
            torch.set_num_threads(threads)
            out["decode"] = _rate(decode, 1, seconds)
    finally:
        torch.set_num_threads(saved)
    return out


# ------------------------------------------------------------------------------------------------- load


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def ensure_wrk() -> None:
    if have_wrk():
        return
    print("wrk (the load generator) is not installed; trying: apt-get install -y wrk", flush=True)
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
        if not have_wrk():
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
    if not have_wrk():
        sys.exit("wrk is required: sudo apt-get install -y wrk (Debian/Ubuntu) or brew install wrk (macOS)")


def parse_wrk(stdout: str) -> dict:
    """The JSON line printed by done(); falls back on wrk's own --latency text."""
    m = re.search(r"^WRK_JSON (\{.*\})$", stdout, re.M)
    if m:
        r = json.loads(m.group(1))
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
        return r
    units = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 6e7}

    def us(text: str) -> float:
        num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(num) * units[unit]

    lat = {f"p{p}": us(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", stdout, re.M)}
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()))) if sock else {}
    errors["status"] = int(non2xx.group(1)) if non2xx else 0
    requests = re.search(r"(\d+) requests in", stdout)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", stdout)
    return {
        "requests": int(requests.group(1)) if requests else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "errors": {k: errors.get(k, 0) for k in ("connect", "read", "write", "status", "timeout")},
        "latency_us": lat,
    }


def run_wrk(url: str, concurrency: int, seconds: int, script: Path, listing: Path) -> dict:
    cmd = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, seconds)}s", "--timeout", "30s", "--latency",
        "-s", str(script), url, "--", str(listing), "PUT",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    return parse_wrk(p.stdout)


class RssSampler:
    """Peak summed RSS (MiB) of the processes ``find()`` returns, sampled every 0.25 s in a thread."""

    def __init__(self, find) -> None:
        self.find, self.peak, self.frontend_peak = find, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        workers, frontend = self.find()
        self.peak = max(self.peak, _rss_mib(workers))
        self.frontend_peak = max(self.frontend_peak, _rss_mib(frontend))

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def _rss_mib(procs) -> float:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def torchserve_processes(launcher_pid: int):
    """(workers, [java frontend]) under the TorchServe launcher: workers run model_service_worker."""
    workers, java = [], []
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(launcher_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "model_service_worker" in cmd:
                    workers.append(p)
                elif p.name().startswith("java"):
                    java.append(p)
    return workers, java


def drive(name: str, url: str, levels: list[int], seconds: int, warmup: int, wrk_files, find) -> list[dict]:
    script, listing = wrk_files
    print(f"[{name}] warm-up {warmup}s at concurrency {min(8, max(levels))}", flush=True)
    run_wrk(url, min(8, max(levels)), warmup, script, listing)
    rows = []
    for c in levels:
        with RssSampler(find) as rss:
            r = run_wrk(url, c, seconds, script, listing)
        e = r["errors"]
        row = {
            "server": name,
            "concurrency": c,
            "rps": r["rps"],
            "requests": r["requests"],
            "p50_ms": r["latency_us"].get("p50", 0) / 1e3,
            "p90_ms": r["latency_us"].get("p90", 0) / 1e3,
            "p99_ms": r["latency_us"].get("p99", 0) / 1e3,
            "errors": e["connect"] + e["read"] + e["write"] + e["timeout"],
            "non2xx": e["status"],
            "rss_mib": rss.peak,
            "frontend_mib": rss.frontend_peak,
        }
        rows.append(row)
        print(
            f"[{name}] c={c:<3} {row['rps']:8.1f} req/s  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms"
            f"  errors {row['errors']}  non-2xx {row['non2xx']}  RSS {row['rss_mib']:.0f} MiB",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------- servers


@contextlib.contextmanager
def torchserve(
    base: Path,
    store: Path,
    config_src: Path | None,
    extra: dict | None = None,
    env: dict | None = None,
    log_config: Path | None = torchserve_ctl.LOG_CONFIG,
):
    """TorchServe on free ports with its own temp dir; yields (urls, launcher, workers); always stopped."""
    base.mkdir(parents=True, exist_ok=True)
    urls = torchserve_ctl.write_config(config_src, base / "config.properties", torchserve_ctl.free_ports(), extra)
    logs, tmp = base / "logs", base / "tmp"
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc = torchserve_ctl.start(
            base / "config.properties", store, logs, tmpdir=tmp, foreground=True, log_config=log_config
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    spawned: list[psutil.Process] = []
    try:
        try:
            status = torchserve_ctl.wait_ready(urls["management"], timeout=180, proc=proc)
        except (TimeoutError, RuntimeError) as e:
            tail = "".join(_tail(logs / name) for name in ("model_log.log", "ts_log.log"))
            raise RuntimeError(f"{e}\n{tail}") from e
        spawned = psutil.Process(proc.pid).children(recursive=True)
        yield urls, proc, len(status["workers"])
    finally:
        with contextlib.suppress(psutil.Error):
            spawned += psutil.Process(proc.pid).children(recursive=True)
        torchserve_ctl.stop(logs, tmpdir=tmp)
        _wait_or_kill(proc, 60)
        _reap(spawned)


def _wait_or_kill(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return f"--- last lines of {path.name}:\n" + "\n".join(path.read_text().splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def _reap(procs: list[psutil.Process]) -> None:
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for p in alive:
        print(f"killing a leftover process {p.pid}", file=sys.stderr)
        with contextlib.suppress(psutil.Error):
            p.kill()


def build_stock_archive(work: Path, store: Path) -> None:
    """The stock recipe: timm mobilenetv3_small_100 (random weights) traced at 224 px, image_classifier."""
    from training.model import create_model

    net = create_model(43, 64).net.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        traced = torch.jit.trace(net, torch.randn(1, 3, 224, 224))
        torch.jit.save(traced, str(work / "stock.pt"))
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    cmd = [
        str(archiver), "--force", "--model-name", "gtsrb", "--version", "1.0", "--export-path", str(store),
        "--serialized-file", str(work / "stock.pt"), "--handler", "image_classifier", "--extra-files", str(NAMES),
    ]  # fmt: skip
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True)


@contextlib.contextmanager
def container(image: str, docker: str = "docker"):
    """The serving image (make docker-build) on the Docker bridge; yields (url, find); always removed.

    wrk talks to the container's own address, not a published port, so Docker's userland proxy is not
    measured. Worker RSS is read from the host's view of the container's processes.
    """
    name = f"gtsrb-bench-{os.getpid()}"

    def sh(*args) -> str:
        return subprocess.run([docker, *args], capture_output=True, text=True, check=True).stdout.strip()

    sh("run", "-d", "--name", name, image)
    try:
        ip = sh("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)
        deadline = time.monotonic() + 180
        while sh("inspect", "-f", "{{.State.Health.Status}}", name) != "healthy":
            if time.monotonic() > deadline:
                raise RuntimeError(f"container not healthy after 180 s: {sh('logs', '--tail', '20', name)}")
            time.sleep(0.5)

        def find():
            workers, java = [], []
            for line in sh("top", name, "-eo", "pid,args").splitlines()[1:]:
                pid, _, cmd = line.strip().partition(" ")
                with contextlib.suppress(psutil.Error, ValueError):
                    if "model_service_worker" in cmd:
                        workers.append(psutil.Process(int(pid)))
                    elif cmd.lstrip().startswith("java"):
                        java.append(psutil.Process(int(pid)))
            return workers, java

        yield f"http://{ip}:8080", find
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True)


@contextlib.contextmanager
def fastapi_peer(base: Path):
    base.mkdir(parents=True, exist_ok=True)
    port = torchserve_ctl.free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "bench.fastapi_peer:app", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--log-level", "warning",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(base / "uvicorn.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"FastAPI peer did not start; see {base / 'uvicorn.out'}") from None
                time.sleep(0.2)
        yield url, proc
    finally:
        children = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        _wait_or_kill(proc, 30)
        _reap(children)


# ---------------------------------------------------------------------------------------------- report


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1) if m else cpu
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines() if have_wrk() else []

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "CPU": cpu,
        "cores": f"{psutil.cpu_count(logical=True)} logical / {psutil.cpu_count(logical=False)} physical",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "torchserve": version("torchserve"),
        "torch-model-archiver": version("torch-model-archiver"),
        "captum": version("captum"),
        "fastapi / uvicorn": f"{version('fastapi')} / {version('uvicorn')}",
        "Java": java[0] if java else "none",
        "wrk": wrk[0].split("Copyright")[0].strip() if wrk else "none",
    }


def table(rows: list[dict]) -> str:
    head = (
        "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | errors | non-2xx | requests "
        "| worker RSS MiB (peak, sum) | frontend RSS MiB |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = ""
    for r in rows:
        frontend = f"{r['frontend_mib']:.0f}" if r["frontend_mib"] else "-"
        p50, p90, p99 = (f"{r[k]:.1f}" if r["requests"] else "-" for k in ("p50_ms", "p90_ms", "p99_ms"))
        body += (
            f"| {r['server']} | {r['concurrency']} | {r['rps']:.1f} | {p50} | {p90} "
            f"| {p99} | {r['errors']} | {r['non2xx']} | {r['requests']} | {r['rss_mib']:.0f} | {frontend} |\n"
        )
    return head + body


def ratios(rows: list[dict], ceiling: float | None, at: int) -> list[str]:
    rps = {r["server"]: r["rps"] for r in rows if r["concurrency"] == at}
    out = []
    for ours in ("ours", "container"):
        if ours not in rps:
            continue
        for other, label in (("stock", "stock TorchServe"), ("fastapi", "FastAPI peer")):
            if rps.get(other):
                out.append(f"{ours} / {label} at concurrency {at}: {rps[ours] / rps[other]:.2f}x")
        if ceiling:
            out.append(f"{ours} / in-process batched ceiling at concurrency {at}: {rps[ours] / ceiling:.2f}")
    return out


def settings_text() -> tuple[str, str]:
    props = [line for line in CONFIG.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(props), MODEL_CONFIG.read_text().rstrip()


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", help="comma-separated wrk connection counts (default 1,8,32,64; quick: 1,4)")
    p.add_argument("--duration", type=int, help="seconds of load per level (default 15; quick: 2)")
    p.add_argument("--skip-stock", action="store_true", help="do not run stock TorchServe")
    p.add_argument("--skip-fastapi", action="store_true", help="do not run the FastAPI peer")
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="markdown report")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--container", metavar="IMAGE", help="also drive the serving image (e.g. gtsrb-serve:latest)")
    p.add_argument("--images", type=int, help="distinct PNG bodies (default 300; quick: 40)")
    p.add_argument(
        "--data-root", type=Path, default=Path(os.environ.get("GTSRB_ROOT") or ROOT.parent / "shared" / "data")
    )
    a = p.parse_args(argv)
    a.levels = [int(c) for c in (a.concurrency or ("1,4" if a.quick else "1,8,32,64")).split(",") if c.strip()]
    a.duration = a.duration or (2 if a.quick else 15)
    a.images = a.images or (40 if a.quick else 300)
    a.warmup = 1 if a.quick else min(5, a.duration)
    a.limit_seconds = 0.5 if a.quick else min(5.0, a.duration / 3)
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    ensure_wrk()
    # TorchServe's launcher and workers are found on PATH: use this interpreter's environment.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    torchserve_ctl.check_java()
    cfg = yaml.safe_load(MODEL_CONFIG.read_text())
    threads, batch, workers = int(cfg["handler"]["torch_threads"]), int(cfg["batchSize"]), int(cfg["minWorkers"])
    info = machine_info()
    # Let the load of whatever ran just before settle (the 1-minute load average lags by about a minute).
    deadline = time.monotonic() + (0 if args.quick else 120)
    while os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1) and time.monotonic() < deadline:
        time.sleep(5)
    busy = os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        print(f"WARNING: the machine is busy (load average {os.getloadavg()[0]:.1f}): numbers will be low", flush=True)
    started = datetime.datetime.now().astimezone()
    rows, notes = [], []
    work = Path(tempfile.mkdtemp(prefix="gtsrb-bench-"))
    try:
        images = make_images(args.data_root, work / "images", args.images)
        listing = work / "images.txt"
        listing.write_text("".join(f"{p}\n" for p in images))
        script = work / "bodies.lua"
        script.write_text(WRK_SCRIPT)
        wrk_files = (script, listing)

        print(f"[limit] in-process, {threads} torch thread(s), batch 1 and {batch}", flush=True)
        limit = measure_limit(images, batch, threads, args.limit_seconds)
        per_image = 1 / limit[f"b{batch}_t{threads}"] + 1 / limit["decode"]
        parallel = max(1, min(workers, psutil.cpu_count(logical=True) // threads))
        ceiling = parallel * limit[f"b{batch}_t{threads}"]
        ceiling_decode = parallel / per_image

        print("[ours] building the archive and starting TorchServe", flush=True)
        store = work / "ours" / "model_store"
        archive.build(model=MODEL, export_path=store)
        with torchserve(work / "ours", store, CONFIG) as (urls, proc, n):
            notes.append(f"ours: {n} workers READY")
            rows += drive(
                "ours", urls["inference"] + PATH, args.levels, args.duration, args.warmup, wrk_files,
                lambda: torchserve_processes(proc.pid),
            )  # fmt: skip

        if args.container:
            print(f"[container] starting {args.container}", flush=True)
            with container(args.container) as (url, find):
                torch_in_image = subprocess.run(
                    ["docker", "run", "--rm", "--entrypoint", "python3", args.container, "-c",
                     "import torch; print(torch.__version__)"],
                    capture_output=True, text=True,
                ).stdout.strip()  # fmt: skip
                notes.append(f"container: image {args.container}, torch {torch_in_image}, same archive and settings")
                rows += drive("container", url + PATH, args.levels, args.duration, args.warmup, wrk_files, find)

        if args.skip_stock:
            notes.append("stock TorchServe: skipped (--skip-stock)")
        elif importlib.util.find_spec("captum") is None:
            msg = "stock TorchServe: skipped, captum is not installed (pip install -r requirements/bench.txt)"
            print(msg, flush=True)
            notes.append(msg)
        else:
            print("[stock] tracing the 224 px net, packing image_classifier, starting TorchServe", flush=True)
            store = work / "stock" / "model_store"
            build_stock_archive(work, store)
            extra = {"grpc_inference_address": "127.0.0.1", "grpc_management_address": "127.0.0.1"}
            # Our launcher points TorchServe at the project's metrics.yaml; stock uses TorchServe's own.
            env = {"TS_METRICS_CONFIG": str(Path(ts.__file__).parent / "configs" / "metrics.yaml")}
            try:
                with torchserve(work / "stock", store, None, extra, env, log_config=None) as (urls, proc, n):
                    notes.append(f"stock: {n} workers READY (TorchServe's default for this machine)")
                    rows += drive(
                        "stock", urls["inference"] + PATH, args.levels, args.duration, args.warmup, wrk_files,
                        lambda: torchserve_processes(proc.pid),
                    )  # fmt: skip
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
            with fastapi_peer(work / "fastapi") as (url, proc):
                ps = psutil.Process(proc.pid)
                rows += drive(
                    "fastapi", url + PATH, args.levels, args.duration, args.warmup, wrk_files,
                    lambda: ([ps], []),
                )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    at = 32 if 32 in args.levels else max(args.levels)
    ratio_lines = ratios(rows, ceiling, at)
    limit_lines = [
        f"| model only, batch 1, {threads} thread(s) | {limit[f'b1_t{threads}']:.0f} |",
        f"| model only, batch {batch}, {threads} thread(s) | {limit[f'b{batch}_t{threads}']:.0f} |",
    ]
    if threads != 2:
        limit_lines += [
            f"| model only, batch 1, 2 threads (reference) | {limit['b1_t2']:.0f} |",
            f"| model only, batch {batch}, 2 threads (reference) | {limit[f'b{batch}_t2']:.0f} |",
        ]
    limit_lines += [
        f"| PIL decode + EvalPreset of a 64x64 PNG, {threads} thread(s) | {limit['decode']:.0f} |",
        f"| ceiling: {parallel} worker(s) x model batch {batch} | {ceiling:.0f} |",
        f"| ceiling with decode: {parallel} worker(s) x (decode + model batch {batch}) | {ceiling_decode:.0f} |",
    ]
    props, model_cfg = settings_text()
    tbl = table(rows)
    print("\n" + tbl)
    for line in ratio_lines:
        print(line)

    machine = "".join(f"| {k} | {v} |\n" for k, v in info.items())
    ratio_md = "".join(f"- {line}\n" for line in ratio_lines) or "- (no ratios: a server was skipped)\n"
    notes_md = "".join(f"- {n}\n" for n in notes)
    limit_md = "".join(f"{line}\n" for line in limit_lines)
    quick = " (quick smoke-test settings)" if args.quick else ""
    busy_md = (
        "\n\n**The machine was busy when this run started (load average above half the cores): these numbers are"
        " not representative.** Servers that use more than one torch thread per process suffer most from contention."
        if busy
        else ""
    )
    cmdline = "python -m bench.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = f"""# gtsrb-serve benchmark

Run {started:%Y-%m-%d %H:%M %Z} with `{cmdline.strip()}`{quick}.

## Machine

| | |
|---|---|
{machine}
The load generator runs on the same machine and shares its cores with the server under test; other load
(see the load average) skews every number.{busy_md}

## Results

{args.duration} s of load per concurrency level after a {args.warmup} s warm-up; latencies from wrk's
histogram. *errors* = connect + read + write errors and timeouts (30 s); *non-2xx* = HTTP status >= 400.
Worker RSS: peak of the summed RSS of the TorchServe `model_service_worker` processes (the uvicorn process
for FastAPI) sampled every 0.25 s; frontend: the TorchServe Java process.

{tbl}
{ratio_md}
{notes_md}
## In-process limit (images/s)

`models/gtsrb.pt` loaded in the benchmark process, uint8 [N, 3, 32, 32] inputs, `torch.inference_mode()`,
{args.limit_seconds:g} s per figure. The server runs `minWorkers` = {workers} worker(s) x `handler.torch_threads` =
{threads} thread(s) and batches up to `batchSize` = {batch}; the ceiling multiplies by min(workers, cores / threads).

| measurement | img/s |
|---|---:|
{limit_md}
## Servers

- **ours**: TorchServe {info["torchserve"]}, the project's archive (`tools/archive.py`: TorchScript model,
  `handler/gtsrb_handler.py`), `config.properties` with only the listeners moved to free loopback ports, and
  `log4j2.xml`; the torch of the local environment.
- **container** (with `--container IMAGE`): the serving image of `make docker-build` (CPU-only torch, the same
  archive and settings), driven at the container's own address on the Docker bridge (no userland proxy).
- **stock**: TorchServe with its defaults: a config.properties holding only the ports (loopback) and token
  auth disabled (`--disable-token-auth`), model API left at its default; the built-in `image_classifier`
  handler (Resize 256, CenterCrop 224, ImageNet normalisation, top-5 with `index_to_name.json`) serving the
  same timm `mobilenetv3_small_100` traced at 224x224 with **random weights**: its predictions are
  meaningless, only its speed and memory are compared.
- **fastapi**: `bench/fastapi_peer.py` under uvicorn (one process, `--workers 1`, log level warning):
  `Image.open(...).convert("RGB").resize((32, 32))`, the same `models/gtsrb.pt`, one image per forward
  pass, torch's default thread count, top-5 as JSON.

Load: `wrk -t1 -c<concurrency> -d{args.duration}s --timeout 30s --latency` with a Lua script that PUTs
{len(images)} real GTSRB training images (spread over the 43 classes, upscaled to 64x64, PNG,
`Content-Type: application/octet-stream`) in a cycle, one body per request.

### config.properties (ours)

```properties
{props}
```

### handler/model-config.yaml (ours)

```yaml
{model_cfg}
```
"""
    args.output.write_text(report)
    print(f"\nreport written to {args.output}")


if __name__ == "__main__":
    main()
