"""The serving image, run for real: `make docker-test` (builds it first; IMAGE=... picks another tag).

Not part of `make test` (it needs a Docker engine and minutes to build). It runs the image the way
`make docker-run` and the Compute Engine VM do (docker/run.sh) and checks what a user of it meets: it turns
healthy and /ready once the model is READY, signs get the answers of the model in this repository's own
torch (the image's CPU-only torch may be another version), bad input gets a 4xx JSON error, it runs as
non-root with inference published and metrics on the host's loopback only, the input-statistics log lands in
the mounted folder, memory is bounded (container limit, JVM heap), the image holds exactly the locked
packages and its SBOM lists them, `docker stop` under load loses no request, and the container stops when
TorchServe dies. The edge (HAProxy in the image): HTTP/1.1 only, body and form caps, slow bodies cut, a
per-client connection limit, explanations one at a time (a prediction beside 8 of them stays within 2x of
idle), and readiness that stays up while one of two workers is killed under load. It runs locked down as on
the VM: read-only, no capabilities, no privilege gain, bounded processes and CPU.
"""

import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from PIL import Image

from handler.presets import EvalPreset
from tests.conftest import MODEL, NAMES, ROOT
from tests.corpus import encode
from training import export

pytestmark = pytest.mark.docker
IMAGE = os.environ.get("IMAGE", "gtsrb-serve:latest")
DOCKER = os.environ.get("DOCKER", "docker")
LOCK = ROOT / "requirements" / "image-lock.txt"


def docker(*args, check=True, timeout=120) -> str:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def health(name) -> str:
    return docker("inspect", "-f", "{{.State.Health.Status}}", name, check=False)


def run_container(logs) -> dict:
    """docker/run.sh (make docker-run), detached, on random loopback ports; waits until Docker says healthy."""
    if not shutil.which(DOCKER) or subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine: start one (dockerd) or run `make test` for everything else")
    docker("image", "inspect", IMAGE)  # built by `make docker-build`
    name = f"gtsrb-test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "IMAGE": IMAGE, "DOCKER": DOCKER, "NAME": name, "LOGS": str(logs),
           "HTTP_PUBLISH": "127.0.0.1:", "METRICS_PUBLISH": "127.0.0.1:"}  # fmt: skip
    subprocess.run(["bash", str(ROOT / "docker" / "run.sh"), "-d"], env=env, check=True, capture_output=True)
    try:
        port = {p: docker("port", name, f"{p}/tcp").splitlines()[0].rsplit(":", 1)[1] for p in (8080, 8082)}
        deadline = time.monotonic() + 180
        while (status := health(name)) != "healthy":
            assert status in ("starting", "healthy"), f"container is {status}: {docker('logs', name, check=False)}"
            assert time.monotonic() < deadline, f"not healthy after 180 s: {docker('logs', '--tail', '40', name)}"
            time.sleep(1)
    except BaseException:
        docker("rm", "-f", name, check=False)  # a container that never got healthy is not left behind
        raise
    ip = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)
    return {"name": name, "url": f"http://127.0.0.1:{port[8080]}", "metrics": f"http://127.0.0.1:{port[8082]}",
            "ip": ip, "logs": logs}  # fmt: skip


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    info = run_container(tmp_path_factory.mktemp("container-logs"))
    try:
        yield info
    finally:
        docker("rm", "-f", info["name"], check=False)


def predict(url, body: bytes) -> requests.Response:
    return requests.post(f"{url}/predictions/gtsrb", data=body, headers={"Content-Type": "image/png"}, timeout=30)


def png(path) -> bytes:
    return encode(Image.open(path), "PNG")


def test_non_root_cpu_torch_and_only_inference_and_metrics_published_on_loopback(container):
    assert docker("exec", container["name"], "id", "-u") != "0"
    exposed = json.loads(docker("image", "inspect", "-f", "{{json .Config.ExposedPorts}}", IMAGE))
    assert list(exposed) == ["8080/tcp"]
    cuda = docker("exec", container["name"], "python3", "-c", "import torch; print(torch.version.cuda)")
    assert cuda == "None"
    # docker/run.sh publishes 8080 and the metrics port on this host's loopback only, nothing else.
    published = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", container["name"]))
    assert {k: [b["HostIp"] for b in v] for k, v in published.items() if v} == {
        "8080/tcp": ["127.0.0.1"],
        "8082/tcp": ["127.0.0.1"],
    }
    # At the container's own address (no port publishing involved): HAProxy (8080) and, for a scraper on the
    # host, the metrics (8082) accept; TorchServe's own inference (8079), management (8081), gRPC (7070/7071)
    # and the readiness probe (8086) stay on the container's loopback.
    for port in (8080, 8082):
        socket.create_connection((container["ip"], port), timeout=5).close()
    for port in (8079, 8081, 8086, 7070, 7071):
        with pytest.raises(OSError):
            socket.create_connection((container["ip"], port), timeout=5).close()
    # Without run.sh's TS_METRICS_ADDRESS the image keeps the metrics on the container's loopback.
    env = json.loads(docker("image", "inspect", "-f", "{{json .Config.Env}}", IMAGE))
    assert not any(e.startswith("TS_METRICS_ADDRESS=") for e in env)


def test_ready_and_metrics_and_input_log_reach_the_host(container, signs):
    assert requests.get(f"{container['url']}/ready", timeout=5).json() == {"status": "READY"}
    assert predict(container["url"], png(signs[0][0])).status_code == 200
    metrics = requests.get(f"{container['metrics']}/metrics", timeout=5).text
    assert "ts_inference_requests_total" in metrics
    # The input-statistics log (the drift report's input) is in the host folder docker/run.sh mounted, one
    # file per worker (gtsrb_inputs.jsonl.w<port>).
    deadline = time.monotonic() + 10
    while not (logs := [f for f in container["logs"].glob("gtsrb_inputs.jsonl.w*") if f.read_text().strip()]):
        assert time.monotonic() < deadline, "no input log row"
        time.sleep(0.2)
    assert json.loads(logs[0].read_text().splitlines()[-1])


def test_memory_is_bounded(container):
    limit = int(docker("inspect", "-f", "{{.HostConfig.Memory}}", container["name"]))
    assert limit == 4 * 2**30  # docker/run.sh: 4 GiB
    # The frontend runs with config.properties' vmargs; in this container they give a heap of 40% of 4 GiB.
    find_java = "import psutil; print(' '.join(next(p.cmdline() for p in psutil.process_iter() if p.name() == 'java')))"
    cmdline = docker("exec", container["name"], "python3", "-c", find_java)
    assert "-XX:MaxRAMPercentage=40" in cmdline and "-XX:+ExitOnOutOfMemoryError" in cmdline
    flags = docker("exec", container["name"], "java", "-XX:MaxRAMPercentage=40", "-XX:+PrintFlagsFinal", "-version")
    (heap,) = [int(line.split()[3]) for line in flags.splitlines() if " MaxHeapSize " in line]
    assert heap == pytest.approx(0.4 * limit, rel=0.02)
    # HAProxy keeps forms (whose fields the frontend keeps on its heap one by one) small.
    form = b"&".join(b"f%d=" % i for i in range(60_000))
    r = requests.post(f"{container['url']}/predictions/gtsrb", data=form,
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)  # fmt: skip
    assert r.status_code == 413 and r.json()["type"] == "FormTooLarge"


def test_image_holds_exactly_the_locked_packages(container):
    locked = {}
    for line in LOCK.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            name, version = line.split(" ")[0].split("==")
            locked[name.lower().replace("_", "-")] = version
    freeze = docker("exec", container["name"], "pip", "list", "--format=json")
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(freeze)}
    assert {k: installed.get(k) for k in locked} == locked
    assert set(installed) - set(locked) <= {"pip"}  # the venv's own installer, from Debian's python3-venv


def test_sbom_lists_debian_python_and_java_parts(container, tmp_path):
    """make docker-sbom's command (syft), on the image: one SBOM for all three package worlds."""
    syft = shutil.which("syft", path=str(ROOT / ".venv" / "bin")) or shutil.which("syft")
    assert syft, "syft is missing: pip install -r requirements/dev.txt"
    out = tmp_path / "sbom.cdx.json"
    env = {**os.environ, "SYFT_CHECK_FOR_APP_UPDATE": "false"}
    subprocess.run([syft, "scan", f"docker:{IMAGE}", "-q", "-o", f"cyclonedx-json={out}"], env=env, check=True,
                   timeout=1200)  # fmt: skip
    components = {c["name"]: c.get("version") for c in json.loads(out.read_text())["components"]}
    locked = dict(re.findall(r"^(torch|torchserve)==(\S+)", LOCK.read_text(), re.M))
    assert (components["torch"], components["torchserve"]) == (locked["torch"], locked["torchserve"])
    assert components["haproxy"].startswith("2.6.") and components["openjdk-17-jre-headless"].startswith("17.")
    assert "model-server" in components  # TorchServe's frontend jar (its bundled libraries: SECURITY.md)


def test_signs_get_the_answers_of_the_shipped_model(container, signs):
    model = export.load(MODEL)
    preset = EvalPreset(size=int(model.image_size))
    for path, label in signs:
        body = png(path)
        r = predict(container["url"], body)
        assert r.status_code == 200, r.text
        served = r.json()
        with torch.inference_mode():
            probs = torch.softmax(model(preset(Image.open(io.BytesIO(body)))[None]), 1)[0]
        top = torch.topk(probs, len(served))
        expected = {NAMES[str(i)]: p for p, i in zip(top.values.tolist(), top.indices.tolist())}
        assert list(served) == list(expected), f"{path.name}: {served} != {expected}"
        for k in served:
            assert served[k] == pytest.approx(expected[k], abs=1e-4)
        assert list(served)[0] == NAMES[str(label)]


def test_bad_input_gets_a_4xx_json_error(container, signs):
    for body in (b"this is not an image", png(signs[0][0])[:60]):
        r = predict(container["url"], body)
        assert r.status_code == 400 and r.json()["code"] == 400 and r.json()["message"], r.text
    # Forms: a small urlencoded form reaches the handler, and what TorchServe's own form decoder cannot parse (a 500
    # from the bare frontend, tests/test_e2e_hostile.py) leaves the edge as a 400 in the same JSON shape.
    url, form = f"{container['url']}/predictions/gtsrb", {"Content-Type": "application/x-www-form-urlencoded"}
    cases = {
        "urlencoded %C3%A9=1&x=2": ({"data": b"%C3%A9=1&x=2", "headers": form}, "InvalidInput"),
        "urlencoded %ZZ": ({"data": b"%ZZ=1", "headers": form}, "InvalidForm"),
        "urlencoded image (bare curl --data-binary)": (
            {"data": b"P6\n# 100% = 1\n2 2\n255\n" + bytes(12), "headers": form},
            "InvalidForm",
        ),
        "multipart empty field name": ({"files": {"": (None, b"1")}}, "InvalidForm"),
    }
    for name, (kwargs, error_type) in cases.items():
        r = requests.post(url, timeout=30, **kwargs)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (name, r.text)
        assert r.json()["code"] == 400 and r.json()["type"] == error_type and r.json()["message"], (name, r.text)
    assert predict(container["url"], png(signs[0][0])).status_code == 200  # and the workers are fine


def test_healthcheck_and_ready_fail_when_the_model_has_no_workers(container):
    """Docker's HEALTHCHECK and /ready (the load balancer's health check) follow the workers, not the process."""
    name = container["name"]
    check = [DOCKER, "exec", name, "python3", "/opt/gtsrb/tools/torchserve_ctl.py", "status", "--quiet"]
    scale = "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8081/models/gtsrb?min_worker={n}&max_worker={n}', method='PUT'), timeout=30)"  # noqa: E501

    def until(probe, expected, timeout=60):
        deadline = time.monotonic() + timeout
        while (got := probe()) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return got

    def healthcheck():
        return subprocess.run(check).returncode

    def ready():
        return requests.get(f"{container['url']}/ready", timeout=5).status_code

    assert until(healthcheck, 0) == 0 and until(ready, 200) == 200
    docker("exec", name, "python3", "-c", scale.format(n=0))  # the server keeps running, the model cannot answer
    assert until(healthcheck, 1) == 1 and until(ready, 503) == 503
    assert predict(container["url"], b"x").status_code == 503  # HAProxy: no model to send it to, JSON error
    docker("exec", name, "python3", "-c", scale.format(n=2))
    assert until(healthcheck, 0) == 0 and until(ready, 200) == 200


# ---------------------------------------------------------------------------------------------- the edge


def raw_request(ip: str, head: bytes, body_chunks=(), gap_s: float = 0.0, wait_s: float = 30) -> tuple[float, bytes]:
    """Send ``head`` then each body chunk ``gap_s`` apart on one connection; -> (seconds until the first byte
    of the answer, the answer's status line; b"" if the connection closed without one)."""
    with socket.create_connection((ip, 8080), timeout=wait_s) as s:
        t0, got = time.monotonic(), {}

        def read():
            try:
                got["line"] = s.recv(200).split(b"\r\n")[0]
            except OSError:
                got["line"] = b""
            got["t"] = time.monotonic() - t0

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        s.sendall(head)
        for chunk in body_chunks:
            if reader.join(gap_s) or "t" in got:
                break
            try:
                s.sendall(chunk)
            except OSError:
                break
        reader.join(wait_s)
    return got.get("t", float("inf")), got.get("line", b"")


def test_edge_speaks_http1_only_and_caps_bodies_and_forms(container, signs):
    """HAProxy in the image: no HTTP/2 (where a form could come without a content-length), every body capped at
    TorchServe's max_request_size, forms that do not say their size refused, multipart from curl -F still fine,
    and a client's own `explain` header cannot turn a prediction into an explanation."""
    ip, url = container["ip"], f"http://{container['ip']}:8080"
    # HTTP/2 with prior knowledge (h2c): HAProxy answers it as a broken HTTP/1.1 request, TorchServe never sees it.
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
    _, line = raw_request(ip, preface, wait_s=10)
    assert not line.startswith(b"HTTP/2") and (line == b"" or b" 400 " in line), line
    upgrade = requests.get(f"{url}/ready", headers={"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c",
                                                    "HTTP2-Settings": "AAMAAABkAARAAAAAAAIAAAAA"}, timeout=10)  # fmt: skip
    assert upgrade.status_code == 200 and upgrade.raw.version == 11  # no 101 Switching Protocols
    limit = int(docker("exec", container["name"], "sh", "-c", "grep ^max_request_size= /opt/gtsrb/config.properties")
                .split("=")[1])  # fmt: skip
    over = requests.post(f"{url}/predictions/gtsrb", data=b"\0" * (limit + 1), headers={"Content-Type": "image/png"},
                         timeout=60)  # fmt: skip
    assert over.status_code == 413 and over.json()["type"] == "RequestTooLarge"
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n' for _ in range(1000)) + b"--b--\r\n"
    for ctype in ("multipart/form-data; boundary=b", "application/x-www-form-urlencoded"):
        chunked = requests.post(f"{url}/predictions/gtsrb", data=iter([parts]), headers={"Content-Type": ctype},
                                timeout=30)  # fmt: skip
        assert chunked.status_code == 411 and chunked.json()["type"] == "LengthRequired", ctype
    body = png(signs[0][0])
    ok = requests.post(f"{url}/predictions/gtsrb", files={"data": ("sign.png", body, "image/png")}, timeout=30)
    assert ok.status_code == 200 and list(ok.json())[0] == NAMES[str(signs[0][1])]
    r = requests.post(f"{url}/predictions/gtsrb", data=body, headers={"Content-Type": "image/png", "explain": "True"},
                      timeout=30)  # fmt: skip
    assert r.status_code == 200 and "saliency" not in r.json()


def test_edge_cuts_slow_bodies_and_limits_connections_per_client(container, signs):
    """A body sent slowly (5 bytes over 20 s) gets a 408 after 10 s without ever reaching TorchServe; one client
    address holds at most 20 connections at once."""
    ip = container["ip"]
    head = b"POST /predictions/gtsrb HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5\r\n\r\n"
    cut_s, line = raw_request(ip, head, [b"x"] * 5, gap_s=4, wait_s=30)
    print(f"slow body cut after {cut_s:.1f} s: {line!r}")
    assert b" 408 " in line and 9 <= cut_s <= 12
    conns = []
    for _ in range(25):
        try:
            conns.append(socket.create_connection((ip, 8080), timeout=5))
        except ConnectionResetError:  # refused so fast that the reset came before connect() returned (a busy host)
            pass
    try:
        answered = 0
        for c in conns:
            try:
                c.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
                answered += c.recv(100).startswith(b"HTTP/1.1 200")
            except OSError:
                pass
        print(f"25 connections from one address: {answered} answered")
        assert answered == 20
    finally:
        for c in conns:
            c.close()
    assert predict(f"http://{ip}:8080", png(signs[0][0])).status_code == 200  # and the client is served again


def test_explanations_leave_predictions_within_twice_their_idle_latency(container, signs):
    """8 clients asking for explanations at once (each ~0.3-0.5 s of one worker): HAProxy lets one at a time into
    TorchServe, so a prediction sent meanwhile is answered within 2x its latency on an idle server (medians)."""
    url = f"http://{container['ip']}:8080"
    body = png(signs[0][0])
    session = requests.Session()  # closed below: the connection limit above counts open connections

    def latency() -> float:
        t0 = time.perf_counter()
        r = session.post(f"{url}/predictions/gtsrb", data=body, headers={"Content-Type": "image/png"}, timeout=60)
        assert r.status_code == 200
        return time.perf_counter() - t0

    for _ in range(5):
        latency()  # warm-up
    idle = sorted(latency() for _ in range(41))[20]
    stop, explained = threading.Event(), []

    def explain():
        with requests.Session() as s:
            while not stop.is_set():
                r = s.post(f"{url}/explanations/gtsrb", data=body, headers={"Content-Type": "image/png"}, timeout=120)
                explained.append(r.status_code)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(explain)
        time.sleep(3)
        busy = sorted(latency() for _ in range(41))[20]
        stop.set()
    session.close()
    print(f"prediction latency, median of 41: idle {idle * 1e3:.0f} ms, beside 8 explanation clients "
          f"{busy * 1e3:.0f} ms ({busy / idle:.2f}x); explanations answered: {Counter(explained)}")  # fmt: skip
    assert explained and set(explained) == {200}
    assert busy <= 2 * idle


def test_one_worker_killed_under_load_the_other_keeps_answering(container, signs):
    """kill -9 one of the two workers while 8 clients send signs: /ready stays 200 all along (at least one worker
    READY), the other worker keeps answering, and only the requests the dead worker held fail."""
    name, url = container["name"], f"http://{container['ip']}:8080"
    body = png(signs[0][0])
    mgmt = "import json, urllib.request as u; print(json.dumps(json.load(u.urlopen('http://127.0.0.1:8081/models/gtsrb'))[0]['workers']))"  # noqa: E501

    def workers() -> list[dict]:
        return json.loads(docker("exec", name, "python3", "-c", mgmt))

    phase, outcomes, ready, lock, stop = ["before"], [], [], threading.Lock(), threading.Event()

    def client():
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    code = s.post(f"{url}/predictions/gtsrb", data=body, headers={"Content-Type": "image/png"},
                                  timeout=60).status_code  # fmt: skip
                except requests.RequestException:
                    code = "no answer"
                with lock:
                    outcomes.append((phase[0], code))

    def watch_ready():
        while not stop.is_set():
            ready.append(requests.get(f"{url}/ready", timeout=10).status_code)
            time.sleep(0.2)

    before = workers()
    assert len(before) == 2 and all(w["status"] == "READY" for w in before)
    threads = [threading.Thread(target=client) for _ in range(8)] + [threading.Thread(target=watch_ready)]
    for t in threads:
        t.start()
    try:
        time.sleep(5)
        victim = before[0]["pid"]
        phase[0] = "restarting"
        docker("exec", name, "sh", "-c", f"kill -9 {victim}")
        killed, recovered = time.monotonic(), None
        while time.monotonic() - killed < 90:
            now = workers()
            if len(now) == 2 and all(w["status"] == "READY" for w in now) and victim not in {w["pid"] for w in now}:
                recovered = time.monotonic() - killed
                break
            time.sleep(0.2)
        phase[0] = "after"
        time.sleep(5)
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    counts = {p: Counter(c for q, c in outcomes if q == p) for p in ("before", "restarting", "after")}
    print(f"worker {victim} killed; all READY again after {recovered and round(recovered, 1)} s; answers: {counts}; "
          f"/ready: {Counter(ready)}")  # fmt: skip
    assert recovered is not None
    assert set(counts["before"]) == {200} and set(counts["after"]) == {200}
    assert counts["restarting"][200] > 0  # the other worker kept answering while the dead one was restarted
    failed = sum(n for c, n in counts["restarting"].items() if c != 200)
    assert failed <= 8  # at most the batch the killed worker held
    assert set(ready) == {200}  # readiness degraded (one worker), it never went down


def test_runs_read_only_without_capabilities_and_bounded(container):
    """docker/run.sh's flags, the VM's too (tests/test_deploy.py checks they agree): the root file system is
    read-only, the processes have no capabilities and cannot gain privileges, processes and CPU are bounded."""
    name = container["name"]
    host = json.loads(docker("inspect", "-f", "{{json .HostConfig}}", name))
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert "no-new-privileges" in host["SecurityOpt"] and host["PidsLimit"] == 512 and host["NanoCpus"] == 2 * 10**9
    assert set(host["Tmpfs"]) == {"/home/model-server/tmp", "/tmp"}
    status = docker("exec", name, "cat", "/proc/1/status")
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    for path in ("/opt/gtsrb/model_store/x", "/home/model-server/x", "/opt/gtsrb/workflow_store/x"):
        r = subprocess.run([DOCKER, "exec", name, "touch", path], capture_output=True, text=True)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, (path, r.stderr)
    tasks = int(docker("exec", name, "sh", "-c", "ls -d /proc/[0-9]*/task/* | wc -l"))
    print(f"processes and threads in the container: {tasks} (limit 512)")
    assert tasks < 512 / 2  # room for TorchServe to restart workers


def test_container_exits_when_torchserve_dies(container):
    # TorchServe runs in the foreground: if its Java frontend is killed, the container stops (and a restart
    # policy or the VM's systemd unit brings it back) instead of idling with no server inside.
    name = container["name"]
    kill_java = 'for p in /proc/[0-9]*; do grep -q "org.pytorch.serve.ModelServe[r]" $p/cmdline 2>/dev/null && kill -9 ${p#/proc/}; done'  # noqa: E501
    docker("exec", name, "sh", "-c", kill_java, check=False)
    deadline = time.monotonic() + 30
    # Started with --rm: an exited container may already be gone ("No such object"), which counts as stopped.
    while docker("inspect", "-f", "{{.State.Running}}", name, check=False) == "true":
        assert time.monotonic() < deadline, "container still running 30 s after TorchServe died"
        time.sleep(0.5)


def test_docker_stop_under_load_loses_no_request(tmp_path, signs):
    """Clients keep sending while `docker stop` runs: every request the server accepted gets its answer.

    The clients talk to the container's address directly, as the VM's load balancer does through Docker's DNAT:
    a connection to a port nobody listens on any more is refused, which a client (or load balancer) can retry.
    Docker's userland proxy (a loopback-published port) would accept and then close it instead."""
    info = run_container(tmp_path / "logs")
    url = f"http://{info['ip']}:8080/predictions/gtsrb"
    body = png(signs[0][0])
    outcomes, lock, stopping = [], threading.Lock(), threading.Event()

    def client():
        session = requests.Session()
        while True:
            try:
                r = session.post(url, data=body, headers={"Content-Type": "image/png"}, timeout=60)
                outcome = r.status_code
            except requests.ConnectionError as e:
                outcome = "refused" if "refused" in str(e).lower() else f"dropped: {e}"
            with lock:
                outcomes.append((stopping.is_set(), outcome))
            if outcome == "refused":
                return

    clients = [threading.Thread(target=client) for _ in range(16)]
    # run.sh runs with --rm: follow the logs and wait for the exit code before the container is gone.
    logs = subprocess.Popen([DOCKER, "logs", "-f", info["name"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    waiter = subprocess.Popen([DOCKER, "wait", info["name"]], stdout=subprocess.PIPE, text=True)
    try:
        for t in clients:
            t.start()
        time.sleep(3)
        stopping.set()
        t0 = time.monotonic()
        docker("stop", info["name"], timeout=90)  # run.sh gives it --stop-timeout 45
        stop_s = time.monotonic() - t0
        for t in clients:
            t.join(timeout=90)
        exit_code = waiter.communicate(timeout=30)[0].strip()
        logs = logs.communicate(timeout=30)[0]
    finally:
        docker("rm", "-f", info["name"], check=False)
        for proc in (logs, waiter):
            if isinstance(proc, subprocess.Popen) and proc.poll() is None:
                proc.kill()
    during = Counter(o if isinstance(o, int) or o == "refused" else "dropped" for s, o in outcomes if s)
    print(f"docker stop took {stop_s:.1f} s; answers before: {sum(not s for s, _ in outcomes)}, during: {dict(during)}")
    assert [o for _, o in outcomes if o not in (200, "refused")] == []  # nothing dropped, no error answer
    assert during[200] >= len(clients)  # requests were in flight when the stop began, and were answered
    assert during["refused"] == len(clients)  # then each client found the door closed
    assert exit_code == "0" and "drained in" in logs, logs[-2000:]
