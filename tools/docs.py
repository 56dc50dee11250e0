"""Regenerate what the docs quote from the shipped model and the last benchmark report.

    make docs        # .venv/bin/python -m tools.docs [--report reports/bench/bench.md]

Run it after the model, the handler or its settings change, and after `make bench`. It packs the archive of
models/gtsrb.pt as `make archive` does, serves it from the serving environment (.venv-serve, as `make serve`) on
free ports, and rewrites, in README.md, deploy/README.md and docs/*.md, every region between

    <!-- generated: NAME (make docs) -->   and   <!-- end: NAME -->

with the server's answers for the shipped samples/14-stop.png (and two bad inputs), the performance numbers of
the newest full `make bench` report in reports/bench/ (quick ones are skipped), and the table of the last
`python -m bench.grpc_latency` report (reports/bench/grpc_latency.md). Without a report its regions are left as
they are, and it says so. It also redraws docs/explanations.png from the running server.
Edit this module, not the regions: tests/test_docs.py fails when the README's answers are not the served ones.
"""

import argparse
import json
import re
import sys
import tempfile
import textwrap
from pathlib import Path

import requests

from tools import archive, explanations_figure
from tools.torchserve_ctl import ROOT, SERVE_PYTHON, serving

DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SIGN = "samples/14-stop.png"  # the README's first request
URL = "http://127.0.0.1:8080"  # as `make serve` listens (config.properties)
REGION = re.compile(
    r"(<!-- generated: (?P<name>[\w-]+) \(make docs\) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S
)


# ---- regions ----
def regions(text: str) -> dict[str, str]:
    """NAME -> the text between its markers."""
    return {m["name"]: m["body"] for m in REGION.finditer(text)}


def fill(text: str, content: dict[str, str]) -> str:
    """``text`` with each region named in ``content`` replaced; the others are kept."""
    return REGION.sub(lambda m: m[1] + content.get(m["name"], m["body"]) + m[4], text)


def wrap(paragraph: str) -> str:
    return textwrap.fill(paragraph, 115, break_long_words=False, break_on_hyphens=False) + "\n"


def bash(*lines: str) -> str:
    return "```bash\n" + "\n".join(lines) + "\n```\n"


# ---- what the server answers ----
def answers(inference: str) -> dict[str, str]:
    """The example regions, from a server at ``inference``."""
    sign = (ROOT / SIGN).read_bytes()
    predicted = requests.put(f"{inference}/predictions/gtsrb", data=sign, timeout=60)
    explained = requests.put(f"{inference}/explanations/gtsrb", data=sign, timeout=120)
    hello = requests.post(f"{inference}/predictions/gtsrb", data=b"hello", timeout=60,
                          headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    truncated = requests.put(f"{inference}/predictions/gtsrb", data=sign[:300], timeout=60)
    for r in (predicted, explained):
        r.raise_for_status()
    e = explained.json()
    first = ", ".join(str(v) for v in e["saliency"][0][:3])
    return {
        "predict": bash(f"$ curl -T {SIGN} {URL}/predictions/gtsrb", predicted.text),
        "explain": bash(
            f"$ curl -T {SIGN} {URL}/explanations/gtsrb",
            f'{{"class": {json.dumps(e["class"])}, "probability": {e["probability"]!r}, "saliency": [[{first}, ...], ...]}}',
        ),
        "bad-input": bash(
            f"""$ curl -i -H 'Content-Type: application/octet-stream' --data-binary "hello" {URL}/predictions/gtsrb""",
            f"HTTP/1.1 {hello.status_code} {hello.reason}",
            f"content-type: {hello.headers['content-type']}",
            hello.text,
            "",
            f"$ head -c 300 {SIGN} > truncated.png; curl -T truncated.png {URL}/predictions/gtsrb",
            truncated.text,
        ),
    }


def example_answers(text: str) -> dict[str, tuple[str, str]]:
    """URL path -> (the file sent, the answer) of each ``$ curl -T FILE URL`` example followed by its answer."""
    found = {}
    for m in re.finditer(r"^\$ curl -T (\S+) http://127\.0\.0\.1:8080(/\S+)\n(\{.*\})$", text, re.M):
        found.setdefault(m[2], (m[1], m[3]))
    return found


# ---- the last benchmark report ----
def last_report(folder: Path = ROOT / "reports" / "bench") -> Path | None:
    """The newest full `make bench` report (bench.bench's format, not --quick) in ``folder``."""
    full = [p for p in folder.glob("*.md") if is_full_report(p.read_text())]
    return max(full, key=lambda p: p.stat().st_mtime, default=None)


def is_full_report(text: str) -> bool:
    return text.startswith("# gtsrb-serve benchmark") and "(quick smoke-test settings)" not in text.split("\n", 4)[2]


def parse_report(text: str) -> dict:
    """Run line, machine, results rows and the lines under the results table of a bench.bench report."""
    run = re.search(r"^Run (.+?) with `(.+?)`", text, re.M)
    machine = dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", text.split("## Machine", 1)[1].split("##", 1)[0], re.M))
    results = text.split("## Results", 1)[1].split("## ", 1)[0]
    lines = [line for line in results.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]
    bullets = [line[2:] for line in results.splitlines() if line.startswith("- ")]
    return {"when": run[1].strip(), "cmd": run[2], "machine": machine, "rows": rows, "bullets": bullets,
            "busy": "The machine was busy" in text}  # fmt: skip


def performance(report: Path) -> dict[str, str]:
    r = parse_report(report.read_text())
    m = r["machine"]
    shown = report.relative_to(ROOT) if report.is_relative_to(ROOT) else report
    source = (
        f"the last `make bench` report (`{shown}`, {r['when']}, `{r['cmd']}`; {m.get('CPU')}, "
        f"{m.get('cores')}, torch {m.get('torch of ours (.venv-serve)') or m.get('torch')})"
    )
    table = "| server | concurrency | req/s | p50 ms | p99 ms | errors (socket, HTTP) | worker RSS MiB (peak, sum) |\n"
    table += "|---|---:|---:|---:|---:|---:|---:|\n"
    for row in r["rows"]:
        errors = f"{row['socket errors']}, {row['HTTP 4xx/5xx']}"
        table += (
            f"| {row['server']} | {row['concurrency']} | {row['req/s']} | {row['p50 ms']} | {row['p99 ms']} "
            f"| {errors} | {row['worker RSS MiB (peak, sum)']} |\n"
        )
    busy = "**That machine was busy during the run: the numbers are low.**\n\n" if r["busy"] else ""
    bullets = "".join(f"- {b}\n" for b in r["bullets"])
    perf = f"{wrap(f'From {source}:')}\n{busy}{table}\n{bullets}"
    c32 = {row["server"]: row for row in r["rows"] if row["concurrency"] == "32"}
    server = "container" if "container" in c32 else "ours"
    max_rps = ""
    if server in c32:
        proxy = "the container, HAProxy in front" if server == "container" else "TorchServe alone, without HAProxy"
        max_rps = wrap(
            f"Measure `--max-rps` first with `make bench`: {float(c32[server]['req/s']):,.0f} req/s at concurrency 32 "
            f"({proxy}) in {source}; the default 500 leaves headroom."
        )
    return {"performance": perf} | ({"max-rps": max_rps} if max_rps else {})


def grpc_latency(report: Path) -> dict[str, str]:
    """docs/grpc-latency.md's table, from bench.grpc_latency's report."""
    text = report.read_text()
    run = re.search(r"^Run (.+?) with (`.+?`)(.*)$", text, re.M)
    table = "".join(line + "\n" for line in text.splitlines() if line.startswith("|"))
    shown = report.relative_to(ROOT) if report.is_relative_to(ROOT) else report
    return {"grpc-latency": wrap(f"From `{shown}` ({run[1].strip()}, {run[2]}){run[3]}") + "\n" + table}


# ----
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, help="the benchmark report to quote (default: the newest full one)")
    args = p.parse_args()
    content: dict[str, str] = {}
    report = args.report or last_report()
    if report:
        content |= performance(report)
        print(f"performance numbers from {report}")
    else:
        print("no full `make bench` report in reports/bench/: the performance numbers are left as committed")
    grpc = ROOT / "reports" / "bench" / "grpc_latency.md"
    if grpc.exists():
        content |= grpc_latency(grpc)
        print(f"gRPC latency from {grpc}")
    else:
        print(f"no {grpc.relative_to(ROOT)} (python -m bench.grpc_latency): docs/grpc-latency.md is left as committed")
    model = ROOT / "models" / "gtsrb.pt"
    with tempfile.TemporaryDirectory(prefix="gtsrb-docs-") as tmp:
        store = archive.build(model, Path(tmp) / "model_store", registered=archive.registered_version(model)).parent
        with serving(Path(tmp) / "ts", store, python=SERVE_PYTHON) as server:
            content |= answers(server.urls["inference"])
            print(explanations_figure.draw(server.urls["inference"]))
    for doc in DOCS:
        text = doc.read_text()
        new = fill(text, content)
        if new != text:
            doc.write_text(new)
            print(f"rewrote {doc.relative_to(ROOT)}: {', '.join(n for n in regions(text) if n in content)}")
    missing = set(content) - {n for doc in DOCS for n in regions(doc.read_text())}
    if missing:
        sys.exit(f"no region for {sorted(missing)} in {[str(d.relative_to(ROOT)) for d in DOCS]}")


if __name__ == "__main__":
    main()
