"""End to end: the real archive served by a real TorchServe (Java) on free ports, real HTTP."""

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import yaml
from PIL import Image

from tests.conftest import NAMES, ROOT
from tests.corpus import SAME_PREDICTION, encode, hostile_bodies, odd_images
from tests.ts_server import serving, worker_pids

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("ts")) as urls:
        yield urls


def predict(url, **kw) -> requests.Response:
    return requests.post(f"{url}/predictions/gtsrb", timeout=30, **kw)


def test_signs_raw_and_multipart(server, signs):
    for path, cls in signs:
        raw = requests.put(f"{server['inference']}/predictions/gtsrb", data=path.read_bytes(), timeout=30)  # curl -T
        assert raw.status_code == 200, raw.text
        body = raw.json()
        assert len(body) == 5 and next(iter(body)) == NAMES[str(cls)]
        big = Image.open(path).resize((128, 128), Image.BICUBIC)
        form = predict(server["inference"], files={"data": ("sign.png", encode(big, "PNG"), "image/png")})
        assert form.status_code == 200 and next(iter(form.json())) == NAMES[str(cls)]


def test_base64_json(server, signs):
    path, cls = signs[0]
    r = predict(server["inference"], json={"data": base64.b64encode(path.read_bytes()).decode()})
    assert r.status_code == 200 and next(iter(r.json())) == NAMES[str(cls)]


# The corpus's raw bodies go in test_hostile_corpus_concurrently_nothing_dies; these are the content types that make
# TorchServe decode the body before the handler sees it.
@pytest.mark.parametrize(
    "name, kwargs, status",
    [
        ("text", {"data": "hello", "headers": {"Content-Type": "text/plain"}}, 400),
        ("json without data", {"json": {"image": "x"}}, 400),
        ("broken json", {"data": b'{"data": ', "headers": {"Content-Type": "application/json"}}, 400),
        ("bad base64", {"json": {"data": "***"}}, 400),
    ],
)
def test_bad_input_is_a_4xx_json_error(server, name, kwargs, status):
    r = predict(server["inference"], **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text)
    body = r.json()
    assert body["code"] == status and body["message"], body


def test_truncated_image(server, signs):
    data = encode(Image.open(signs[0][0]).resize((64, 64)), "PNG")
    r = predict(server["inference"], data=data[: len(data) // 2], headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "truncated" in r.json()["message"]


def test_body_over_the_size_limit_is_refused(server):
    r = predict(server["inference"], data=b"\0" * (17 * 1024 * 1024), headers={"Content-Type": "image/png"})
    assert r.status_code == 413


def test_mixed_concurrent_traffic_keeps_workers_alive(server, signs):
    before = worker_pids(server)
    good = [(p.read_bytes(), NAMES[str(c)]) for p, c in signs]
    jobs = []
    for i in range(96):
        if i % 3 == 2:
            jobs.append((b"not an image %d" % i, None))
        else:
            jobs.append(good[i % len(good)])

    def send(job):
        data, expected = job
        r = predict(server["inference"], data=data, headers={"Content-Type": "application/octet-stream"})
        return r.status_code, r.json(), expected

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(send, jobs))
    for status, body, expected in results:
        if expected is None:
            assert status == 400 and body["type"] == "InvalidImage"
        else:
            assert status == 200 and next(iter(body)) == expected
    assert worker_pids(server) == before, "a worker died"


def test_every_listener_is_on_loopback(server):
    """Management, metrics and gRPC are reachable from this host only (token auth is off by design). The test
    server runs config.properties with only the ports moved (tools.torchserve_ctl.write_config keeps each
    listener's address), so these are the shipped addresses."""
    port = int(server["management"].rsplit(":", 1)[1])
    java = next(c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port)
    listening = [c.laddr for c in psutil.Process(java.pid).net_connections("tcp") if c.status == "LISTEN"]
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")  # IPv4 loopback, also as a v4-mapped IPv6 socket
    assert len(listening) >= 5 and all(a.ip in loopback for a in listening), listening


def test_model_registration_is_disabled(server, tmp_path):
    """No model can be registered, and no workflow (whose handler would run code) from anywhere: not a remote
    URL, not a file a local user wrote (allowed_urls admits the image's archive only), not a name (the workflow
    store is empty)."""
    r = requests.post(f"{server['management']}/models", params={"url": "https://example.com/evil.mar"}, timeout=10)
    assert r.status_code in (400, 403, 405), r.text
    planted = tmp_path / "model_store" / "evil.mar"  # the old pattern admitted any file:.../model_store/*.mar
    planted.parent.mkdir()
    planted.write_bytes(b"PK\x05\x06" + bytes(18))
    for url in (f"file://{planted}", "file:///tmp/model_store/gtsrb.mar", "https://example.com/evil.war"):
        r = requests.post(f"{server['management']}/workflows", params={"url": url}, timeout=30)
        assert r.status_code == 404 and "does not match any allowed URL" in r.json()["message"], (url, r.text)
    r = requests.post(f"{server['management']}/workflows", params={"url": "evil.war"}, timeout=30)
    assert r.status_code == 404 and "not found in workflow store" in r.json()["message"], r.text
    assert requests.get(f"{server['management']}/workflows", timeout=10).json() == {"workflows": []}
    assert worker_pids(server)


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _handler_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("GTSRB")]


def test_prometheus_metrics_move_with_traffic(server, signs):
    def scrape():
        return requests.get(f"{server['metrics']}/metrics", timeout=10).text

    def settled() -> str:
        """The metrics once the earlier tests' traffic is all in: two scrapes a monitor interval apart agree."""
        interval = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]["monitor_interval_s"]
        last, deadline = scrape(), time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1.5 * interval)
            now = scrape()
            if _handler_lines(now) == _handler_lines(last):
                return now
            last = now
        return last

    path, cls = signs[0]
    before = settled()
    for _ in range(3):
        assert predict(server["inference"], data=path.read_bytes()).status_code == 200
    assert predict(server["inference"], data=b"junk", headers={"Content-Type": "image/png"}).status_code == 400

    # Each worker's monitor thread reports its metrics once a second, after the answers: wait until all are in.
    def moved(name, **labels) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    name = NAMES[str(cls)]
    after, deadline = scrape(), time.monotonic() + 30
    while (
        moved("ts_inference_requests_total") < 4
        or moved("GTSRBRequests", Outcome="bad_input") < 1
        or moved("GTSRBPredictedClass", ClassName=name) < 3
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
        after = scrape()
    assert (
        _metric(after, "GTSRBPredictedClass", ClassName=name) - _metric(before, "GTSRBPredictedClass", ClassName=name)
        == 3
    )
    for outcome, n in (("predicted", 3), ("bad_input", 1)):
        assert _metric(after, "GTSRBRequests", Outcome=outcome) - _metric(before, "GTSRBRequests", Outcome=outcome) == n
    assert _metric(after, "GTSRBConfidence") - _metric(before, "GTSRBConfidence") == 3
    assert _metric(after, "ts_inference_requests_total") - _metric(before, "ts_inference_requests_total") == 4


def worker_rss_mb(server) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in worker_pids(server)) / 2**20


def test_hostile_corpus_concurrently_nothing_dies(server, stop_sign, stop_answer):
    """Odd-but-valid images get predictions, hostile bodies their 4xx; fired together so that they share
    batches. Afterwards the same workers serve, with memory back near where it was."""
    valid, hostile = odd_images(stop_sign, large=True), hostile_bodies(stop_sign)
    pids, rss_before = worker_pids(server), worker_rss_mb(server)
    valid["base64 json"] = json.dumps({"data": base64.b64encode(valid["ppm"]).decode()}).encode()
    jobs = [(name, body, 200, None) for name, body in valid.items()]
    jobs += [(name, body, status, kind) for name, (body, status, kind) in hostile.items()]
    assert len(jobs) >= 30
    jobs = jobs * 4

    def send(job):
        name, body, status, kind = job
        r = predict(server["inference"], data=body, headers={"Content-Type": "application/octet-stream"})
        return job, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, jobs))
    for (name, _, status, kind), got, body in results:
        assert got == status, (name, got, body)
        if status == 200:
            assert len(body) == 5, name
            if name in SAME_PREDICTION:
                assert next(iter(body)) == stop_answer, name
        else:
            assert body["type"] == kind and body["message"], (name, body)
    assert worker_pids(server) == pids, "a worker died"
    assert worker_rss_mb(server) < rss_before * 1.25 + 50, "worker memory did not come back"
