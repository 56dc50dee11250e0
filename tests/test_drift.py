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
