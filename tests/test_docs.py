"""The docs quote the shipped model and the last benchmark report (tools/docs.py, `make docs`): the README's
example answers are what `make serve`'s environment serves for the shipped sign, and the performance regions are
read from bench.bench's own report format."""

import datetime
import json
import re

import pytest
import requests

from bench import report
from tests.conftest import ROOT
from tools import archive, docs
from tools.torchserve_ctl import SERVE_PYTHON, serving


def test_every_generated_region_is_closed_and_known():
    for doc in docs.DOCS:
        text = doc.read_text()
        assert text.count("<!-- generated: ") == len(docs.regions(text)), doc
    names = {n for doc in docs.DOCS for n in docs.regions(doc.read_text())}
    assert names == {"predict", "bad-input", "explain", "performance", "max-rps", "grpc-latency"}


@pytest.mark.e2e
def test_readme_answers_are_what_the_served_model_returns(tmp_path):
    """Fails when the model, the handler or its settings changed and `make docs` was not run."""
    readme = (ROOT / "README.md").read_text()
    examples = docs.example_answers(readme)
    assert examples["/predictions/gtsrb"][0] == examples["/explanations/gtsrb"][0] == docs.SIGN
    assert f"curl -T {docs.SIGN} http://127.0.0.1:8080/predictions/gtsrb" in readme.split("## Asking", 1)[0]
    store = archive.build(export_path=tmp_path / "model_store").parent
    with serving(tmp_path / "ts", store, python=SERVE_PYTHON) as server:
        url = server.urls["inference"]
        sign = (ROOT / docs.SIGN).read_bytes()
        served = requests.put(f"{url}/predictions/gtsrb", data=sign, timeout=60).json()
        written = json.loads(examples["/predictions/gtsrb"][1])
        assert list(written) == list(served), "run `make docs`: the README's top-5 is not the served one"
        assert list(written.values()) == pytest.approx(list(served.values()), abs=1e-5), "run `make docs`"

        served = requests.put(f"{url}/explanations/gtsrb", data=sign, timeout=120).json()
        m = re.fullmatch(r'\{"class": (".*?"), "probability": (\S+), "saliency": \[\[(.*), \.\.\.\], \.\.\.\]\}',
                         examples["/explanations/gtsrb"][1])  # fmt: skip
        assert json.loads(m[1]) == served["class"], "run `make docs`"
        assert float(m[2]) == pytest.approx(served["probability"], abs=1e-5), "run `make docs`"
        first = [float(v) for v in m[3].split(", ")]
        assert first == pytest.approx(served["saliency"][0][: len(first)], abs=2e-3), "run `make docs`"

        assert docs.regions(readme)["bad-input"] == docs.answers(url)["bad-input"], "run `make docs`"


def test_performance_regions_quote_the_last_full_report(tmp_path):
    row = dict(server="ours", concurrency=32, rps=1234.5, p50_ms=20.0, p90_ms=30.0, p99_ms=41.2, socket_errors=0,
               http_4xx_5xx=0, requests=12345, rss_mib=301.0, frontend_mib=400.0, frontend_ms=19.0, queued_ms=1.1)  # fmt: skip
    info = {
        "CPU": "Test CPU",
        "cores": "2 logical / 1 physical",
        "torch": "2.14.1",
        "torch of ours (.venv-serve)": "2.13.0+cpu",
    }

    def write(name: str, quick: bool, rps: float) -> None:
        text = report.render(
            started=datetime.datetime(2026, 12, 5, 12, 0), cmdline="python -m bench.bench", quick=quick, busy=False,
            info=info | {"torchserve": "0.12.0"}, duration=10, warmup=30,
            rows=[{**row, "concurrency": 1, "rps": 250.0}, {**row, "rps": rps}], ratio_lines=["ours / FastAPI peer: 4.2x"],
            notes=["ours: 2 workers READY 4.8 s after TorchServe was started"], limit_md_lines=[], limit_seconds=1,
            workers=2, threads=1, batch=8, n_images=43,
        )  # fmt: skip
        (tmp_path / name).write_text(text)

    assert docs.last_report(tmp_path) is None
    write("bench.md", quick=False, rps=1234.5)
    write("quick.md", quick=True, rps=99.0)  # newer, but a smoke test: not quoted
    assert docs.last_report(tmp_path) == tmp_path / "bench.md"
    content = docs.performance(tmp_path / "bench.md")
    perf = content["performance"]
    assert "| ours | 32 | 1234.5 | 20.0 | 41.2 | 0, 0 | 301 |" in perf and "| ours | 1 | 250.0 |" in perf
    assert "READY 4.8 s after" in perf and "4.2x" in perf and "torch 2.13.0+cpu" in perf and "Test CPU" in perf
    assert "1,234 req/s at concurrency 32 (TorchServe alone, without HAProxy)" in content["max-rps"]


def test_the_grpc_latency_region_quotes_its_report(tmp_path):
    report = tmp_path / "grpc_latency.md"
    report.write_text(
        "# gRPC vs HTTP latency\n\nRun 2026-12-05 12:00 UTC with `python -m bench.grpc_latency --requests 300`: 300"
        " requests of each kind; settings: config.properties, model-config.yaml.\n\n"
        "| path | concurrency | p50 ms | p90 ms | p99 ms |\n|---|---:|---:|---:|---:|\n| HTTP predict | 1 | 9.1 | 9.2 | 9.3 |\n"
    )  # the format bench.grpc_latency writes
    region = docs.grpc_latency(report)["grpc-latency"]
    assert region.endswith("| HTTP predict | 1 | 9.1 | 9.2 | 9.3 |\n")
    prose = " ".join(region.split("\n\n")[0].split())  # wrapped
    assert "2026-12-05 12:00 UTC" in prose and "`python -m bench.grpc_latency --requests 300`" in prose
    assert "300 requests of each kind" in prose
