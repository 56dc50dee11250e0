import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from handler.presets import image_stats
from tests.conftest import MODEL, REAL_DATA, ROOT
from tools import drift_check, drift_report
from training import data as gdata
from training import export
from training.reference import build_reference


@pytest.fixture(scope="module")
def split(gtsrb_root):
    """Reference from 85% of the tracks; 'served' batches from the other 15%."""
    ds = gdata.gtsrb(str(gtsrb_root), "train")
    if REAL_DATA:
        ds._samples = ds._samples[::4]  # every 4th frame of every track: the whole distribution, 4x faster
    d = gdata.load_tensors(ds)
    tr, va = gdata.track_split(d["labels"], d["tracks"], 0.15, seed=1)
    labels = d["labels"]
    if not REAL_DATA:  # the model learnt real signs: the class prior of drawings is what it answers for them
        with torch.inference_mode():
            labels = export.load(MODEL)(d["images"]).argmax(1)
    reference = build_reference(d["images"][tr], labels[tr], gdata.NUM_CLASSES)
    served = d["images"][va[torch.randperm(len(va), generator=torch.Generator().manual_seed(0))[:1500]]]
    return reference, served, (image_stats(d["images"][tr]).numpy(), labels[tr].numpy())


def served_records(images: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    model = export.load(MODEL)
    with torch.inference_mode():
        classes = model(images).argmax(1).tolist()
    return image_stats(images), classes


def darken(x):
    return (x.float() * 0.45).to(torch.uint8)


def blur(x):
    return v2.GaussianBlur(5, sigma=1.5)(x)


def test_in_distribution_inputs_are_not_flagged(split):
    reference, served, _ = split
    result = drift_report.compare(reference, *served_records(served))
    assert result["drifted"] == [], result["signals"]


@pytest.mark.parametrize("change, signal", [(darken, "brightness"), (blur, "sharpness")])
def test_darkened_or_blurred_inputs_are_flagged(split, change, signal):
    reference, served, _ = split
    result = drift_report.compare(reference, *served_records(change(served)))
    assert signal in result["drifted"], result["signals"]


# ---------------------------------------------------------------------------- false alarms and detection per n

SIZES = (100, 200, 500, 1000)
REPS = 400  # per n: a true rate of 1% is read as 1% +- 0.5%; over 5% would need a true rate near 3% or more


def simulate(reference, stats, classes, weights=None, seed=0) -> dict[int, dict]:
    """Windows of n requests drawn (with replacement) from a pool of records, `weights` per record or uniform:
    how often drift_check flags one, and the median PSI of the class mix, per n."""
    rng = np.random.default_rng(seed)
    p = None if weights is None else weights / weights.sum()
    out = {}
    for n in SIZES:
        flagged, psis = 0, []
        for _ in range(REPS):
            idx = rng.choice(len(classes), n, p=p)
            result = drift_check.check(reference, stats[idx], classes[idx])
            flagged += bool(result["drifted"])
            psis.append(result["signals"][drift_check.CLASS_SIGNAL]["psi"])
        out[n] = {"rate": flagged / REPS, "psi": float(np.median(psis))}
    return out


def table(title: str, rates: dict[int, dict]) -> str:
    cells = "  ".join(f"n={n}: {r['rate']:6.1%} (class PSI {r['psi']:.2f})" for n, r in rates.items())
    return f"{title:<44} {cells}"


def test_training_like_traffic_is_flagged_at_most_5_percent_of_the_time_at_any_n(split):
    """Windows drawn from the very images the reference was built from, with their classes: the null hypothesis
    itself. The family-wise alpha is 1%; PSI over 0.2 would have flagged most of these windows (issue 24)."""
    reference, _, (stats, labels) = split
    rates = simulate(reference, stats, labels)
    print("\n" + table(f"training reference, {REPS} windows per n", rates))
    for n, r in rates.items():
        assert r["rate"] <= 0.05, (n, r)


def test_detection_rate_per_n_of_darker_images_and_a_changed_class_mix(split):
    """Power: how often a shifted window is flagged, per n (printed; run with -s). Shifts: images at 80% and 60%
    brightness (the held-out tracks, as the model classifies them), and speed limits (classes 0-8) twice as
    common as in training. Printed too, not asserted: the held-out tracks unchanged, ~1,500 frames of a few
    hundred tracks. Frames of one track are near copies, so those windows are not independent draws (the
    test's assumption) and are flagged more often than alpha: what bursty traffic does (drift_check's docstring)."""
    reference, served, (stats, labels) = split
    rows = []
    for factor in (0.8, 0.6):
        dark_stats, dark_classes = served_records((served.float() * factor).to(torch.uint8))
        rates = simulate(reference, dark_stats.numpy(), np.asarray(dark_classes), seed=1)
        rows.append((f"darker images (x{factor})", rates))
    weights = np.where(labels <= 8, 2.0, 1.0)
    prior = np.asarray(reference["class_prior"])
    shifted = np.bincount(labels, weights=weights, minlength=len(prior)) / weights.sum()
    tv = 0.5 * np.abs(shifted - prior).sum()
    rows.append((f"speed limits x2 (TV distance {tv:.2f})", simulate(reference, stats, labels, weights, seed=2)))
    held_out, held_classes = served_records(served)
    rows.append(("held-out tracks, unchanged", simulate(reference, held_out.numpy(), np.asarray(held_classes), seed=3)))
    print("\n" + "\n".join(table(title, rates) for title, rates in rows))
    for title, rates in rows[:3]:
        assert rates[1000]["rate"] >= 0.9, (title, rates)
        assert rates[1000]["rate"] >= rates[100]["rate"], (title, rates)  # more traffic, more power


def test_chi_square_tail_and_sparse_cells():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 9, 15, 42):
        for x in (0.1, 1.0, 5.0, 9.0, 30.0, 100.0):
            assert drift_check.chi2_sf(x, df) == pytest.approx(scipy_stats.chi2.sf(x, df), rel=1e-9, abs=1e-15)
    expected = 100 * np.array([0.5, 0.3, 0.1, 0.05, 0.02, 0.02, 0.01])
    pooled, observed = drift_check.pool_sparse(expected, np.arange(7.0))
    assert pooled.min() >= drift_check.MIN_EXPECTED and pooled.sum() == pytest.approx(100)
    assert observed.sum() == sum(range(7))
    assert drift_check.holm({"a": 0.001, "b": 0.02, "c": 0.5}) == {"a": 0.003, "b": 0.04, "c": 0.5}


def test_cli_reads_the_handler_log_writes_a_report_and_exits_1_on_drift(split, tmp_path):
    from serving_metrics import InputLog

    reference, served, _ = split
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    for name, images in (("normal", served), ("dark", darken(served))):
        stats, classes = served_records(images)
        log = InputLog(tmp_path / name / "gtsrb_inputs.jsonl", max_bytes=10_000_000, backups=1)
        log.write([(32, 32)] * len(classes), stats.tolist(), classes, [0.9] * len(classes))
        run = subprocess.run(
            [sys.executable, "-m", "tools.drift_report", "--reference", str(tmp_path / "ref.json"),
             "--log", str(tmp_path / name / "gtsrb_inputs.jsonl*"), "--output", str(tmp_path / name / "report")],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == (1 if name == "dark" else 0), run.stdout + run.stderr
        assert (tmp_path / name / "report" / "drift.png").is_file()
        assert ("DRIFT" in run.stdout) == (name == "dark")


def test_input_log_rotates_and_stays_bounded(tmp_path):
    from serving_metrics import InputLog

    log = InputLog(tmp_path / "in.jsonl", max_bytes=4000, backups=2)
    for _ in range(50):
        log.write([(32, 32)] * 5, [[0.5] * 7] * 5, [1] * 5, [0.9] * 5)
    files = sorted(tmp_path.glob("in.jsonl*"))
    assert len(files) == 3 and all(f.stat().st_size <= 4000 for f in files)
    assert json.loads(files[0].read_text().splitlines()[0]).keys() == {
        "t",
        "w",
        "h",
        "stats",
        "class",
        "p",
        "model_version",
    }


WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from serving_metrics import InputLog, input_log_path
log_dir, port, batches = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
path = input_log_path(log_dir, ["model_service_worker.py", "--sock-type", "unix", "--sock-name", f"/tmp/.ts.sock.{port}"])
log = InputLog(path, max_bytes=5000, backups=100_000)
for i in range(batches):
    log.write([(32, 32)] * 5, [[0.5] * 7] * 5, [port % 43] * 5, [0.9] * 5)
"""


def test_two_workers_logging_at_once_lose_no_row(tmp_path):
    """Each worker writes and rotates its own file (named by its TorchServe port): no row is lost at rollover,
    as rows were when two processes rotated one file."""
    batches = 400
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT / "handler"), str(tmp_path), str(port), str(batches)])
        for port in (9000, 9001)
    ]
    assert [w.wait(timeout=300) for w in writers] == [0, 0]
    files = sorted(tmp_path.glob("gtsrb_inputs.jsonl*"))
    assert {f.name.split(".")[2] for f in files} == {"w9000", "w9001"}
    classes = {}
    for f in files:
        rows = [json.loads(line)["class"] for line in f.read_text().splitlines()]
        assert len(set(rows)) == 1, f"{f.name}: rows of two writers"
        classes.setdefault(f.name.split(".")[2], []).extend(rows)
    assert {w: len(rows) for w, rows in classes.items()} == {"w9000": 5 * batches, "w9001": 5 * batches}


def test_bad_log_lines_are_skipped_and_counted_and_the_result_is_a_metrics_file(split, tmp_path):
    """One torn or foreign line must not stop the report (issue 22, item 6); the count is reported and exported."""
    from serving_metrics import InputLog

    reference, served, _ = split
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    stats, classes = served_records(darken(served[:300]))
    path = tmp_path / "logs" / "gtsrb_inputs.jsonl"
    InputLog(path, max_bytes=10_000_000, backups=1).write([(32, 32)] * len(classes), stats.tolist(), classes,
                                                         [0.9] * len(classes))  # fmt: skip
    with open(path, "a") as f:
        f.write('{"t": 1, "stats": [0.5, 0.5], "class": 3, "p": 0.9}\n')  # another reference's statistics
        f.write("not json at all\n")
        f.write('{"t": 1, "stats": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "class": "stop", "p": 0.9}\n')
        f.write('{"t": 1, "stats": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], "cla\n')  # torn write
    prom = tmp_path / "textfile" / "gtsrb_drift.prom"
    run = subprocess.run(
        [sys.executable, "-m", "tools.drift_check", "--reference", str(tmp_path / "ref.json"),
         "--log", f"{path}*", "--textfile", str(prom)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    n = len(classes)  # 300, or all the synthetic set holds where ../shared is absent
    assert n >= 200
    assert run.returncode == 1 and f"{n} served requests, 4 malformed log lines skipped" in run.stdout, run.stdout
    assert "DRIFT in: " in run.stdout and "Traceback" not in run.stderr
    text = prom.read_text()
    assert "gtsrb_drift_bad_lines 4\n" in text and "gtsrb_drift_detected 1\n" in text
    assert 'gtsrb_drift_signal_detected{signal="brightness"} 1\n' in text
    assert {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")} == set(drift_check.METRICS)
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    # The report needs no torch and nothing of the project but itself: the serving image runs it as one file.
    alone = subprocess.run(
        [sys.executable, "-I", str(ROOT / "tools" / "drift_check.py"), "--reference", str(tmp_path / "ref.json"),
         "--log", f"{path}*"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert alone.returncode == 1 and "DRIFT" in alone.stdout, alone.stderr
    assert "import torch" not in (ROOT / "tools" / "drift_check.py").read_text()


def test_too_few_requests_are_not_tested(split):
    reference, served, _ = split
    result = drift_check.check(
        reference, *map(np.asarray, served_records(darken(served[: drift_check.MIN_SAMPLES - 1])))
    )
    assert not result["tested"] and result["drifted"] == []
