"""The servers under test, each a context manager that always stops what it started.

ours:      tools.torchserve_ctl.serving() with the project's archive and config.properties.
stock:     TorchServe's defaults and built-in image_classifier handler over the same network at 224 px.
container: the serving image (make docker-build) on the Docker bridge.
fastapi:   bench/fastapi_peer.py under uvicorn, one process.
"""

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import psutil
import torch

from tools import torchserve_ctl

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "gtsrb.pt"
CONFIG = ROOT / "config.properties"
NAMES = ROOT / "handler" / "index_to_name.json"
PREDICTIONS_PATH = f"/predictions/{torchserve_ctl.MODEL}"  # the URL path of a prediction, on every server


def build_stock_archive(work: Path, store: Path) -> None:
    """The stock recipe: timm mobilenetv3_small_100 (random weights) traced at 224 px, image_classifier."""
    from training.model import create_model

    work.mkdir(parents=True, exist_ok=True)
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
def stock(base: Path):
    """Stock TorchServe: its default config (only the listeners on loopback ports), logging and metrics;
    yields a torchserve_ctl.Server."""
    import ts

    store = base / "model_store"
    build_stock_archive(base, store)
    extra = {"grpc_inference_address": "127.0.0.1", "grpc_management_address": "127.0.0.1"}
    # torchserve_ctl points TorchServe at the project's metrics.yaml; stock uses TorchServe's own.
    env = {"TS_METRICS_CONFIG": str(Path(ts.__file__).parent / "configs" / "metrics.yaml")}
    with torchserve_ctl.serving(base, store, None, extra, env, log_config=None) as server:
        yield server


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
    """uvicorn bench.fastapi_peer:app on a free loopback port; yields (url, process); always stopped."""
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
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        torchserve_ctl.reap(children)
