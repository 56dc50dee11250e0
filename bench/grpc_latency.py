"""Latency of one image through HTTP and through TorchServe's gRPC inference API, side by side.

    python -m bench.grpc_latency [--requests 200] [--concurrency 1 4] [--model-config FILE] [--set KEY=VALUE ...]

Starts our TorchServe (tools.torchserve_ctl.serving, config.properties plus any ``--set``) on free ports with
the shipped model, then sends the same PNGs through each path, interleaved request by request so that both
see the same machine: HTTP ``PUT /predictions/gtsrb`` on a persistent connection (one per client thread),
gRPC ``Predictions`` on one persistent channel; and the model-free ``GET /ping`` / gRPC ``Ping``, which
separate the transport from the model path. Prints a markdown table of p50/p90/p99 in ms and writes it to
``--output`` (reports/bench/grpc_latency.md), which `make docs` quotes in docs/grpc-latency.md.
"""

import argparse
import datetime
import http.client
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from google.protobuf import empty_pb2

from bench.inputs import DATA_ROOT, make_images
from tools import archive
from tools.grpc_client import Client
from tools.torchserve_ctl import ROOT, SERVE_PYTHON, serving


def http_calls(url: str):
    """(predict, ping) on one persistent HTTP/1.1 connection per calling thread."""
    host, port = url.removeprefix("http://").split(":")
    local = threading.local()

    def conn() -> http.client.HTTPConnection:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection(host, int(port), timeout=600)
        return local.conn

    def call(method: str, path: str, body: bytes | None = None) -> None:
        c = conn()
        c.request(method, path, body=body)
        r = c.getresponse()
        r.read()
        assert r.status == 200, (path, r.status)

    return (lambda img: call("PUT", "/predictions/gtsrb", img)), (lambda _: call("GET", "/ping"))


def grpc_calls(client: Client):
    empty = empty_pb2.Empty()

    def predict(img: bytes) -> None:
        client.stub.Predictions(client.pb2.PredictionsRequest(model_name="gtsrb", input={"data": img}), timeout=600)

    return predict, (lambda _: client.stub.Ping(empty, timeout=600))


def run(calls: dict, images: list[bytes], requests: int, concurrency: int) -> dict[str, list[float]]:
    """Each client thread sends every kind in turn (rotating the order), ``requests`` of each in all."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    kinds = list(calls)

    def client(worker: int) -> None:
        for i in range(worker, requests, concurrency):
            img = images[i % len(images)]
            for k in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                t0 = time.perf_counter()
                calls[k](img)
                times[k].append((time.perf_counter() - t0) * 1000)

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return times


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="of each kind, per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--model-config", type=Path, default=archive.MODEL_CONFIG)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config.properties overrides")
    p.add_argument("--no-ping", action="store_true", help="only the two prediction paths")
    p.add_argument("--output", type=Path, default=ROOT / "reports" / "bench" / "grpc_latency.md")
    args = p.parse_args()
    started = datetime.datetime.now().astimezone()
    extra = dict(kv.split("=", 1) for kv in args.set)
    with tempfile.TemporaryDirectory(prefix="grpc-latency-") as tmp:
        base = Path(tmp)
        images = [f.read_bytes() for f in make_images(DATA_ROOT, base / "images", 43)]
        archive.build(ROOT / "models" / "gtsrb.pt", base / "model_store", config=args.model_config)
        with serving(base / "ts", base / "model_store", extra=extra, python=SERVE_PYTHON) as ts:  # as make serve
            grpc_client = Client(base / "grpc", ts.ports["grpc_inference"])
            try:
                h_predict, h_ping = http_calls(ts.urls["inference"])
                g_predict, g_ping = grpc_calls(grpc_client)
                calls = {"HTTP predict": h_predict, "gRPC predict": g_predict}
                if not args.no_ping:
                    calls |= {"HTTP ping": h_ping, "gRPC Ping": g_ping}
                run(calls, images, 4 * len(calls), 1)  # warm-up: JIT, connections, worker caches
                rows = [(c, run(calls, images, args.requests, c)) for c in args.concurrency]
            finally:
                grpc_client.close()
    text = (
        f"# gRPC vs HTTP latency\n\nRun {started:%Y-%m-%d %H:%M %Z} with `python -m bench.grpc_latency "
        f"{' '.join(sys.argv[1:])}`: {args.requests} requests of each kind; settings: "
        f"{extra or 'config.properties'}, {args.model_config.name}.\n\n"
        "| path | concurrency | p50 ms | p90 ms | p99 ms |\n|---|---:|---:|---:|---:|\n"
    )
    for c, times in rows:
        for kind, xs in times.items():
            text += f"| {kind} | {c} | {pct(xs, 50):.1f} | {pct(xs, 90):.1f} | {pct(xs, 99):.1f} |\n"
    print("\n" + text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"report written to {args.output}")


if __name__ == "__main__":
    main()
