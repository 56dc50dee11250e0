"""The promoted model: MLflow's `champion` alias names one registered version; `tools.archive --champion` packs
that version's model with its number in the .mar version, and deploy refuses an archive that is not it."""

import argparse
import hashlib
import shutil
import subprocess
import sys

import mlflow
import pytest

from deploy import commands, gce, rollout
from tests.conftest import MODEL, ROOT
from training import tracking

NAME = "gtsrb-champion-test"


def test_champion_alias_names_the_archive_and_the_deploy_checks_it(tmp_path, monkeypatch):
    tracking.start_run("champion-test", "t", {}, {})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(MODEL, run_dir / "model.pt")
    tracking.log_outputs(run_dir)
    run_id = mlflow.active_run().info.run_id
    tracking.end_run()
    first, second = (tracking.register(NAME, run_id, {"note": n}) for n in ("a", "b"))
    assert tracking.champion(NAME) is None  # nothing promoted yet
    tracking.set_champion(NAME, first)  # what the promotion gate calls
    assert tracking.champion(NAME)["version"] == str(first) and tracking.champion(NAME)["run_id"] == run_id

    out = subprocess.run([sys.executable, "-m", "tools.archive", "--champion", NAME, "--export-path", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    version = rollout.mar_version(tmp_path / "gtsrb.mar")
    assert version == f"v{first}-{hashlib.sha256(MODEL.read_bytes()).hexdigest()[:12]}"  # registry == .mar

    monkeypatch.setattr(gce, "MAR", tmp_path / "gtsrb.mar")
    args = argparse.Namespace(model_alias="champion", registered_model=NAME, dry_run=False)
    cfg = commands.Config(project="p-1", zone="europe-west1-b")
    assert gce.model_version(cfg, args) == version  # the deploy names the VMs' template and label after it
    assert rollout.label_value(version) == version
    tracking.set_champion(NAME, second)  # promoted since the archive was made
    with pytest.raises(SystemExit, match="make archive-champion"):
        gce.model_version(cfg, args)
