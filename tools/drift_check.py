"""Input-drift check with a stated false-alarm rate: served requests against the model's training reference.

    python -m tools.drift_check                                        # logs/gtsrb_inputs.jsonl* vs models/gtsrb_reference.json
    python -m tools.drift_check --textfile reports/drift/gtsrb_drift.prom   # also the result as Prometheus metrics

On the VM, gtsrb-drift.timer runs this file from the serving image every hour (deploy/cloud-init.yaml); its
metrics file is served by node_exporter's textfile collector and watched by GTSRBInputDrift (monitoring/alerts.yml).
It needs the standard library and numpy only. `make drift-report` (tools/drift_report.py) adds a figure.

The test. Each signal (the predicted-class mix, and each image statistic binned at the training deciles, 10
cells of 10% each) gets Pearson's chi-square goodness-of-fit test against the reference. Sparse cells: classes
expected fewer than MIN_EXPECTED times in the window are pooled, smallest first, into cells expected at least
MIN_EXPECTED times, where the chi-square approximation holds. Holm's correction across the 8 signals keeps the
chance that a window of in-distribution traffic is flagged at all at most ALPHA (1%), at any window size from
MIN_SAMPLES up (tests/test_drift.py simulates it at n = 100 ... 1,000). A flagged signal must also have shifted
by an effect size (Cohen's w) of at least MIN_EFFECT, so that large windows do not flag negligible differences;
that can only lower the false-alarm rate. PSI is reported beside, as a descriptive
number of how large a shift is; it decides nothing: on small samples it is mostly noise (median 0.7 at n = 100
drawn from the training mix itself).

The test assumes the requests of a window are independent. Real traffic comes in bursts (one car sends the same
sign many times), and near-copies count as more evidence than they are: windows of ~1,500 frames from a few
hundred held-out GTSRB tracks were flagged 3% of the time at n = 100 but 11-42% at n = 200-1,000 (the effect
floor brings n = 1,000 down from 93%). Windows of many cars, not many frames of a few, are what it is meant for.
"""

import argparse
import glob
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "models" / "gtsrb_reference.json"
ALPHA = 0.01  # family-wise false-alarm rate of one report (all signals together)
MIN_SAMPLES = 50  # below this no test is run: 10 decile cells need 5 expected each
MIN_EXPECTED = 5.0
# A flagged shift must also be large enough to matter: Cohen's w (bias-corrected, sqrt((chi2 - df) / n)) at least
# this, between his "small" 0.1 and "medium" 0.3. Without it a large window flags differences nobody would act on:
# the held-out tracks of the training set itself differ from the rest by w ~0.1 (PSI ~0.02), flagged 93% of the
# time at n = 1,000 by the test alone. On small windows every significant shift is larger than this anyway.
MIN_EFFECT = 0.2
CLASS_SIGNAL = "predicted class"
EPS = 1e-4


# ------------------------------------------------------------------------------------------------ statistics


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df): the regularized upper incomplete gamma Q(df/2, x/2)."""
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_prefix = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1:  # series for P, then Q = 1 - P
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-15:
            n += 1
            term *= z / n
            total += term
        return max(0.0, 1.0 - total * math.exp(log_prefix))
    # Lentz's continued fraction for Q
    tiny = 1e-300
    b = z + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, h * math.exp(log_prefix))


def pool_sparse(expected: np.ndarray, observed: np.ndarray, min_expected: float = MIN_EXPECTED):
    """Cells expected fewer than min_expected times are merged, smallest first, into cells that reach it."""
    order = np.argsort(expected, kind="stable")
    exp_cells, obs_cells = [], []
    acc_e = acc_o = 0.0
    for i in order:
        if expected[i] >= min_expected and acc_e == 0:
            exp_cells.append(expected[i])
            obs_cells.append(observed[i])
            continue
        acc_e += expected[i]
        acc_o += observed[i]
        if acc_e >= min_expected:
            exp_cells.append(acc_e)
            obs_cells.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e > 0:  # a remainder below min_expected joins the smallest cell made so far
        if exp_cells:
            j = int(np.argmin(exp_cells))
            exp_cells[j] += acc_e
            obs_cells[j] += acc_o
        else:
            exp_cells, obs_cells = [acc_e], [acc_o]
    return np.array(exp_cells), np.array(obs_cells)


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int, float]:
    """Pearson's goodness-of-fit test of counts against probs, sparse cells pooled: (statistic, df, p-value)."""
    n = counts.sum()
    probs = np.asarray(probs, dtype=float)
    expected, observed = pool_sparse(n * probs / probs.sum(), counts.astype(float))
    if len(expected) < 2:
        return 0.0, 0, 1.0
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    return stat, df, chi2_sf(stat, df)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values: reject those <= alpha and the family-wise error rate is at most alpha."""
    ranked = sorted(pvalues, key=pvalues.get)
    m, running, out = len(ranked), 0.0, {}
    for i, name in enumerate(ranked):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        out[name] = running
    return out


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two distributions over the same cells (descriptive only)."""
    expected, actual = np.asarray(expected, dtype=float), np.asarray(actual, dtype=float)
    return float(((actual - expected) * np.log((actual + EPS) / (expected + EPS))).sum())


def decile_counts(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Counts in the cells the training deciles make (as torch.bucketize: edges[i-1] < v <= edges[i])."""
    return np.bincount(np.searchsorted(np.asarray(edges), values, side="left"), minlength=len(edges) + 1)


def check(reference: dict, stats: np.ndarray, classes, alpha: float = ALPHA, min_effect: float = MIN_EFFECT) -> dict:
    """Test every signal of a window of served requests against the reference.

    stats: [n, len(reference['stats'])] in the reference's order; classes: the n predicted classes.
    Returns n, alpha, per signal its chi-square statistic, df, p-value, Holm-adjusted p-value, effect size and PSI,
    and `drifted`: the signals whose adjusted p-value is at most alpha and whose effect is at least min_effect
    (none when n < MIN_SAMPLES: `tested` False).
    """
    stats = np.asarray(stats, dtype=float).reshape(-1, len(reference["stats"]))
    classes = np.asarray(classes, dtype=int)
    n = len(classes)
    signals: dict[str, dict] = {}
    for i, (name, edges) in enumerate(reference["stats"].items()):
        counts = decile_counts(stats[:, i], edges)
        probs = np.full(len(counts), 1.0 / len(counts))
        signals[name] = {"counts": counts, "probs": probs}
    prior = np.asarray(reference["class_prior"], dtype=float)
    signals[CLASS_SIGNAL] = {"counts": np.bincount(classes, minlength=len(prior))[: len(prior)], "probs": prior}
    rows = {}
    for name, s in signals.items():
        stat, df, p = chi_square(s["counts"], s["probs"]) if n else (0.0, 0, 1.0)
        effect = math.sqrt(max(0.0, stat - df) / n) if n else 0.0
        rows[name] = {"chi2": stat, "df": df, "p": p, "effect": effect, "psi": psi(s["probs"], s["counts"] / max(1, n))}
    tested = n >= MIN_SAMPLES
    adjusted = holm({k: r["p"] for k, r in rows.items()}) if tested else {k: 1.0 for k in rows}
    for k, r in rows.items():
        r["p_adj"] = adjusted[k]
    drifted = sorted(k for k, r in rows.items() if tested and r["p_adj"] <= alpha and r["effect"] >= min_effect)
    return {"n": n, "alpha": alpha, "tested": tested, "signals": rows, "drifted": drifted}


# ---------------------------------------------------------------------------------------------- the input log


def read_log(pattern: str, last: int, n_stats: int) -> dict:
    """The most recent `last` records of the handler's input logs (oldest file first). A line that is not a
    well-formed record (torn write, disk full, hand edit) is skipped and counted, never fatal."""
    records, bad = [], 0
    for path in sorted(glob.glob(pattern), key=lambda p: Path(p).stat().st_mtime):
        with open(path, errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    st = [float(v) for v in r["stats"]]
                    cls, p = int(r["class"]), float(r["p"])
                    if len(st) != n_stats or cls < 0 or not all(map(math.isfinite, st)):
                        raise ValueError("not a record of this reference")
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                records.append((st, cls, p, r.get("model_version", "unknown")))
    records = records[-last:] if last else records
    return {
        "stats": np.array([r[0] for r in records], dtype=float).reshape(-1, n_stats),
        "classes": [r[1] for r in records],
        "probs": [r[2] for r in records],
        "model_versions": sorted({r[3] for r in records}),
        "bad_lines": bad,
    }


# ------------------------------------------------------------------------------------------------ the metrics


def metric_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def textfile(result: dict, bad_lines: int, now: float) -> str:
    """The result in Prometheus's text format (node_exporter's textfile collector serves it)."""
    out = []

    def gauge(name: str, help_: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} gauge")
        out.extend(f"{name}{labels} {value:.10g}" for labels, value in samples)

    signals = result["signals"]
    gauge("gtsrb_drift_detected", f"1 when the last drift report flagged a signal (family-wise false-alarm rate {result['alpha']:g})",
          [("", float(bool(result["drifted"])))])  # fmt: skip
    gauge("gtsrb_drift_signal_detected", "1 for each signal the last drift report flagged",
          [(f'{{signal="{metric_label(k)}"}}', float(k in result["drifted"])) for k in signals])  # fmt: skip
    gauge("gtsrb_drift_p_value", "Holm-adjusted p-value of each signal's chi-square test against the training reference",
          [(f'{{signal="{metric_label(k)}"}}', r["p_adj"]) for k, r in signals.items()])  # fmt: skip
    gauge("gtsrb_drift_effect_size", f"Cohen's w of each signal's shift (flagged from {MIN_EFFECT:g} when significant)",
          [(f'{{signal="{metric_label(k)}"}}', r["effect"]) for k, r in signals.items()])  # fmt: skip
    gauge("gtsrb_drift_psi", "population stability index of each signal (descriptive, decides nothing)",
          [(f'{{signal="{metric_label(k)}"}}', r["psi"]) for k, r in signals.items()])  # fmt: skip
    gauge("gtsrb_drift_samples", "served requests in the last drift report's window", [("", result["n"])])
    gauge("gtsrb_drift_tested", f"1 when the window held at least {MIN_SAMPLES} requests and was tested",
          [("", float(result["tested"]))])  # fmt: skip
    gauge("gtsrb_drift_bad_lines", "input-log lines the last drift report skipped as malformed", [("", bad_lines)])
    gauge("gtsrb_drift_last_run_timestamp_seconds", "when the last drift report ran", [("", now)])
    return "\n".join(out) + "\n"


# Every metric textfile() writes (monitoring/alerts.yml may name these).
METRICS = ("gtsrb_drift_detected", "gtsrb_drift_signal_detected", "gtsrb_drift_p_value", "gtsrb_drift_effect_size",
           "gtsrb_drift_psi",
           "gtsrb_drift_samples", "gtsrb_drift_tested", "gtsrb_drift_bad_lines",
           "gtsrb_drift_last_run_timestamp_seconds")  # fmt: skip


def write_atomically(path: Path, text: str) -> None:
    """Write then rename: a scraper never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def summary(result: dict, bad_lines: int) -> str:
    lines = [f"{result['n']} served requests, {bad_lines} malformed log lines skipped; alpha {result['alpha']:g}"]
    if not result["tested"]:
        return lines[0] + f"\nnot tested: fewer than {MIN_SAMPLES} requests"
    lines.append(f"{'signal':<16} {'chi2':>8} {'df':>3} {'p (Holm)':>10} {'effect':>7} {'PSI':>7}")
    for k, r in result["signals"].items():
        flag = "  DRIFT" if k in result["drifted"] else ""
        lines.append(
            f"{k:<16} {r['chi2']:8.1f} {r['df']:3d} {r['p_adj']:10.2g} {r['effect']:7.3f} {r['psi']:7.3f}{flag}"
        )
    verdict = f"DRIFT in: {', '.join(result['drifted'])}" if result["drifted"] else "no drift"
    return "\n".join([*lines, verdict])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=REFERENCE)
    p.add_argument("--log", default=str(ROOT / "logs" / "gtsrb_inputs.jsonl*"), help="glob of the handler's input logs")
    p.add_argument("--last", type=int, default=5000, help="test the most recent N requests (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=ALPHA, help="family-wise false-alarm rate (default: %(default)s)")
    p.add_argument("--textfile", type=Path, help="also write the result here in Prometheus's text format")
    args = p.parse_args(argv)
    reference = json.loads(args.reference.read_text())
    log = read_log(args.log, args.last, len(reference["stats"]))
    result = check(reference, log["stats"], log["classes"], args.alpha)
    print(summary(result, log["bad_lines"]))
    if args.textfile:
        write_atomically(args.textfile, textfile(result, log["bad_lines"], time.time()))
    return 1 if result["drifted"] else 0


if __name__ == "__main__":
    sys.exit(main())
