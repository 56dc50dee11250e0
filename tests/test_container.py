"""The serving image, run for real: `make docker-test` (builds it first; IMAGE=... picks another tag).

Not part of `make test` (it needs a Docker engine and minutes to build). It checks what a user of the image
meets: the health status turns healthy once the model is READY, real signs get the same answers as the
model in this repository's own torch (the image's CPU-only torch may be another version: TorchScript files
are not promised to load in an older torch), bad input gets a 4xx JSON error, it runs as non-root with only
8080 exposed, the health check notices a model without workers, and the container stops when TorchServe dies.
"""

import io
import json
import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest
import requests
import torch
from PIL import Image

from tests.conftest import MODEL, ROOT
from training import export
from handler.presets import EvalPreset

pytestmark = pytest.mark.docker
IMAGE = os.environ.get("IMAGE", "gtsrb-serve:latest")
DOCKER = os.environ.get("DOCKER", "docker")
NAMES = json.loads((ROOT / "handler" / "index_to_name.json").read_text())


def docker(*args, check=True, timeout=120) -> str:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def health(name) -> str:
    return docker("inspect", "-f", "{{.State.Health.Status}}", name, check=False)


@pytest.fixture(scope="module")
def container():
    if not shutil.which(DOCKER) or subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine: start one (dockerd) or run `make test` for everything else")
    docker("image", "inspect", IMAGE)  # built by `make docker-build`
    name = f"gtsrb-test-{uuid.uuid4().hex[:8]}"
    docker("run", "-d", "--name", name, "-p", "127.0.0.1::8080", IMAGE)
    try:
        port = docker("port", name, "8080/tcp").splitlines()[0].rsplit(":", 1)[1]
        deadline = time.monotonic() + 180
        while (status := health(name)) != "healthy":
            assert status in ("starting", "healthy"), f"container is {status}: {docker('logs', name, check=False)}"
            assert time.monotonic() < deadline, f"not healthy after 180 s: {docker('logs', '--tail', '40', name)}"
            time.sleep(1)
        yield {"name": name, "url": f"http://127.0.0.1:{port}"}
    finally:
        docker("rm", "-f", name, check=False)


def predict(url, body: bytes) -> requests.Response:
    return requests.post(f"{url}/predictions/gtsrb", data=body, headers={"Content-Type": "image/png"}, timeout=30)


def png(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, "PNG")
    return buf.getvalue()


def test_image_runs_cpu_torch_as_non_root_and_exposes_8080_only(container):
    assert docker("exec", container["name"], "id", "-u") != "0"
    exposed = json.loads(docker("image", "inspect", "-f", "{{json .Config.ExposedPorts}}", IMAGE))
    assert list(exposed) == ["8080/tcp"]
    cuda = docker("exec", container["name"], "python3", "-c", "import torch; print(torch.version.cuda)")
    assert cuda == "None"
    # Only inference listens beyond the container's loopback: from outside, at the container's own address
    # (no port publishing involved), 8080 accepts and management (8081) and metrics (8082) refuse.
    ip = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", container["name"])
    socket.create_connection((ip, 8080), timeout=5).close()
    for port in (8081, 8082, 7070, 7071):
        with pytest.raises(OSError):
            socket.create_connection((ip, port), timeout=5).close()


def test_real_signs_get_the_answers_of_the_shipped_model(container, real_signs):
    model = export.load(MODEL)
    preset = EvalPreset(size=int(model.image_size))
    for path, label in real_signs:
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


def test_bad_input_gets_a_4xx_json_error(container, real_signs):
    for body in (b"this is not an image", png(real_signs[0][0])[:60]):
        r = predict(container["url"], body)
        assert r.status_code == 400 and r.json()["code"] == 400 and r.json()["message"], r.text
    assert predict(container["url"], png(real_signs[0][0])).status_code == 200  # and the workers are fine


def test_healthcheck_fails_when_the_model_has_no_workers(container):
    name = container["name"]
    check = [DOCKER, "exec", name, "python3", "/opt/gtsrb/tools/torchserve_ctl.py", "status", "--quiet"]
    scale = "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8081/models/gtsrb?min_worker={n}&max_worker={n}', method='PUT'), timeout=30)"  # noqa: E501

    def check_until(code, timeout=60):
        deadline = time.monotonic() + timeout
        while (rc := subprocess.run(check).returncode) != code and time.monotonic() < deadline:
            time.sleep(0.5)
        return rc

    assert check_until(0) == 0
    docker("exec", name, "python3", "-c", scale.format(n=0))  # the server keeps running, the model cannot answer
    assert check_until(1) == 1
    docker("exec", name, "python3", "-c", scale.format(n=2))
    assert check_until(0) == 0


def test_container_exits_when_torchserve_dies(container):
    # TorchServe runs in the foreground: if its Java frontend is killed, the container stops (and a restart
    # policy or the VM's systemd unit brings it back) instead of idling with no server inside.
    name = container["name"]
    kill_java = 'for p in /proc/[0-9]*; do grep -q "org.pytorch.serve.ModelServe[r]" $p/cmdline 2>/dev/null && kill -9 ${p#/proc/}; done'  # noqa: E501
    docker("exec", name, "sh", "-c", kill_java, check=False)
    deadline = time.monotonic() + 30
    while docker("inspect", "-f", "{{.State.Running}}", name) == "true":
        assert time.monotonic() < deadline, "container still running 30 s after TorchServe died"
        time.sleep(0.5)
