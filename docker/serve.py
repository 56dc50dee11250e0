"""The serving container's main process: TorchServe behind HAProxy, with a drain on SIGTERM.

    python3 docker/serve.py          # the image's CMD (under tini); GTSRB_HOME is where the files are

It starts TorchServe (inference on 127.0.0.1:8079) and HAProxy (:8080, docker/haproxy.cfg), and answers
HAProxy's health check on 127.0.0.1:8086/ready with tools/torchserve_ctl.py's readiness (a worker READY).
On SIGTERM or SIGINT (`docker stop`, Ctrl-C) it drains: HAProxy's soft stop stops accepting connections and
waits for the requests in flight; then TorchServe is stopped. TorchServe alone would cut those requests: its
frontend closes every client connection when it gets SIGTERM. If either server dies, the other is stopped
and the container exits, so a restart policy or the VM's systemd unit brings a fresh one.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

HOME = Path(os.environ.get("GTSRB_HOME", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(HOME))
from tools.torchserve_ctl import model_status, read_properties  # noqa: E402

MANAGEMENT = os.environ.get("TS_MANAGEMENT_ADDRESS", "http://127.0.0.1:8081")
# TorchServe's workflow store: an empty, read-only folder of the image (TorchServe's default is the model store).
WORKFLOW_STORE = HOME / "workflow_store"
PROBE = ("127.0.0.1", 8086)  # haproxy.cfg: `check port 8086`
DRAIN_S = 40  # HAProxy cuts what is left after hard-stop-after (35 s)
STOP_S = 30  # TorchServe's own shutdown (closing the listeners and the workers) takes ~3 s


def log(msg: str) -> None:
    print(f"[serve.py] {msg}", flush=True)


def torchserve() -> subprocess.Popen:
    cmd = [
        "torchserve", "--foreground", "--ncs", "--disable-token-auth",
        "--ts-config", str(HOME / "config.properties"), "--log-config", str(HOME / "log4j2.xml"),
        "--model-store", str(HOME / "model_store"), "--workflow-store", str(WORKFLOW_STORE),
        "--models", "gtsrb=gtsrb.mar",
    ]  # fmt: skip
    env = {"TS_INFERENCE_ADDRESS": "http://127.0.0.1:8079", **os.environ}
    # Own session: a Ctrl-C on the terminal reaches this process only, which then stops the servers in order.
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def haproxy() -> subprocess.Popen:
    cfg = HOME / "docker" / "haproxy.cfg"
    # HAProxy refuses bodies over TorchServe's own limit before TorchServe reads them: one definition for both.
    limit = os.environ.get("TS_MAX_REQUEST_SIZE") or read_properties(HOME / "config.properties")["max_request_size"]
    env = {**os.environ, "GTSRB_HOME": str(HOME), "MAX_REQUEST_SIZE": limit}
    return subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], env=env, start_new_session=True)


class Probe(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        ready = self.path == "/ready" and model_status(MANAGEMENT)["ready"]
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # HAProxy asks every 2 s: no line per check
        pass


def stop_torchserve(proc: subprocess.Popen) -> None:
    """SIGTERM to the Java frontend (the launcher only waits for it); its workers exit with it."""
    try:
        java = [p for p in psutil.Process(proc.pid).children(recursive=True) if "java" in p.name()]
    except psutil.NoSuchProcess:
        java = []
    for p in java:
        p.terminate()
    if not java and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    probe = ThreadingHTTPServer(PROBE, Probe)
    threading.Thread(target=probe.serve_forever, daemon=True).start()
    ts, proxy = torchserve(), haproxy()
    log(f"TorchServe pid {ts.pid}, HAProxy pid {proxy.pid}; :8080 answers once the model is READY")

    stop = threading.Event()
    reason = []

    def on_signal(signum, _frame):
        reason.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name, proc in (("TorchServe", ts), ("HAProxy", proxy)):
        threading.Thread(target=lambda n=name, p=proc: (p.wait(), reason.append(f"{n} exited"), stop.set()),
                         daemon=True).start()  # fmt: skip
    stop.wait()

    if reason[0] in ("SIGTERM", "SIGINT"):
        t0 = time.monotonic()
        log(f"{reason[0]}: draining (no new connections; requests in flight finish)")
        proxy.send_signal(signal.SIGUSR1)  # HAProxy's soft stop
        try:
            proxy.wait(DRAIN_S)
        except subprocess.TimeoutExpired:
            proxy.kill()
        log(f"drained in {time.monotonic() - t0:.1f} s; stopping TorchServe")
        stop_torchserve(ts)
        log(f"stopped in {time.monotonic() - t0:.1f} s")
        return 0
    log(f"{reason[0]} (code {ts.poll() if 'TorchServe' in reason[0] else proxy.poll()}): stopping the other")
    if proxy.poll() is None:
        proxy.terminate()
    if ts.poll() is None:
        stop_torchserve(ts)
    return 1


if __name__ == "__main__":
    sys.exit(main())
