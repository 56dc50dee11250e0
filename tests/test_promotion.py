"""The promotion gate (training/promote.py) and calibration (training/evaluate.py): a model replaces the shipped one
only by beating it on the public test half; its probabilities are calibrated on held-out tracks; the shipped
model's recorded numbers are what it really scores."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import MODEL, REAL_DATA, SHARED_DATA
from training import evaluate, export, metrics, promote, train
from training.model import create_model

SHIPPED_LINEAGE = json.loads(MODEL.with_name("gtsrb_lineage.json").read_text())
SHIPPED_RUN = MODEL.parent / "gtsrb_run"


def test_calibration_error_of_known_cases():
    labels = torch.zeros(100, dtype=torch.long)
    sure = torch.full((100, 43), -30.0)
    sure[:, 0] = 30.0  # top-1 probability 1.0, always right: no gap
    assert metrics.calibration_error(sure, labels) == pytest.approx(0.0, abs=1e-6)
    half_wrong = sure.clone()
    half_wrong[50:] = sure[50:].roll(1, 1)  # still sure, right half the time: a gap of 0.5
    assert metrics.calibration_error(half_wrong, labels) == pytest.approx(0.5, abs=1e-6)


def test_fitted_temperature_recovers_the_one_that_drew_the_labels():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(20000, 43, generator=g)
    labels = torch.multinomial((logits / 2.5).softmax(1), 1, generator=g).squeeze(1)
    t = metrics.fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    assert metrics.calibration_error(logits / t, labels) < metrics.calibration_error(logits, labels) / 3


def test_paired_comparison_counts_the_images_that_tell_two_models_apart():
    labels = torch.zeros(100, dtype=torch.long)
    a, b = labels.clone(), labels.clone()
    a[:2] = 1  # A wrong on 2 images B gets right
    b[2:12] = 1  # B wrong on 10 images A gets right
    b[90:] = a[90:] = 1  # both wrong on 10: they tell the models nothing
    c = metrics.paired(a, b, labels)
    assert (c["a_only"], c["b_only"], c["n"]) == (10, 2, 100)
    assert c["top1"] == pytest.approx([0.88, 0.80])
    # exact two-sided McNemar: P(at most 2 of 12 discordant pairs go one way) x 2 = 2 (1 + 12 + 66) / 2^12
    assert c["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    (lo_a, hi_a), _ = c["top1_ci95"]
    assert lo_a < 0.88 < hi_a and hi_a - lo_a == pytest.approx(0.13, abs=0.01)  # Wilson, n = 100
    assert metrics.paired(a, a, labels)["p"] == 1.0


def test_the_temperature_travels_in_the_export_and_leaves_the_answer_alone():
    torch.manual_seed(0)
    model = create_model(43, 48).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        plain = model(x)
        model.temperature.fill_(2.0)
        calibrated = model(x)
        scripted = export.to_torchscript(model)(x)
    torch.testing.assert_close(calibrated, plain / 2.0)
    torch.testing.assert_close(scripted, calibrated, rtol=1e-4, atol=1e-5)  # eager / TorchScript parity
    assert torch.equal(scripted.argmax(1), plain.argmax(1))
    assert "temperature" not in model.state_dict(), (
        "a fitted number, not a trained weight: checkpoints stay as they were"
    )


@pytest.mark.parametrize(
    "candidate, champion, shipped, expected",
    [
        (0.97, 0.96, True, True),
        (0.96, 0.96, True, False),  # a tie does not beat it
        (0.95, 0.96, True, False),
        (None, 0.96, True, False),  # never measured on the public half: never shipped
        (0.97, None, True, False),  # nothing recorded to compare with
        (0.50, None, False, True),  # nothing shipped yet
    ],
)
def test_gate_decisions(candidate, champion, shipped, expected):
    evaluation = {"public_test": {"top1": candidate}} if candidate is not None else {}
    assert promote.decide(evaluation, champion, shipped)[0] is expected


def _train(tmp_path, *extra) -> dict:
    return train.main(
        train.parse_args(
            [
                "--synthetic",
                "--teacher",
                "--arch",
                "cnn_teacher",
                "--epochs",
                "6",
                "--batch-size",
                "32",
                "--resolution",
                "32",
                "--lr",
                "3e-3",
                "--warmup-epochs",
                "0",
                "--ema-decay",
                "0",
                "--val-fraction",
                "0.34",
                "--output",
                str(tmp_path / "runs"),
                "--export",
                str(tmp_path / "models" / "gtsrb.pt"),
                *extra,
            ]
        )  # fmt: skip
    )


@pytest.mark.slow
def test_the_gate_refuses_a_worse_model_and_an_override_is_recorded(tmp_path):
    """make train's --export goes through the gate: a candidate below the shipped model leaves every shipped file as
    it was; --promote-override ships it and writes the reason into the lineage."""
    shipped = tmp_path / "models" / "gtsrb.pt"
    first = _train(tmp_path)
    assert first["promotion"]["decision"] == "promoted"
    recorded = json.loads(shipped.with_name("gtsrb_lineage.json").read_text())
    assert (
        recorded["evaluation"]["public_test"]["top1"] == first["evaluation"]["public_test"]["top1"] > 3 / 43
    )  # learnt: 3x chance
    files = {p: p.read_bytes() for p in shipped.parent.iterdir()}

    with pytest.raises(promote.Refused, match="does not beat"):
        _train(tmp_path, "--lr", "0")  # never learns: chance on the public half
    assert {p: p.read_bytes() for p in shipped.parent.iterdir()} == files

    worse = Path(json.loads((tmp_path / "runs" / "latest" / "lineage.json").read_text())["run_dir"])
    assert promote.main([str(worse), "--dest", str(shipped)]) == 1  # the command line: exit 1, nothing written
    assert {p: p.read_bytes() for p in shipped.parent.iterdir()} == files
    assert promote.main([str(worse), "--dest", str(shipped), "--override", "demo of a forced rollback"]) == 0
    lineage = json.loads(shipped.with_name("gtsrb_lineage.json").read_text())
    assert lineage["promotion"]["decision"] == "override"
    assert lineage["promotion"]["override"] == "demo of a forced rollback"
    assert lineage["promotion"]["replaced_public_top1"] == first["evaluation"]["public_test"]["top1"]
    assert shipped.read_bytes() == (worse / "model.pt").read_bytes()


def test_the_shipped_lineage_records_held_out_numbers():
    ev = SHIPPED_LINEAGE["evaluation"]
    public = ev["public_test"]
    assert public["n"] > 6000 and 0 < public["top1"] <= 1 and 0 <= public["ece"] <= 1


@pytest.mark.skipif(not REAL_DATA, reason="the public test half lives in ../shared/data")
def test_the_shipped_model_scores_what_its_lineage_records():
    """Re-measured here on the public test half: top-1 and ECE within 0.05 point of the recorded numbers."""
    test = evaluate.public_test(str(SHARED_DATA))
    assert test is not None, "the public test half is missing from ../shared/data"
    logits = metrics.predict(export.load(MODEL), test["images"])
    measured = evaluate.measure(logits, test["labels"])
    recorded = SHIPPED_LINEAGE["evaluation"]["public_test"]
    assert measured["n"] == recorded["n"]
    assert measured["top1"] == pytest.approx(recorded["top1"], abs=0.0005)
    assert measured["ece"] == pytest.approx(recorded["ece"], abs=0.0005)


# Settings of a run that are not the recipe: where it ran and where it wrote.
NOT_RECIPE = {"data_root", "download", "synthetic", "output", "export", "register", "device", "threads",
              "public_root", "promote_override", "teacher"}  # fmt: skip


# Settings added after a run: the value that reproduces what such a run did (an absent key is not a match otherwise).
INTRODUCED_LATER = {"input_norm": "dataset", "calibration_temperature": 0.0}


def test_the_recipe_file_says_what_the_shipped_run_did():
    """configs/gtsrb.yaml against the shipped model's resolved run config: every training setting agrees, and the
    teacher the recipe names has, tensor for tensor, the weights the shipped run learnt from."""
    recipe = vars(train.parse_args([]))
    shipped = yaml.safe_load((SHIPPED_RUN / "config.yaml").read_text())
    if SHIPPED_LINEAGE["evaluation"]["weights"] == "raw":
        # The run kept an EMA copy beside its weights as a measurement only: it never feeds back into training,
        # and the raw weights were shipped. That run is the recipe's run without the EMA.
        shipped["ema_decay"] = 0.0
    for key, before in INTRODUCED_LATER.items():  # a run older than the setting did what its default does
        shipped.setdefault(key, before)
    differ = {k: (recipe[k], shipped.get(k)) for k in recipe if k not in NOT_RECIPE | {"config", "resume"}}
    differ = {k: v for k, v in differ.items() if v[0] != v[1]}
    assert not differ, f"recipe vs shipped run (recipe, shipped): {differ}"
    named = [export.weights_digest(MODEL.parent.parent / t) for t in recipe["teacher"]]
    assert named == SHIPPED_LINEAGE["teacher_weights_sha256"], "the recipe names another teacher than the shipped run's"
