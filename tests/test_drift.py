import json
import subprocess
import sys

import pytest
import torch
from torchvision.transforms import v2

from handler.presets import image_stats
from tests.conftest import MODEL, REAL_DATA, ROOT
from tools import drift_report
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
    return reference, served


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
    reference, served = split
    result = drift_report.compare(reference, *served_records(served))
    assert result["drifted"] == [], result["psi"]


@pytest.mark.parametrize("change, signal", [(darken, "brightness"), (blur, "sharpness")])
def test_darkened_or_blurred_inputs_are_flagged(split, change, signal):
    reference, served = split
    result = drift_report.compare(reference, *served_records(change(served)))
    assert signal in result["drifted"], result["psi"]


def test_cli_reads_the_handler_log_writes_a_report_and_exits_1_on_drift(split, tmp_path):
    from serving_metrics import InputLog

    reference, served = split
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
