"""The archive's version names its model: the model file's hash, after the registered MLflow version that its lineage
file records (models/gtsrb_lineage.json). `make archive` and the DVC archive stage both put it in the archive's
manifest; a real TorchServe reports it on its management API, where predictions can address it, and the handler
writes it into the input log."""

import hashlib
import json
import shutil
import subprocess
import sys
import time
import zipfile

import pytest
import requests

from tests.conftest import MODEL, ROOT, sample
from tools import archive
from tools.torchserve_ctl import SERVE_PYTHON, serving


def sha12(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def manifest_version(mar) -> str:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def shipped_version() -> str:
    """What the shipped model's archive must say: vN-<hash> when models/gtsrb_lineage.json records a version."""
    registered = json.loads((ROOT / "models" / "gtsrb_lineage.json").read_text()).get("registered_version")
    return f"v{registered}-{sha12(MODEL)}" if registered else sha12(MODEL)


def test_version_is_the_hash_of_the_model_file(tmp_path):
    assert manifest_version(archive.build(export_path=tmp_path / "a")) == sha12(MODEL)
    other = tmp_path / "other.pt"
    other.write_bytes(MODEL.read_bytes() + b"\0")  # any change to the weights file is another version
    assert sha12(other) != sha12(MODEL)
    assert manifest_version(archive.build(other, tmp_path / "b")) == sha12(other)


def test_the_registered_version_is_read_from_the_lineage_beside_the_model(tmp_path):
    model = tmp_path / "m.pt"
    shutil.copy(MODEL, model)

    def packed(*args: str) -> str:
        cmd = [sys.executable, "-m", "tools.archive", "--model", str(model), "--export-path", str(tmp_path), *args]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return manifest_version(tmp_path / "gtsrb.mar")

    assert packed() == sha12(model)  # no lineage: the hash alone
    (tmp_path / "m_lineage.json").write_text(json.dumps({"registered_model": "gtsrb", "registered_version": 3}))
    assert packed() == f"v3-{sha12(model)}"
    assert packed("--registered-version", "7") == f"v7-{sha12(model)}"  # the flag wins
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    (tmp_path / "m_lineage.json").write_text(json.dumps({"registered_version": 4, "model_sha256": sha}))
    assert packed() == f"v4-{sha12(model)}"
    # A lineage that records another model's hash is not this model's: no version is claimed.
    (tmp_path / "m_lineage.json").write_text(json.dumps({"registered_version": 5, "model_sha256": "0" * 64}))
    assert packed() == sha12(model)
    (tmp_path / "m_lineage.json").write_text(json.dumps({"registered_model": None}))  # trained without --register
    assert packed() == sha12(model)


@pytest.mark.e2e
def test_make_archive_carries_the_registered_version_to_torchserve_and_the_input_log(tmp_path):
    """`make archive` on a copy of what it reads (times kept: the serving environment's stamp stays current)."""
    project = tmp_path / "project"
    for rel in ("Makefile", "models/gtsrb.pt", "models/gtsrb_lineage.json", "requirements/serve-lock.txt",
                "tools/__init__.py", "tools/archive.py"):  # fmt: skip
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, project / rel)
    shutil.copytree(ROOT / "handler", project / "handler", ignore=shutil.ignore_patterns("__pycache__"))
    serve_venv = SERVE_PYTHON.parent.parent.absolute()
    r = subprocess.run(["make", "archive", f"SERVE_VENV={serve_venv}"], cwd=project, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    version = shipped_version()
    assert version.startswith("v")  # the shipped model is a registered version
    assert manifest_version(project / "model_store" / "gtsrb.mar") == version

    with serving(tmp_path / "ts", project / "model_store", python=SERVE_PYTHON) as server:
        urls = server.urls
        desc = requests.get(f"{urls['management']}/models/gtsrb", timeout=5).json()
        assert [d["modelVersion"] for d in desc] == [version]
        worker_names = {f"W-{w['id']}-gtsrb_{version}" for w in desc[0]["workers"]}
        # The version is addressable: PUT /predictions/gtsrb/<version> is served by the same model.
        body = sample(14).read_bytes()
        a = requests.put(f"{urls['inference']}/predictions/gtsrb", data=body, timeout=30)
        b = requests.put(f"{urls['inference']}/predictions/gtsrb/{version}", data=body, timeout=30)
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
        metrics = requests.get(f"{urls['metrics']}/metrics", timeout=5).text
        assert all(name in metrics for name in worker_names)  # WorkerLoadTime{WorkerName="W-9000-gtsrb_<version>"}
        logs = tmp_path / "ts" / "logs"

        def logged() -> list[str]:  # one input log per worker: gtsrb_inputs.jsonl.w<port>
            return [line for f in sorted(logs.glob("gtsrb_inputs.jsonl*")) for line in f.read_text().splitlines()]

        deadline = time.monotonic() + 30  # the handler's monitor thread writes once a second
        while time.monotonic() < deadline and len(logged()) < 2:
            time.sleep(0.2)
        rows = [json.loads(line) for line in logged()]
        assert len(rows) == 2 and {row["model_version"] for row in rows} == {version}
