"""Start TorchServe with the project's archive and config, wait until the model is READY, stop it.

    python -m tools.torchserve_ctl start [--config config.properties] [--timeout 120]
    python -m tools.torchserve_ctl stop [--drain-timeout 30]   # waits for no request in flight, then stops
    python -m tools.torchserve_ctl status [--quiet]   # exit 0 while at least one of the model's workers is READY

TorchServe's /ping answers "Healthy" even when the model failed to load, so readiness is read from
the management API. Ready (traffic may be sent) means at least one worker READY: while TorchServe restarts
a dead worker the other keeps answering, so readiness degrades instead of flapping. A start waits for all
of them. serving() is the whole lifecycle on free ports (start, wait READY, always stop), used by the
benchmark, the soak test and tools/docs.py.

TorchServe runs from the environment of the Python it is given (its workers run that Python): this one's by
default; ``SERVE_PYTHON`` is the serving environment of ``make serve`` (.venv-serve, the container's CPU-only torch).
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gtsrb"
LOG_CONFIG = ROOT / "log4j2.xml"  # the frontend's logging: no per-request debug lines (see the file)
# make serve's environment (the Makefile passes its own as GTSRB_SERVE_PYTHON); not resolved: a venv's python is a link.
SERVE_PYTHON = Path(os.environ.get("GTSRB_SERVE_PYTHON") or ROOT / ".venv-serve" / "bin" / "python")


def java_major() -> int | None:
    java = shutil.which("java")
    if not java:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 else major  # "1.8.0" is Java 8


def check_java() -> None:
    major = java_major()
    if major is None or major < 11:
        sys.exit(
            f"TorchServe needs Java 11 or newer (found: {major or 'none'}).\n"
            "  Debian/Ubuntu: sudo apt-get install -y openjdk-17-jre-headless\n"
            "  macOS:         brew install openjdk@17"
        )


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            props[k.strip()] = v.strip()
    return props


PORT_NAMES = ("inference", "management", "metrics", "grpc_inference", "grpc_management")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports() -> dict[str, int]:
    """One free loopback port for each listener in PORT_NAMES (gRPC cannot be switched off in 0.12)."""
    return {k: free_port() for k in PORT_NAMES}


def write_config(src: Path | None, dst: Path, ports: dict[str, int], extra: dict | None = None) -> dict[str, str]:
    """Write ``dst``: a copy of the config.properties ``src`` (None: an empty one) with every listener moved
    to ``ports`` (keys: PORT_NAMES), on the address ``src`` gives it (127.0.0.1 if none), and the ``extra``
    settings; a key the file lacks is appended. Returns the HTTP urls {"inference", "management", "metrics"}."""
    http = ("inference", "management", "metrics")
    props = read_properties(src) if src else {}
    hosts = {k: urllib.parse.urlsplit(props.get(f"{k}_address", "")).hostname or "127.0.0.1" for k in http}
    settings = {f"{k}_address": f"http://{hosts[k]}:{ports[k]}" for k in http}
    settings |= {"grpc_inference_port": ports["grpc_inference"], "grpc_management_port": ports["grpc_management"]}
    settings |= extra or {}
    lines = Path(src).read_text().splitlines() if src else []
    for key, value in settings.items():
        i = next((n for n, line in enumerate(lines) if line.startswith(f"{key}=")), None)
        if i is None:
            lines.append(f"{key}={value}")
        else:
            lines[i] = f"{key}={value}"
    Path(dst).write_text("\n".join(lines) + "\n")
    return {k: settings[f"{k}_address"] for k in http}


def ports_in_use(props: dict[str, str]) -> list[str]:
    """The listeners of a config.properties (``props``) whose address another process holds, e.g.
    ["inference_address http://127.0.0.1:8080"]. TorchServe itself would exit only after starting its
    workers, and leave them running."""
    listeners = {f"{k}_address": props.get(f"{k}_address", f"http://127.0.0.1:{port}")
                 for k, port in (("inference", 8080), ("management", 8081), ("metrics", 8082))}  # fmt: skip
    for key, port in (("grpc_inference", 7070), ("grpc_management", 7071)):
        listeners[f"{key}_port"] = f"{props.get(f'{key}_address', '0.0.0.0')}:{props.get(f'{key}_port', port)}"
    taken = []
    for key, address in listeners.items():
        url = urllib.parse.urlsplit(address if "//" in address else f"//{address}")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Netty binds: a TIME_WAIT port is free
            try:
                s.bind((url.hostname or "0.0.0.0", url.port))
            except OSError:
                taken.append(f"{key} {address}")
    return taken


def model_status(management: str, model: str = MODEL) -> dict:
    """{'ready': a worker READY, 'all_ready': every worker READY, 'workers': [...]} from the management API;
    not ready if it cannot be reached."""
    try:
        with urllib.request.urlopen(f"{management}/models/{model}", timeout=2) as r:
            desc = json.loads(r.read())[0]
    except (urllib.error.URLError, OSError, ValueError, IndexError):
        return {"ready": False, "all_ready": False, "workers": []}
    workers = desc.get("workers", [])
    ready = [w.get("status") == "READY" for w in workers]
    return {"ready": any(ready), "all_ready": bool(ready) and all(ready), "workers": workers}


def wait_ready(management: str, timeout: float, model: str = MODEL, proc: subprocess.Popen | None = None) -> dict:
    """Wait until every worker of the model is READY (a start is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = model_status(management, model)
        if status["all_ready"]:
            return status
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"model {model!r} not READY after {timeout:.0f}s: {model_status(management, model)['workers']}")


def _bin(python: Path | None) -> Path:
    """The bin folder of ``python``'s environment (None: this interpreter's), not resolved."""
    return Path(os.path.abspath(python or sys.executable)).parent


def _torchserve(python: Path | None = None) -> str:
    """The launcher of ``python``'s environment (an absolute path: TorchServe runs in log_dir)."""
    here = _bin(python) / "torchserve"
    if python is not None and not here.exists():
        raise FileNotFoundError(f"{here} is missing: install the serving environment first (make serve)")
    return str(here) if here.exists() else (shutil.which("torchserve") or "torchserve")


def _env(log_dir: Path, tmpdir: Path | None, extra: dict | None = None, python: Path | None = None) -> dict:
    env = {**os.environ, **(extra or {}), "LOG_LOCATION": str(log_dir), "METRICS_LOCATION": str(log_dir)}
    # The server's environment first on its search path, whatever the caller's PATH.
    env["PATH"] = f"{_bin(python)}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TS_METRICS_CONFIG", str(ROOT / "metrics.yaml"))  # declares the handler's metrics
    if tmpdir is not None:  # TorchServe keeps its pid file in the temp dir: one dir per instance
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmpdir)
        # The workers' unix sockets are java.io.tmpdir/.ts.sock.<9000+i>, /tmp by default: two instances
        # would share them. The launcher passes $TEMP as -Djava.io.tmpdir.
        env["TEMP"] = str(tmpdir)
    return env


def start(
    config: Path,
    model_store: Path,
    log_dir: Path,
    tmpdir: Path | None = None,
    foreground: bool = False,
    log_config: Path | None = LOG_CONFIG,
    env: dict | None = None,
    python: Path | None = None,
) -> subprocess.Popen:
    """Launch TorchServe; returns the launcher process (with foreground=True, the server itself).

    ``log_config=None`` keeps TorchServe's built-in logging (the stock recipe of the benchmark); ``env``
    adds to (or overrides) this process's environment for the server; ``python`` picks the environment that
    serves (None: this interpreter's).
    """
    check_java()
    log_dir.mkdir(parents=True, exist_ok=True)
    # Workflows (which carry handler code) load from the workflow store, the model store by default: an empty
    # folder of this server instead (SECURITY.md, "Management").
    workflows = log_dir / "empty-workflow-store"
    workflows.mkdir(mode=0o700, exist_ok=True)
    cmd = [
        _torchserve(python), "--start", "--ncs", "--disable-token-auth", "--ts-config", str(config),
        "--model-store", str(model_store), "--workflow-store", str(workflows), "--models", f"{MODEL}={MODEL}.mar",
    ]  # fmt: skip
    if foreground:
        cmd.append("--foreground")
    if log_config is not None:
        cmd += ["--log-config", str(log_config)]
    with open(log_dir / "torchserve.out", "w") as out:
        env = _env(log_dir, tmpdir, env, python)
        return subprocess.Popen(cmd, cwd=log_dir, env=env, stdout=out, stderr=subprocess.STDOUT)


def busy(management: str, model: str = MODEL) -> bool | None:
    """Requests queued for the model, or a worker computing; None when the server does not answer.

    TorchServe publishes the queue, not what its workers are doing, so a worker counts as busy while one of
    its threads is running (an idle worker sleeps on its socket)."""
    import psutil  # only here: the container's HEALTHCHECK imports this module every 10 s

    try:
        with urllib.request.urlopen(f"{management}/models/{model}", timeout=2) as r:
            desc = json.loads(r.read())[0]
    except (urllib.error.URLError, OSError, ValueError, IndexError):
        return None
    if desc.get("jobQueueStatus", {}).get("pendingRequests", 0):
        return True
    for worker in desc.get("workers", []):
        try:
            threads = psutil.Process(worker["pid"]).threads()
            if any(psutil.Process(t.id).status() == psutil.STATUS_RUNNING for t in threads):
                return True
        except (psutil.Error, KeyError):
            pass
    return False


def drain(management: str, timeout: float, model: str = MODEL) -> bool:
    """Wait until nothing is queued or computing for 150 ms; False if that did not happen within timeout.

    TorchServe's frontend closes every client connection when it is told to stop, requests in flight
    included, and it cannot be told to stop accepting first. So the best a stop can do without a proxy in
    front (the container has one: docker/serve.py) is to wait for a moment when no request is in flight."""
    deadline = time.monotonic() + timeout
    idle = 0
    while idle < 3:
        state = busy(management, model)
        if state is None:
            return True  # not answering: nothing to drain
        idle = 0 if state else idle + 1
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop(
    log_dir: Path,
    tmpdir: Path | None = None,
    management: str | None = None,
    drain_timeout: float = 30,
    python: Path | None = None,
) -> bool:
    """Stop TorchServe and wait until it has exited; first, with ``management``, drain (see drain()).
    Returns False when the drain timed out (requests in flight may then have been cut)."""
    drained = drain(management, drain_timeout) if management else True
    # --foreground makes --stop wait (up to 60 s) until the frontend has exited.
    cmd = [_torchserve(python), "--stop", "--foreground"]
    subprocess.run(cmd, capture_output=True, env=_env(log_dir, tmpdir, python=python), timeout=90)
    return drained


PORT_TAKEN = "Address already in use"


def processes_under(path: Path) -> list:
    """The psutil processes whose command line names ``path`` (a server's workers name its temp dir)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if any(str(path) in part for part in p.info["cmdline"] or []):
                found.append(p)
    return found


def start_on_free_ports(
    base: Path,
    model_store: Path,
    config: Path | None = ROOT / "config.properties",
    extra: dict | None = None,
    env: dict | None = None,
    log_config: Path | None = LOG_CONFIG,
    timeout: float = 180,
    python: Path | None = None,
    attempts: int = 3,
) -> tuple[subprocess.Popen, dict[str, int], dict[str, str], dict]:
    """Start TorchServe in the foreground with ``config``'s listeners moved to free loopback ports (config, logs
    and temp dir in ``base``) and wait until every worker is READY -> (launcher, ports, urls, model status).

    A port found free can be taken before TorchServe binds it (any outgoing connection may get it as its local
    port). TorchServe then exits after its workers have started, with status 0 and the workers orphaned: that
    attempt's processes are killed and new ports are tried, ``attempts`` times in all. Any other failure raises
    at once, with the end of the logs."""
    base.mkdir(parents=True, exist_ok=True)
    logs, tmp = base / "logs", base / "tmp"
    for attempt in range(1, attempts + 1):
        ports = free_ports()
        urls = write_config(config, base / "config.properties", ports, extra)
        proc = start(base / "config.properties", model_store, logs, tmp, True, log_config, env, python)
        try:
            return proc, ports, urls, wait_ready(urls["management"], timeout, proc=proc)
        except (TimeoutError, RuntimeError) as e:
            exited = proc.poll() is not None
            if not exited:
                stop(logs, tmpdir=tmp, python=python)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
                proc.kill()
                proc.wait()
            report = f"{e}\n{_tail(logs / 'model_log.log')}{_tail(logs / 'ts_log.log')}{_tail(logs / 'torchserve.out')}"
            reap(processes_under(base))
            lost_port = exited and PORT_TAKEN in _read(logs / "torchserve.out") + _read(logs / "ts_log.log")
            if not lost_port or attempt == attempts:
                raise RuntimeError(report) from e
            for name in ("torchserve.out", "ts_log.log", "model_log.log"):  # the next attempt's logs start empty
                with contextlib.suppress(OSError):
                    (logs / name).rename(logs / f"{name}.attempt{attempt}")
            print(f"TorchServe lost a port to another process ({PORT_TAKEN}); new ports, attempt {attempt + 1}",
                  file=sys.stderr)  # fmt: skip
    raise AssertionError("unreachable")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


class Server(typing.NamedTuple):
    urls: dict[str, str]  # "inference", "management", "metrics": HTTP base urls
    ports: dict[str, int]  # every listener (PORT_NAMES)
    proc: subprocess.Popen  # the launcher (run in the foreground: the frontend's parent)
    workers: int  # READY workers at start


@contextlib.contextmanager
def serving(
    base: Path,
    model_store: Path,
    config: Path | None = ROOT / "config.properties",
    extra: dict | None = None,
    env: dict | None = None,
    log_config: Path | None = LOG_CONFIG,
    timeout: float = 180,
    python: Path | None = None,
) -> typing.Iterator[Server]:
    """TorchServe serving ``model_store`` with a copy of ``config`` (None: TorchServe's defaults) whose
    listeners are moved to free loopback ports, plus ``extra`` settings; config, logs and temp dir in ``base``;
    from ``python``'s environment (None: this interpreter's, SERVE_PYTHON: make serve's).
    Yields once the model is READY; always stopped, and any process it left behind is killed."""
    import psutil  # only here: the container's HEALTHCHECK imports this module every 10 s

    logs, tmp = base / "logs", base / "tmp"
    proc, ports, urls, status = start_on_free_ports(base, model_store, config, extra, env, log_config, timeout, python)
    spawned: list = []
    try:
        spawned = psutil.Process(proc.pid).children(recursive=True)
        yield Server(urls, ports, proc, len(status["workers"]))
    finally:
        with contextlib.suppress(psutil.Error):
            spawned += psutil.Process(proc.pid).children(recursive=True)
        stop(logs, tmpdir=tmp, python=python)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reap(spawned)


def reap(procs: list) -> None:
    """Terminate the psutil processes ``procs`` that still run (kill after 10 s)."""
    import psutil

    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=10)
    for p in alive:
        print(f"killing a leftover process {p.pid}", file=sys.stderr)
        with contextlib.suppress(psutil.Error):
            p.kill()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return f"--- last lines of {path.name}:\n" + "\n".join(path.read_text().splitlines()[-lines:]) + "\n"
    except OSError:
        return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--log-dir", type=Path, default=ROOT / "logs")
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument("--quiet", action="store_true", help="status: print nothing, only the exit code")
    p.add_argument("--drain-timeout", type=float, default=30,
                   help="stop: seconds to wait for no request in flight before stopping anyway")  # fmt: skip
    args = p.parse_args()
    props = read_properties(args.config)
    # TS_* variables override config.properties when enable_envvars_config=true (the container uses that).
    management = os.environ.get("TS_MANAGEMENT_ADDRESS") or props.get("management_address", "http://127.0.0.1:8081")
    if args.action == "stop":
        t0 = time.monotonic()
        if stop(args.log_dir, management=management, drain_timeout=args.drain_timeout):
            print(f"TorchServe stopped after {time.monotonic() - t0:.1f}s (no request in flight)")
        else:
            print(f"TorchServe stopped: still busy after {args.drain_timeout:.0f}s, requests in flight were cut")
        return
    if args.action == "status":  # also the container's HEALTHCHECK
        status = model_status(management)
        if not args.quiet:
            print(json.dumps(status, indent=1))
        sys.exit(0 if status["ready"] else 1)
    if not (args.model_store / f"{MODEL}.mar").exists():
        sys.exit(f"{args.model_store / (MODEL + '.mar')} is missing: run `make archive` first")
    if model_status(management)["ready"]:
        print(f"{MODEL} is already READY at {management} (`make stop` first to restart it)")
        return
    taken = ports_in_use(props)
    if taken:
        sys.exit(f"cannot start TorchServe: {', '.join(taken)} in use by another process "
                 f"(change the address in {args.config}, or stop what listens there)")  # fmt: skip
    t0 = time.monotonic()
    start(args.config.resolve(), args.model_store.resolve(), args.log_dir.resolve())
    try:
        status = wait_ready(management, args.timeout)
    except (TimeoutError, RuntimeError) as e:
        sys.exit(f"{e}\nSee {args.log_dir}/model_log.log and {args.log_dir}/ts_log.log")
    inference = props.get("inference_address", "http://127.0.0.1:8080")
    print(f"{MODEL} READY ({len(status['workers'])} workers) in {time.monotonic() - t0:.1f}s")
    print(f"  curl -T samples/14-stop.png {inference}/predictions/{MODEL}")


if __name__ == "__main__":
    main()
