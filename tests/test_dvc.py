"""The DVC pipeline (dvc.yaml), run for real on a copy of the project with a rendered synthetic GTSRB and
one-step recipes: `dvc repro` runs teacher -> train -> evaluate -> export -> archive, a second `dvc repro` runs
nothing, a changed student parameter re-runs the student's stages only, a changed data set is seen, and the
cached outputs come back from the default (local directory) remote."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from training.data import make_synthetic

DVC = Path(sys.executable).parent / "dvc"
COPIED = [
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
    ".gitignore",
    "training",
    "handler",
    "tools",
]
OVERRIDE = "pipeline test: one-step recipe on synthetic drawings"
ONE_STEP = {"epochs": 1, "max_steps": 1, "batch_size": 16, "warmup_epochs": 0, "threads": 1, "device": "cpu"}


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", out))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """A git + DVC copy of the pipeline's files, its data root a small rendered GTSRB (train and test splits)."""
    base = tmp_path_factory.mktemp("dvc")
    repo, data = base / "repo", make_synthetic(base / "data", tracks_per_class=2, frames=2, test_per_class=1)
    for name in COPIED:
        src, dst = ROOT / name, repo / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    (repo / "models").mkdir()
    for f in ROOT.glob("models/gtsrb*.*"):  # the shipped model and its files, committed as in the project
        shutil.copy(f, repo / "models" / f.name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["root"] = str(data)
    # One-step models on drawings cannot beat the shipped one on real signs: the gate would (rightly) refuse them.
    params["promote"]["override"] = OVERRIDE
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    for recipe in ("teacher", "gtsrb"):  # the real recipes, cut to one step at the frames' own resolution
        path = repo / "training" / "configs" / f"{recipe}.yaml"
        path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **ONE_STEP, "resolution": 32}))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the stages' `python`
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(base / "dvc-site-cache"),  # not /var/tmp/dvc
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    }  # fmt: skip
    for k in ("GTSRB_ROOT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)

    def run(*args: str, check: bool = True) -> str:
        r = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert not check or r.returncode == 0, f"{' '.join(args)}:\n{r.stdout}\n{r.stderr}"
        return r.stdout + r.stderr

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "copy")
    return {"repo": repo, "data": data, "run": run, "dvc": lambda *a, **kw: run(str(DVC), *a, **kw)}


def test_the_teacher_depends_on_the_recipe_keys_it_inherits():
    """teacher.yaml overrides configs/gtsrb.yaml: the teacher stage tracks what it does not override."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["teacher"]
    listed = next(p["training/configs/gtsrb.yaml"] for p in stage["params"] if "training/configs/gtsrb.yaml" in p)
    recipe = yaml.safe_load((ROOT / "training" / "configs" / "gtsrb.yaml").read_text())
    teacher = yaml.safe_load((ROOT / "training" / "configs" / "teacher.yaml").read_text())
    unused = {"distill_alpha", "distill_temperature", "output"}  # a teacher without a teacher; --output is set
    assert teacher["teacher"] == [] and set(listed) == set(recipe) - set(teacher) - unused


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_repro_runs_the_chain_once_then_only_what_changed(project):
    repo, dvc = project["repo"], project["dvc"]
    shipped = sha256(repo / "models" / "gtsrb.pt")

    first = dvc("repro")
    assert ran(first) == {"teacher", "train", "export", "evaluate", "archive"}, first
    assert (
        first.index("Running stage 'teacher'")
        < first.index("Running stage 'train'")
        < first.index("Running stage 'export'")
    )
    model = repo / "models" / "gtsrb.pt"
    assert sha256(model) != shipped  # the pipeline exported its own model, through the gate's recorded override
    lineage = json.loads((repo / "models" / "gtsrb_lineage.json").read_text())
    assert lineage["promotion"]["decision"] == "override" and lineage["promotion"]["override"] == OVERRIDE
    assert "does not beat shipped" in lineage["promotion"]["gate"]
    evaluation = lineage["evaluation"]
    assert {"public_test", "temperature"} <= set(evaluation)
    recipe = yaml.safe_load((repo / "training" / "configs" / "gtsrb.yaml").read_text())
    if recipe["val_fraction"] > 0:  # tracks held out: measured there, and the temperature fitted there
        assert "held_out_tracks" in evaluation and evaluation["temperature_source"] == "fitted on the held-out tracks"
    else:  # every track trained on: the recipe's temperature (fitted on a comparison run's tracks) is baked in
        assert "held_out_tracks" not in evaluation
        assert evaluation["temperature"] == recipe["calibration_temperature"]
    # and archived that one, versioned by the version the train stage registered (its lineage) and its hash
    with zipfile.ZipFile(repo / "model_store" / "gtsrb.mar") as z:
        manifest = z.read("MAR-INF/MANIFEST.json").decode()
        assert f'"modelVersion": "v{lineage["registered_version"]}-{sha256(model)[:12]}"' in manifest
    assert "top1" in (repo / "reports" / "evaluate" / "metrics.json").read_text()
    changed = {line[3:] for line in project["run"]("git", "status", "--porcelain").splitlines()}
    published = {"models/gtsrb.pt", "models/gtsrb_reference.json", "models/gtsrb_lineage.json"}
    assert changed == {"dvc.lock"} | published  # every other output is ignored by git (cached by DVC)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert str(project["data"]) + "/gtsrb/GTSRB/Training" in [d["path"] for d in lock["teacher"]["deps"]]

    second = dvc("repro")
    assert ran(second) == set(), second
    assert "up to date" in dvc("status")

    # A parameter of the student alone: the teacher is kept, everything downstream of the student is rebuilt.
    recipe = repo / "training" / "configs" / "gtsrb.yaml"
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "distill_alpha": 0.5}))
    third = dvc("repro")
    assert ran(third) == {"train", "export", "evaluate", "archive"}, third
    assert "Stage 'teacher' didn't change, skipping" in third


@pytest.mark.slow
def test_a_changed_data_set_is_seen(project):
    dvc = project["dvc"]
    dvc("repro")
    assert "up to date" in dvc("status")
    image = next((project["data"] / "gtsrb" / "GTSRB" / "Training" / "00014").glob("*.ppm"))
    original = image.read_bytes()
    try:
        image.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one pixel value of one image
        status = dvc("status")
        changed = {line.strip().rstrip(":") for line in status.splitlines() if line and not line.startswith("\t")}
        assert {"teacher", "train", "evaluate"} <= changed and not {"export", "archive"} & changed, status
        assert "modified:" in status and "GTSRB/Training" in status
    finally:
        image.write_bytes(original)
    assert "up to date" in dvc("status")


@pytest.mark.slow
def test_outputs_are_cached_and_come_back_from_the_remote(project):
    repo, dvc = project["repo"], project["dvc"]
    dvc("repro")
    config = (repo / ".dvc" / "config").read_text()
    assert "remote = local" in config and "analytics = false" in config
    dvc("push")
    remote = repo / ".dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*"))
    outputs = [
        repo / "artifacts" / "teacher.pth",
        repo / "artifacts" / "candidate" / "model.pt",
        repo / "model_store" / "gtsrb.mar",
    ]
    before = {p: sha256(p) for p in outputs}
    for p in outputs:
        p.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")  # nothing local left: they can only come from the remote
    dvc("pull")
    assert {p: sha256(p) for p in outputs} == before
    assert "up to date" in dvc("status")
    # Neither the data nor the remote is in git.
    tracked = project["run"]("git", "ls-files").split()
    assert not [t for t in tracked if t.startswith((".dvc-remote", ".dvc/cache"))]
