"""A/B of serving settings: each variant is our TorchServe with a few settings changed, driven by wrk at the
same concurrency levels, variants interleaved round by round so that drift of the machine hits all alike.

    python -m bench.ab --variant base --variant delay1:maxBatchDelay=1 \\
        --variant nolog:handler.input_log_mb=0 --variant netty1:ts.number_of_netty_threads=1 \\
        [--levels 1,32] [--duration 8] [--rounds 2] [--output reports/bench/ab.md]

A variant is ``name[:key=value,key=value...]``; a key is a top-level key of handler/model-config.yaml
(``batchSize``), ``handler.<key>`` for the handler's section, ``ts.<property>`` for config.properties,
``env.<VAR>`` for the server's environment, ``model`` for another TorchScript file, ``log_config`` for
another log4j2.xml, or ``git`` for the handler/ of another commit (its model-config.yaml too). The table reports
the median over rounds and every round's value; BENCHMARKS.md quotes it.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.inputs import DATA_ROOT, make_images
from bench.servers import CONFIG, MODEL, PREDICTIONS_PATH, ROOT
from bench.wrk import ensure_wrk, failed_requests, run_wrk, write_inputs
from tools import archive, torchserve_ctl


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, rest = spec.partition(":")
    settings = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    return name, settings


def _value(text: str):
    return yaml.safe_load(text)  # 1 -> int, 0.5 -> float, true -> bool, other text stays a string


def prepare(name: str, settings: dict, work: Path) -> dict:
    """The archive (model-config changes), config.properties extras and environment of one variant."""
    base = work / name
    base.mkdir(parents=True)
    handler_dir = archive.HANDLER_DIR
    if "git" in settings:  # that commit's handler/, extracted
        tar = subprocess.run(["git", "archive", settings["git"], "handler"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=tar.stdout, check=True)
        handler_dir = base / "handler"
    cfg = yaml.safe_load((handler_dir / "model-config.yaml").read_text())
    extra, env, model, log_config = {}, {}, MODEL, torchserve_ctl.LOG_CONFIG
    for key, text in settings.items():
        if key.startswith("handler."):
            cfg["handler"][key.removeprefix("handler.")] = _value(text)
        elif key.startswith("ts."):
            extra[key.removeprefix("ts.")] = text
        elif key.startswith("env."):
            env[key.removeprefix("env.")] = text
        elif key == "model":
            model = Path(text).resolve()
        elif key == "log_config":
            log_config = Path(text).resolve()
        elif key != "git":
            cfg[key] = _value(text)
    (base / "model-config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    store = base / "model_store"
    archive.build(model=model, export_path=store, config=base / "model-config.yaml", handler_dir=handler_dir)
    return {"base": base, "store": store, "extra": extra, "env": env, "log_config": log_config}


def measure(variant: dict, levels: list[int], seconds: int, warmup: int, wrk_files) -> dict[int, dict]:
    with torchserve_ctl.serving(
        variant["base"] / "run", variant["store"], CONFIG, variant["extra"], variant["env"]
    ) as ts:
        url = ts.urls["inference"] + PREDICTIONS_PATH
        run_wrk(url, max(levels), warmup, *wrk_files)
        out = {}
        for c in levels:
            r = run_wrk(url, c, seconds, *wrk_files)
            out[c] = {
                "rps": r["rps"],
                "p50": r["latency_us"]["p50"] / 1e3,
                "p99": r["latency_us"]["p99"] / 1e3,
                "failed": failed_requests(r),
            }
            print(f"  {c=:<3} {out[c]['rps']:7.1f} req/s  p50 {out[c]['p50']:5.2f} ms  p99 {out[c]['p99']:6.2f} ms"
                  f"  failed {out[c]['failed']}", flush=True)  # fmt: skip
    return out


def table(names: list[str], specs: dict, results: dict, levels: list[int]) -> str:
    lines = ["| variant | settings | " + " | ".join(f"c={c} req/s | c={c} p50 ms | c={c} p99 ms" for c in levels) + " |",
             "|---|---|" + "---:|---:|---:|" * len(levels)]  # fmt: skip
    for n in names:
        cells = []
        for c in levels:
            for key, fmt in (("rps", "{:.0f}"), ("p50", "{:.2f}"), ("p99", "{:.1f}")):
                vals = [r[c][key] for r in results[n]]
                runs = ", ".join(fmt.format(v) for v in vals)
                cells.append(f"**{fmt.format(statistics.median(vals))}** ({runs})")
        settings = ", ".join(f"`{k}={v}`" for k, v in specs[n].items()) or "as shipped"
        lines.append(f"| {n} | {settings} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", required=True, help="name[:key=value,...] (repeatable)")
    p.add_argument("--levels", default="1,32", help="comma-separated wrk concurrencies")
    p.add_argument("--duration", type=int, default=8, help="seconds per level")
    p.add_argument("--warmup", type=int, default=3, help="seconds of load before the levels")
    p.add_argument("--rounds", type=int, default=2, help="times each variant is started and measured")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--data-root", type=Path, default=DATA_ROOT)
    p.add_argument("--output", type=Path, default=ROOT / "reports" / "bench" / "ab.md")
    args = p.parse_args(argv)
    ensure_wrk()
    levels = [int(c) for c in args.levels.split(",")]
    specs = dict(parse_variant(v) for v in args.variant)
    names = list(specs)
    with tempfile.TemporaryDirectory(prefix="gtsrb-ab-") as tmp:
        work = Path(tmp)
        wrk_files = write_inputs(work, make_images(args.data_root, work / "images", args.images))
        variants = {n: prepare(n, specs[n], work) for n in names}
        results = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else reversed(names):
                print(f"[round {r + 1}] {n}", flush=True)
                results[n].append(measure(variants[n], levels, args.duration, args.warmup, wrk_files))
    text = table(names, specs, results, levels)
    cmd = "python -m bench.ab " + " ".join(sys.argv[1:] if argv is None else argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(f"`{cmd}`\n\n{text}\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
