"""The cost bound of SECURITY.md over real HTTP on a real TorchServe: whatever its bytes, a request costs the
workers at most 0.5 s of CPU and 200 MB of RSS (issue 22). Each bomb family at the body limit gets its 4xx,
and the worst request each family may still send is answered 200; every one within the bound, with a good
request answered beside it and the same worker processes before and after.

CPU is the workers' user + system time (psutil) before and after; memory is their peak RSS during the request
(the kernel's high-water mark, reset before it through /proc/PID/clear_refs) over their RSS before it."""

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests
import yaml
from PIL import Image

from bench import bombs
from bench.decode_cost import BOMBS, accepted_by_checks, canvases, dense, largest, n_for_bytes
from tests.conftest import ROOT
from tests.ts_server import serving, worker_pids

pytestmark = pytest.mark.e2e
CPU_S, RSS_MB = 0.5, 200  # per request, in the workers (SECURITY.md, "Cost of one request")
HANDLER = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
MAX_BYTES, MAX_PIXELS = HANDLER["max_bytes"], HANDLER["max_pixels"]
OCTETS = {"Content-Type": "application/octet-stream"}
GOOD = bombs.encode(Image.new("RGB", (64, 64), (200, 30, 30)), "PNG")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("ts")) as urls:
        yield urls


def _status_kb(pid: int, key: str) -> int:
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith(key + ":")))  # fmt: skip


def costed(server, data: bytes, headers: dict = OCTETS, **kw) -> tuple[requests.Response, float, float]:
    """Send ``data`` with a good request beside it: (its response, worker CPU seconds, worker peak RSS growth
    in MB), after checking that the good request was answered and no worker was replaced."""
    pids = worker_pids(server)
    procs = [psutil.Process(pid) for pid in pids]
    for p in procs:
        Path(f"/proc/{p.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    rss = {p.pid: _status_kb(p.pid, "VmRSS") for p in procs}
    cpu = sum(sum(p.cpu_times()[:2]) for p in procs)
    url = f"{server['inference']}/predictions/gtsrb"
    with ThreadPoolExecutor(2) as pool:
        sent = pool.submit(requests.post, url, data=data, headers=headers, timeout=60, **kw)
        good = pool.submit(requests.post, url, data=GOOD, headers=OCTETS, timeout=60)
        r, g = sent.result(), good.result()
    cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu
    peak = sum(_status_kb(p.pid, "VmHWM") - rss[p.pid] for p in procs) / 1024
    assert g.status_code == 200 and len(g.json()) == 5, "the good request beside it was not answered"
    assert worker_pids(server) == pids, "a worker was replaced"
    return r, cpu, peak


def within_bound(name: str, cpu: float, peak: float) -> None:
    print(f"{name}: {cpu:.3f} s CPU, {peak:.0f} MB")  # pytest -s shows the costs
    assert cpu <= CPU_S, f"{name}: {cpu:.2f} s of worker CPU"
    assert peak <= RSS_MB, f"{name}: {peak:.0f} MB of worker RSS"


@pytest.mark.parametrize("family", list(BOMBS))
def test_each_bomb_family_at_the_body_limit_costs_little(server, family):
    """At the body limit, a 4xx before the costly part; the most the checks accept, a 200; both in the bound."""
    make, max_n = BOMBS[family]
    at_limit = n_for_bytes(make, MAX_BYTES, max_n)
    data = make(at_limit)
    assert len(data) <= MAX_BYTES
    r, cpu, peak = costed(server, data)
    body = r.json()
    assert 400 <= r.status_code < 500 and body["code"] == r.status_code and body["message"], (family, body)
    assert body["type"] in ("ImageTooComplex", "InvalidImage"), (family, body)  # TIFF: not a format we decode
    within_bound(f"{family}, n={at_limit}", cpu, peak)

    n = largest(make, lambda d: accepted_by_checks(d, MAX_PIXELS, MAX_BYTES), at_limit)
    if accepted_by_checks(make(n), MAX_PIXELS, MAX_BYTES):  # the family has a form that is served
        r, cpu, peak = costed(server, make(n))
        assert r.status_code == 200, (family, n, r.text[:200])
        within_bound(f"{family}, n={n} (the most accepted)", cpu, peak)


def _saved(make, fmt: str, kw: dict) -> bytes:
    buf = io.BytesIO()
    make().save(buf, fmt, **kw)
    return buf.getvalue()


SIDE = int(MAX_PIXELS**0.5)
AT_THE_LIMITS = dense(SIDE, MAX_BYTES) | {
    name: (lambda make=make, fmt=fmt, kw=kw: _saved(make, fmt, kw)) for name, (make, fmt, kw) in canvases(SIDE).items()
}


@pytest.mark.parametrize("name", list(AT_THE_LIMITS))
def test_the_largest_images_accepted_cost_little(server, name):
    """Images at the pixel or the body limit (noise: the most coded data per pixel) are served in the bound."""
    data = AT_THE_LIMITS[name]()
    r, cpu, peak = costed(server, data)
    if len(data) > MAX_BYTES:  # a 2048x2048 float PFM: the frontend's 413
        assert r.status_code == 413, name
    elif r.status_code != 200:
        assert r.json()["type"] == "InvalidImage" and "TIFF" in name, (name, r.text[:200])
    within_bound(name, cpu, peak)


def test_base64_json_at_the_body_limit_costs_little(server):
    image = bombs.jpeg_dense(1500, 1100, quality=90)  # 3 MiB of JPEG, 4 MiB of base64
    body = json.dumps({"data": base64.b64encode(image).decode()}).encode()
    assert MAX_BYTES / 2 < len(body) <= MAX_BYTES
    r, cpu, peak = costed(server, body, {"Content-Type": "application/json"})
    assert r.status_code == 200
    within_bound("base64 JSON", cpu, peak)


def test_multipart_with_many_fields_costs_little(server):
    """TorchServe's worker unpacks every form field before the handler refuses them (400)."""
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\n\r\n'  # the shortest field (51 bytes)
    body = part * ((MAX_BYTES - 8) // len(part)) + b"--b--\r\n"
    r, cpu, peak = costed(server, body, {"Content-Type": "multipart/form-data; boundary=b"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    within_bound("multipart", cpu, peak)


def test_input_log_is_one_file_per_worker(server):
    """Each worker writes its own input log, named by its TorchServe port, and every served request is in one."""
    url = f"{server['inference']}/predictions/gtsrb"
    logs = server["logs"]

    def rows() -> int:
        return sum(len(f.read_text().splitlines()) for f in logs.glob("gtsrb_inputs.jsonl*"))

    def settled() -> int:  # earlier tests' rows may still be in flight: the monitor thread writes once a second
        last, stable_since = rows(), time.monotonic()
        while time.monotonic() - stable_since < 2.5:
            time.sleep(0.25)
            if (now := rows()) != last:
                last, stable_since = now, time.monotonic()
        return last

    before = settled()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: requests.post(url, data=GOOD, headers=OCTETS, timeout=60), range(32)))
    assert all(a.status_code == 200 for a in answers)
    deadline = time.monotonic() + 30  # the monitor thread writes once a second
    while rows() < before + 32 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert settled() == before + 32  # each request logged once: none lost, none twice
    desc = requests.get(f"{server['management']}/models/gtsrb", timeout=5).json()[0]
    ports = {str(w["id"]) for w in desc["workers"]}
    names = {f.name for f in logs.glob("gtsrb_inputs.jsonl*")}
    assert names and all(n.split(".")[2][1:] in ports and n.split(".")[2][0] == "w" for n in names), (names, ports)
