"""The archive's version names its model: the model file's hash (after the registered MLflow version, if any),
in the archive's manifest and on a real TorchServe's management API, where predictions can address it."""

import hashlib
import io
import json
import random
import subprocess
import sys
import zipfile

import pytest
import requests

from tests.conftest import MODEL, ROOT
from tests.ts_server import serving
from tools import archive
from training.data import render_sign


def sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def manifest_version(mar) -> str:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def test_version_is_the_hash_of_the_model_file(tmp_path):
    assert manifest_version(archive.build(export_path=tmp_path / "a")) == sha12(MODEL)
    other = tmp_path / "other.pt"
    other.write_bytes(MODEL.read_bytes() + b"\0")  # any change to the weights file is another version
    assert sha12(other) != sha12(MODEL)
    assert manifest_version(archive.build(other, tmp_path / "b")) == sha12(other)


def test_make_archive_passes_the_registered_mlflow_version(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "tools.archive", "--export-path", str(tmp_path), "--registered-version", "7"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert manifest_version(tmp_path / "gtsrb.mar") == f"v7-{sha12(MODEL)}"


@pytest.mark.e2e
def test_torchserve_reports_the_model_version(tmp_path):
    with serving(tmp_path) as urls:  # the archive of models/gtsrb.pt, built by tools.archive
        desc = requests.get(f"{urls['management']}/models/gtsrb", timeout=5).json()
        assert [d["modelVersion"] for d in desc] == [sha12(MODEL)]
        worker_names = {f"W-{w['id']}-gtsrb_{sha12(MODEL)}" for w in desc[0]["workers"]}
        # The version is addressable: PUT /predictions/gtsrb/<version> is served by the same model.
        buf = io.BytesIO()
        render_sign(14, random.Random(0)).save(buf, "PNG")
        a = requests.put(f"{urls['inference']}/predictions/gtsrb", data=buf.getvalue(), timeout=30)
        b = requests.put(f"{urls['inference']}/predictions/gtsrb/{sha12(MODEL)}", data=buf.getvalue(), timeout=30)
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
        metrics = requests.get(f"{urls['metrics']}/metrics", timeout=5).text
        assert all(name in metrics for name in worker_names)  # WorkerLoadTime{WorkerName="W-9000-gtsrb_<version>"}
