import json
from pathlib import Path

import numpy as np
import pytest
import torch

from handler.presets import EvalPreset, to_network_layout
from training import data as gdata
from training import export, train
from training.model import create_model


def test_smoke_training_on_synthetic_data(tmp_path):
    args = train.parse_args(
        ["--synthetic", "--teacher", "--epochs", "4", "--batch-size", "32", "--resolution", "32", "--lr", "3e-3",
         "--warmup-epochs", "0", "--ema-decay", "0", "--val-fraction", "0.34", "--output", str(tmp_path / "run")]
    )  # fmt: skip
    result = train.main(args)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] * 0.9, f"training loss did not go down: {losses}"
    run = Path(result["run_dir"])
    assert run.parent == tmp_path / "run" and (tmp_path / "run" / "latest").resolve() == run
    for name in ("model.pt", "best.pth", "last.pth", "config.yaml", "metrics.json", "curves.png", "confusion.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["run"]["data_source"].startswith("synthetic") and len(saved["run"]["data_fingerprint"]) == 16
    model = export.load(run / "model.pt")
    logits = model(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (3, 43) and torch.isfinite(logits).all()


def test_resume_continues_from_checkpoint(tmp_path):
    common = [
        "--synthetic",
        "--teacher",
        "--batch-size",
        "64",
        "--resolution",
        "32",
        "--max-steps",
        "2",
        "--output",
        str(tmp_path),
    ]
    first = train.main(train.parse_args(common + ["--epochs", "1"]))
    last = Path(first["run_dir"]) / "last.pth"
    result = train.main(train.parse_args(common + ["--epochs", "2", "--resume", str(last)]))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert result["run_dir"] == first["run_dir"] and result["mlflow_run_id"] == first["mlflow_run_id"]


def test_config_file_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 7\nlr: 0.01\n")
    args = train.parse_args(["-c", str(cfg), "--lr", "0.02"])
    assert (args.epochs, args.lr) == (7, 0.02)
    cfg.write_text("epoch: 7\n")
    with pytest.raises(SystemExit):
        train.parse_args(["-c", str(cfg)])


@pytest.mark.parametrize("resolution", [32, 64])
def test_torchscript_matches_eager(resolution):
    torch.manual_seed(0)
    model = create_model(43, resolution).eval()
    for m in model.modules():  # non-trivial BatchNorm statistics, so that freezing them is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    scripted = export.to_torchscript(model)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-4)
        # The handler feeds the exported model channels-last batches: same logits as the default layout.
        torch.testing.assert_close(scripted(to_network_layout(x)), scripted(x), rtol=1e-4, atol=1e-4)
    assert (scripted.image_size, scripted.resolution) == (32, resolution)


def test_shipped_model_loads_and_has_the_input_contract():
    model = export.load(gdata.CLASS_NAMES_FILE.parent.parent / "models" / "gtsrb.pt")
    assert model.image_size == 32
    assert model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 43)


def _asymmetric_batch(n=256):
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[..., :, :12] = 220  # a bright bar on the left
    return x


def test_augmentation_never_mirrors():
    x = _asymmetric_batch()
    y = train.make_augment(train.parse_args([]))(x).float().mean((1, 2))  # column profile per image
    left, right = y[:, :16].mean(1), y[:, 16:].mean(1)
    assert (left > right).all(), "an augmented image has its bright side on the right: mirrored"


def test_augmentation_draws_per_sample_parameters_and_keeps_dtype():
    x = _asymmetric_batch(64)
    y = train.make_augment(train.parse_args([]))(x)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert len({img.numpy().tobytes() for img in y}) == 64, "samples of a batch share augmentation parameters"


def test_augmentation_with_everything_off_is_identity():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    aug = train.TrainAugment(degrees=0, translate=0, scale=(1, 1), shear=0, color_jitter=0, blur_p=0, erase_p=0)
    torch.testing.assert_close(aug(x), x, atol=1, rtol=0)


def test_eval_preset_is_whole_frame_resize_to_32():
    from PIL import Image

    img = Image.new("RGB", (100, 50), (255, 0, 0))
    out = EvalPreset()(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8 and out[0].min() == 255


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_eval_preset_equals_torchvision_v2_pipeline(mode):
    # presets.EvalPreset is written with Pillow so that the server needs no torchvision; it must stay
    # the torchvision transform it replaces, for every mode a PIL image can arrive in.
    from PIL import Image
    from torchvision.transforms import InterpolationMode, v2

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (57, 43, 3), dtype=np.uint8)).convert(mode)
    ref = v2.Compose(
        [v2.RGB(), v2.Resize((32, 32), interpolation=InterpolationMode.BILINEAR, antialias=True), v2.PILToTensor()]
    )
    torch.testing.assert_close(EvalPreset()(img), ref(img), atol=0, rtol=0)


def test_pretrained_file_loads_local_timm_weights_with_a_new_head(tmp_path):
    import timm

    src = timm.create_model("mobilenetv3_small_100", num_classes=1000)  # stands in for ImageNet weights
    torch.save(src.state_dict(), tmp_path / "weights.pth")
    model = create_model(43, 64, pretrained_file=str(tmp_path / "weights.pth"))
    torch.testing.assert_close(model.net.conv_stem.weight, src.conv_stem.weight)
    assert model.net.classifier.out_features == 43


def test_class_names_are_the_43_gtsrb_classes_in_classid_order():
    names = gdata.CLASS_NAMES
    assert len(names) == 43 and len(set(names)) == 43
    assert (names[0], names[14], names[38], names[39], names[42]) == (
        "Speed limit (20km/h)", "Stop", "Keep right", "Keep left",
        "End of no passing by vehicles over 3.5 metric tons",
    )  # fmt: skip


def _teacher_checkpoint(tmp_path) -> Path:
    args = train.parse_args(
        ["-c", str(train.CONFIGS / "teacher.yaml"), "--synthetic", "--epochs", "3", "--batch-size", "32",
         "--warmup-epochs", "0", "--output", str(tmp_path / "teacher")]
    )  # fmt: skip
    return Path(train.main(args)["run_dir"]) / "best.pth"


def test_distillation_from_a_teacher_runs_and_its_loss_goes_down(tmp_path):
    teacher = _teacher_checkpoint(tmp_path)
    args = train.parse_args(
        ["--synthetic", "--epochs", "4", "--batch-size", "32", "--resolution", "48", "--lr", "3e-3",
         "--warmup-epochs", "0", "--ema-decay", "0", "--teacher", str(teacher), "--distill-alpha", "1.0",
         "--output", str(tmp_path / "student")]
    )  # fmt: skip
    result = train.main(args)
    losses = [h["train_loss"] for h in result["history"]]  # alpha=1: the pure distillation loss
    assert losses[-1] < losses[0] * 0.8, f"distillation loss did not go down: {losses}"


def test_distillation_loss_is_zero_when_the_student_matches_the_teacher():
    args = train.parse_args(["--distill-alpha", "1.0", "--distill-temperature", "2.0"])
    logits, y = torch.randn(8, 43), torch.randint(0, 43, (8,))
    assert train.distillation_loss(logits, logits.clone(), y, args).abs() < 1e-6
    assert train.distillation_loss(logits, torch.randn(8, 43), y, args) > 0.1
    args.distill_alpha = 0.0  # labels only: plain label-smoothed cross-entropy
    expected = torch.nn.functional.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    torch.testing.assert_close(train.distillation_loss(logits, torch.randn(8, 43), y, args), expected)


def test_teacher_checkpoint_exports_to_torchscript_with_the_same_input_contract(tmp_path):
    teacher = export.load_checkpoint(_teacher_checkpoint(tmp_path))
    scripted = export.to_torchscript(teacher)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), teacher(x), rtol=1e-4, atol=1e-4)
    assert (scripted.image_size, scripted.resolution) == (32, 32)


def test_runs_are_tracked_in_mlflow_and_the_model_is_registered_with_its_lineage(tmp_path):
    from training import tracking

    args = train.parse_args(
        ["--synthetic", "--teacher", "--epochs", "2", "--batch-size", "32", "--resolution", "32", "--max-steps", "3",
         "--output", str(tmp_path / "runs"), "--register", "gtsrb-test", "--export", str(tmp_path / "m" / "gtsrb.pt")]
    )  # fmt: skip
    first = train.main(args)
    args.export = ""  # the second run is registered too, but not shipped (that is the promotion gate's job)
    second = train.main(args)
    assert first["run_dir"] != second["run_dir"], "a second run overwrote the first"
    assert (tmp_path / "runs" / "latest").resolve() == Path(second["run_dir"])
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["epochs"] == "2" and run.data.tags["data_fingerprint"] == first["run"]["data_fingerprint"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/metrics.json", "reports/curves.png", "reports/config.yaml"} <= artifacts
    assert [f.path for f in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    versions = tracking.lineage("gtsrb-test")
    assert [v["run_id"] for v in versions[-2:]] == [first["mlflow_run_id"], second["mlflow_run_id"]]
    assert int(versions[-1]["version"]) == int(versions[-2]["version"]) + 1
    assert versions[-1]["git_commit"] == second["run"]["git_commit"]
    shipped = json.loads((tmp_path / "m" / "gtsrb_lineage.json").read_text())
    assert (
        shipped["mlflow_run_id"] == first["mlflow_run_id"] and shipped["registered_version"] == versions[-2]["version"]
    )
    champion = client.get_model_version_by_alias("gtsrb-test", tracking.CHAMPION)  # the registry names the shipped one
    assert str(champion.version) == versions[-2]["version"] and champion.run_id == first["mlflow_run_id"]
    assert tracking.champion("gtsrb-test")["version"] == versions[-2]["version"]  # what make archive-champion packs
    assert float(champion.tags["public_test_top1"]) == shipped["evaluation"]["public_test"]["top1"]
