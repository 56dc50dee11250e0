"""The benchmark's markdown report (reports/bench/bench.md by default): machine, results, limit, settings."""

import contextlib
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import psutil
import torch

from bench.servers import CONFIG, ROOT
from bench.wrk import have_wrk

MODEL_CONFIG = ROOT / "handler" / "model-config.yaml"


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
        "torch of ours (.venv-serve)": serving_torch(),
        "torchserve": version("torchserve"),
        "torch-model-archiver": version("torch-model-archiver"),
        "captum": version("captum"),
        "fastapi / uvicorn": f"{version('fastapi')} / {version('uvicorn')}",
        "Java": java[0] if java else "none",
        "wrk": wrk[0].split("Copyright")[0].strip() if wrk else "none",
    }


def serving_torch() -> str:
    """The torch version of make serve's environment, which serves "ours"."""
    from tools.torchserve_ctl import SERVE_PYTHON

    cmd = [str(SERVE_PYTHON), "-c", "import torch; print(torch.__version__)"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip() or "?"
    except OSError:
        return "not installed"


def table(rows: list[dict]) -> str:
    head = (
        "| server | concurrency | req/s | p50 ms | p90 ms | p99 ms | socket errors | HTTP 4xx/5xx | requests "
        "| worker RSS MiB (peak, sum) | frontend RSS MiB | TorchServe ms/request (queued) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = ""
    for r in rows:
        frontend = f"{r['frontend_mib']:.0f}" if r["frontend_mib"] else "-"
        p50, p90, p99 = (f"{r[k]:.1f}" if r["requests"] else "-" for k in ("p50_ms", "p90_ms", "p99_ms"))
        ts_ms = f"{r['frontend_ms']:.2f} ({r['queued_ms']:.2f})" if r.get("frontend_ms") is not None else "-"
        body += (
            f"| {r['server']} | {r['concurrency']} | {r['rps']:.1f} | {p50} | {p90} | {p99} "
            f"| {r['socket_errors']} | {r['http_4xx_5xx']} | {r['requests']} | {r['rss_mib']:.0f} | {frontend} "
            f"| {ts_ms} |\n"
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


def limit_lines(limit: dict, threads: int, batch: int, parallel: int, ceiling: float, ceiling_decode: float):
    lines = [
        f"| model only, batch 1, {threads} thread(s) | {limit[f'b1_t{threads}']:.0f} |",
        f"| model only, batch {batch}, {threads} thread(s) | {limit[f'b{batch}_t{threads}']:.0f} |",
    ]
    if threads != 2:
        lines += [
            f"| model only, batch 1, 2 threads (reference) | {limit['b1_t2']:.0f} |",
            f"| model only, batch {batch}, 2 threads (reference) | {limit[f'b{batch}_t2']:.0f} |",
        ]
    return lines + [
        f"| PIL decode + EvalPreset of a 64x64 PNG, {threads} thread(s) | {limit['decode']:.0f} |",
        f"| ceiling: {parallel} worker(s) x model batch {batch} | {ceiling:.0f} |",
        f"| ceiling with decode: {parallel} worker(s) x (decode + model batch {batch}) | {ceiling_decode:.0f} |",
    ]


def settings_text() -> tuple[str, str]:
    props = [line for line in CONFIG.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join(props), MODEL_CONFIG.read_text().rstrip()


def render(
    *,
    started,
    cmdline: str,
    quick: bool,
    busy: bool,
    info: dict,
    duration: int,
    warmup: int,
    rows: list[dict],
    ratio_lines: list[str],
    notes: list[str],
    limit_md_lines: list[str],
    limit_seconds: float,
    workers: int,
    threads: int,
    batch: int,
    n_images: int,
) -> str:
    props, model_cfg = settings_text()
    machine = "".join(f"| {k} | {v} |\n" for k, v in info.items())
    ratio_md = "".join(f"- {line}\n" for line in ratio_lines) or "- (no ratios: a server was skipped)\n"
    notes_md = "".join(f"- {n}\n" for n in notes)
    limit_md = "".join(f"{line}\n" for line in limit_md_lines)
    quick_md = " (quick smoke-test settings)" if quick else ""
    busy_md = (
        "\n\n**The machine was busy when this run started (load average above half the cores): these numbers are"
        " not representative.** Servers that use more than one torch thread per process suffer most from contention."
        if busy
        else ""
    )
    return f"""# gtsrb-serve benchmark

Run {started:%Y-%m-%d %H:%M %Z} with `{cmdline.strip()}`{quick_md}.

## Machine

| | |
|---|---|
{machine}
The load generator runs on the same machine and shares its cores with the server under test; other load
(see the load average) skews every number.{busy_md}

## Results

{duration} s of load per concurrency level after a {warmup} s warm-up; latencies from wrk's
histogram. *socket errors* = requests with no answer (connect, read and write errors and timeouts of 30 s);
*HTTP 4xx/5xx* = answers with HTTP status >= 400.
Worker RSS: peak of the summed RSS of the TorchServe `model_service_worker` processes (the uvicorn process
for FastAPI) sampled every 0.25 s; frontend: the TorchServe Java process. *TorchServe ms/request (queued)*:
the server's own account over the level (`ts_inference_latency_microseconds` and `ts_queue_latency_microseconds`
per request answered), the time from the frontend receiving a request to answering it, and in brackets the part
spent in the model's queue, batch window included; "-" where the server exports no such counters.

{table(rows)}
{ratio_md}
{notes_md}
## In-process limit (images/s)

`models/gtsrb.pt` loaded in the benchmark process, uint8 [N, 3, 32, 32] inputs, `torch.inference_mode()`,
{limit_seconds:g} s per figure. The server runs `minWorkers` = {workers} worker(s) x `handler.torch_threads` =
{threads} thread(s) and batches up to `batchSize` = {batch}; the ceiling multiplies by min(workers, cores / threads).

| measurement | img/s |
|---|---:|
{limit_md}
## Servers

- **ours**: TorchServe {info["torchserve"]}, the project's archive (`tools/archive.py`: TorchScript model,
  `handler/gtsrb_handler.py`), `config.properties` with only the listeners moved to free loopback ports, and
  `log4j2.xml`; served from `make serve`'s environment (.venv-serve: the container's CPU-only torch).
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

Load: `wrk -t1 -c<concurrency> -d{duration}s --timeout 30s --latency` with a Lua script that PUTs
{n_images} real GTSRB training images (spread over the 43 classes, upscaled to 64x64, PNG,
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
