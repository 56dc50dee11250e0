"""deploy/train_cloud.py and what it ships: the gcloud commands of `make train-cloud` and `make ci-trigger` (dry runs
without gcloud, real runs against a fake gcloud that records its calls), the Vertex AI job spec, the training
image's build inputs, the job script run for real on a synthetic GTSRB, and the Cloud Build CI smoke test run
against a real TorchServe. No network, no Google Cloud account."""

import hashlib
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pathspec
import pytest
import yaml

from deploy import train_cloud
from tests.conftest import ROOT, fake_command
from tests.ts_server import serving
from training.data import make_synthetic

PROJECT, REGION, TAG = "demo-proj-123", "europe-west1", "abc1234"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/gtsrb/gtsrb-train:{TAG}"
BUCKET = f"{PROJECT}-gtsrb"
ONE_STEP = "--epochs 1 --max-steps 1 --batch-size 16 --resolution 32 --threads 1 --device cpu"


def path_without_gcloud() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "gcloud").exists())


def cli(*args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path_without_gcloud() if path is None else path, **env}
    return subprocess.run(
        [sys.executable, "-m", "deploy.train_cloud", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


def flags(argv: list[str]) -> dict[str, str | bool]:
    return dict(a.split("=", 1) if "=" in a else (a, True) for a in argv if a.startswith("--"))


class DryRun:
    def __init__(self, command: str, *extra: str):
        base = ["--project", PROJECT, "--region", REGION, "--dry-run"]
        if command == "train":
            base += ["--tag", TAG]
        self.proc = cli(command, *base, *extra)
        assert self.proc.returncode == 0, self.proc.stderr
        self.out = self.proc.stdout
        self.commands = [shlex.split(line) for line in self.out.splitlines() if line.startswith("gcloud ")]
        m = re.search(r"^# job spec written to (\S+):$", self.out, re.M)
        self.spec_file = Path(m.group(1)) if m else None

    def one(self, *words: str) -> list[str]:
        found = [c for c in self.commands if c[1 : 1 + len(words)] == list(words)]
        assert len(found) == 1, f"expected one `gcloud {' '.join(words)}`, got {found}"
        return found[0]

    def index(self, *words: str) -> int:
        return self.commands.index(self.one(*words))

    def spec(self) -> dict:
        spec = yaml.safe_load(self.spec_file.read_text())
        self.spec_file.unlink()
        return spec


@pytest.fixture(scope="module")
def train():
    return DryRun("train", "--upload-data", "../shared/data", "--name", "job-1")


# --------------------------------------------------------------------------------------------- train: dry run


def test_train_dry_run_builds_uploads_and_submits_in_order(train):
    assert train.commands and all(flags(c)["--project"] == PROJECT for c in train.commands)
    services = train.one("services", "enable")
    assert {"aiplatform.googleapis.com", "cloudbuild.googleapis.com", "storage.googleapis.com"} <= set(services)
    for kind in (("artifacts", "repositories"), ("storage", "buckets")):  # describe, then create only if missing
        assert train.index(*kind, "create") == train.index(*kind, "describe") + 1
    assert train.one("storage", "buckets", "create")[4] == f"gs://{BUCKET}"
    rsync = train.one("storage", "rsync")
    assert rsync[3:5] == ["../shared/data", f"gs://{BUCKET}/data"] and "--recursive" in rsync
    build = flags(train.one("builds", "submit"))
    assert build["--config"] == train_cloud.TRAIN_BUILD and build["--ignore-file"] == train_cloud.TRAIN_IGNORE
    subs = dict(s.split("=", 1) for s in build["--substitutions"].split(","))
    assert subs == {"_IMAGE": IMAGE, "_TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"}
    job = train.one("ai", "custom-jobs", "create")
    assert train.commands[-1] == job  # the job comes last: its image and data are in place
    assert (
        train.index("storage", "rsync") < train.index("builds", "submit") < train.index("ai", "custom-jobs", "create")
    )
    assert flags(job)["--region"] == REGION and flags(job)["--display-name"] == "job-1"
    assert Path(flags(job)["--config"]) == train.spec_file


def test_job_spec_reads_the_uploaded_data_and_writes_results_and_mlflow_to_the_bucket(train):
    (pool,) = train.spec()["workerPoolSpecs"]
    assert pool["replicaCount"] == 1 and pool["machineSpec"] == {"machineType": "n1-standard-8"}
    container = pool["containerSpec"]
    assert container["imageUri"] == IMAGE  # the image the build step pushes
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["DATA_ROOT"] == f"/gcs/{BUCKET}/data"  # where rsync put it, through Vertex AI's mount
    assert env["OUTPUT"] == f"/gcs/{BUCKET}/jobs/job-1"
    assert env["MLFLOW_TRACKING_URI"] == f"file:///gcs/{BUCKET}/mlruns" and env["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert f"gs://{BUCKET}/jobs/job-1/" in train.out and f"/gcs/{BUCKET}/mlruns" in train.out  # where to look


def test_gpu_job_tracking_server_and_no_build():
    run = DryRun("train", "--accelerator", "NVIDIA_TESLA_T4", "--mlflow-tracking-uri", "https://mlflow.example.com",
                 "--bucket", "other", "--no-build")  # fmt: skip
    (pool,) = run.spec()["workerPoolSpecs"]
    assert pool["machineSpec"]["acceleratorType"] == "NVIDIA_TESLA_T4" and pool["machineSpec"]["acceleratorCount"] == 1
    env = {e["name"]: e["value"] for e in pool["containerSpec"]["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com" and env["DATA_ROOT"] == "/gcs/other/data"
    assert "MLFLOW_ALLOW_FILE_STORE" not in env
    assert not [c for c in run.commands if c[1:3] == ["builds", "submit"]]
    assert not [c for c in run.commands if c[1:3] == ["storage", "rsync"]]  # no --upload-data: data already there
    gpu = train_cloud.Config(project=PROJECT, region=REGION, accelerator="NVIDIA_TESLA_T4")
    assert gpu.torch_index_url == "https://pypi.org/simple"  # the CUDA torch for a GPU job


# ------------------------------------------------------------------------------------- ci-trigger: dry run


def test_ci_trigger_runs_the_ci_build_on_pushes_to_main():
    run = DryRun("ci-trigger", "--github-owner", "octo", "--github-repo", "gtsrb-serve")
    create = run.one("builds", "triggers", "create", "github")
    assert run.index("builds", "triggers", "create", "github") == run.index("builds", "triggers", "describe") + 1
    f = flags(create)
    assert (f["--repo-owner"], f["--repo-name"], f["--branch-pattern"]) == ("octo", "gtsrb-serve", "^main$")
    assert f["--build-config"] == train_cloud.CI_BUILD
    build = yaml.safe_load((ROOT / f["--build-config"]).read_text())
    passed = dict(s.split("=", 1) for s in f["--substitutions"].split(","))
    assert passed == {"_REGION": REGION, "_REPO": "gtsrb"} and set(passed) <= set(build["substitutions"])
    assert build["options"]["dynamicSubstitutions"] is True
    assert (
        build["substitutions"]["_IMAGE"] == "${_REGION}-docker.pkg.dev/${PROJECT_ID}/${_REPO}/gtsrb-serve:${SHORT_SHA}"
    )


def test_ci_build_archives_builds_runs_and_smoke_tests_before_it_pushes():
    build = yaml.safe_load((ROOT / train_cloud.CI_BUILD).read_text())
    steps = {s["id"]: s for s in build["steps"]}
    assert list(steps) == ["archive", "build", "run", "smoke"]
    script = steps["archive"]["args"][-1]
    assert "python -m tools.archive" in script
    # The archiver from its hash lock, nothing else: the pin of serve.txt and the hashes of image-lock.txt.
    assert "pip install -q --no-deps --require-hashes -r requirements/archiver-lock.txt" in script
    lock = (ROOT / "requirements" / "archiver-lock.txt").read_text()
    image_lock = (ROOT / "requirements" / "image-lock.txt").read_text()
    pinned = re.search(r"^torch-model-archiver==\S+", (ROOT / "requirements" / "serve.txt").read_text(), re.M)[0]
    assert re.findall(r"^([a-z-]+==\S+)", lock, re.M) == ["enum-compat==0.0.3", pinned]
    blocks = re.findall(r"^[a-z-]+==\S+ \\\n(?:    --hash=sha256:[0-9a-f]{64}(?: \\\n)?)+", lock, re.M)
    assert len(blocks) == 2 and all(b.strip() in image_lock for b in blocks), blocks
    assert steps["archive"]["name"] == steps["smoke"]["name"] == "${_PYTHON_IMAGE}"
    assert "_PYTHON_IMAGE" in build["substitutions"]
    assert "--tag=${_IMAGE}" in steps["build"]["args"]
    run = steps["run"]["args"]
    assert run[0] == "run" and "--network=cloudbuild" in run and "--name=gtsrb-ci" in run and run[-1] == "${_IMAGE}"
    smoke = steps["smoke"]["args"]
    assert (ROOT / smoke[0]).is_file() and smoke[1] == "http://gtsrb-ci:8080"
    # Pushed by `images:` only, after every step passed; no step pushes on its own.
    assert build["images"] == ["${_IMAGE}"]
    assert not [s for s in build["steps"] if "push" in s.get("args", [])]


# ------------------------------------------------------------------------------------- the training image


def ignore_spec(path: Path) -> pathspec.PathSpec:
    return pathspec.GitIgnoreSpec.from_lines(path.read_text().splitlines())


def test_training_image_build_inputs_are_uploaded_and_in_the_docker_context():
    dockerfile = ROOT / "docker" / "train.Dockerfile"
    build = yaml.safe_load((ROOT / train_cloud.TRAIN_BUILD).read_text())
    assert f"--file={dockerfile.relative_to(ROOT)}" in build["steps"][0]["args"]
    copies = [line.split()[1:-1] for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
    sources = [s for srcs in copies for s in srcs]
    assert "training/" in sources and "docker/train-job.sh" in sources
    for req in [s for s in sources if s.startswith("requirements/")]:  # what `pip install -r` reads is copied too
        for include in re.findall(r"^-r (\S+)", (ROOT / req).read_text(), re.M):
            assert f"requirements/{include}" in sources, (req, include)
    tracked = subprocess.run(["git", "ls-files", *sources], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert {s for s in sources if not s.endswith("/")} <= set(tracked)
    docker_ignore = ignore_spec(ROOT / "docker" / "train.Dockerfile.dockerignore")
    upload_ignore = ignore_spec(ROOT / train_cloud.TRAIN_IGNORE)
    assert "training/configs/gtsrb.yaml" in tracked and "docker/wheelhouse/.gitignore" in tracked
    for rel in tracked:  # every committed file the image copies is uploaded and in the build context
        assert not docker_ignore.match_file(rel) and not upload_ignore.match_file(rel), rel
    for rel in (dockerfile, ROOT / train_cloud.TRAIN_BUILD, ROOT / "docker" / "train.Dockerfile.dockerignore"):
        assert not upload_ignore.match_file(str(rel.relative_to(ROOT)))  # what gcloud needs to start the build
    for rel in (".venv/bin/python", "runs/teacher/latest/best.pth", "mlruns/mlflow.db", "model_store/gtsrb.mar",
                ".git/HEAD", "training/__pycache__/train.cpython-311.pyc"):  # fmt: skip
        assert docker_ignore.match_file(rel) and upload_ignore.match_file(rel), rel


@pytest.mark.slow
def test_the_job_script_trains_teacher_and_student_and_archives_into_output(tmp_path):
    """docker/train-job.sh as the image runs it, on a rendered GTSRB with one-step recipes and an MLflow file
    store: the job's own environment (job_spec), its Cloud Storage paths moved to a local folder."""
    data = make_synthetic(tmp_path / "data", tracks_per_class=2, frames=2, test_per_class=1)
    cfg = train_cloud.Config(project=PROJECT, region=REGION, bucket="b", train_args=ONE_STEP)
    (pool,) = train_cloud.job_spec(cfg, "job-1")["workerPoolSpecs"]
    job_env = {e["name"]: e["value"].replace("/gcs/b", str(tmp_path)) for e in pool["containerSpec"]["env"]}
    out, store = Path(job_env["OUTPUT"]), Path(job_env["MLFLOW_TRACKING_URI"].removeprefix("file://"))
    assert job_env["DATA_ROOT"] == str(tmp_path / "data") == str(data)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **job_env}
    r = subprocess.run(["bash", "docker/train-job.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    model = out / "models" / "gtsrb.pt"
    lineage = yaml.safe_load((out / "models" / "gtsrb_lineage.json").read_text())
    assert (out / "runs" / "teacher" / "latest" / "best.pth").is_file()
    assert str(out) not in lineage["run_dir"]  # trained on local disk, copied at the end
    version = f"v{lineage['registered_version']}-{hashlib.sha256(model.read_bytes()).hexdigest()[:12]}"
    with zipfile.ZipFile(out / "model_store" / "gtsrb.mar") as z:
        assert yaml.safe_load(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == version
    assert any(store.rglob("meta.yaml"))  # the MLflow runs are in the job's store


# ------------------------------------------------------------------------------------------------ real runs


FAKE_GCLOUD = """#!/bin/sh
# Records each call; keeps a copy of the job spec; describe fails; anything matching $FAKE_FAIL fails.
printf '%s\\n' "$*" >> "$FAKE_LOG"
for a in "$@"; do
  case "$a" in --config=*gtsrb-train-job-*) cp "${a#--config=}" "$FAKE_LOG.spec" || exit 9;; esac
done
if [ -n "$FAKE_FAIL" ]; then case "$*" in *"$FAKE_FAIL"*) echo "fake failure" >&2; exit 7;; esac; fi
case "$*" in *" describe "*) exit 1;; esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    path, log = fake_command(tmp_path, "gcloud", FAKE_GCLOUD)

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        r = cli(*args, path=path, FAKE_LOG=str(log), **env)
        return r, log.read_text().splitlines() if log.exists() else []

    run.log = log
    return run


def test_real_train_submits_the_job_and_removes_the_spec(fake_gcloud, tmp_path):
    data = make_synthetic(tmp_path / "data", tracks_per_class=1, frames=1, test_per_class=1)
    r, calls = fake_gcloud("train", "--project", PROJECT, "--region", REGION, "--tag", TAG, "--upload-data", str(data))
    assert r.returncode == 0, r.stderr
    assert [c.split()[:2] for c in calls] == [
        ["services", "enable"], ["artifacts", "repositories"], ["artifacts", "repositories"], ["storage", "buckets"],
        ["storage", "buckets"], ["storage", "rsync"], ["builds", "submit"], ["ai", "custom-jobs"],
    ]  # fmt: skip
    spec_path = re.search(r"--config=(\S+)", calls[-1]).group(1)
    spec = yaml.safe_load(Path(f"{fake_gcloud.log}.spec").read_text())  # gcloud could read it during the call
    assert spec["workerPoolSpecs"][0]["containerSpec"]["imageUri"] == IMAGE
    assert not Path(spec_path).exists()  # and it is gone afterwards


def test_real_train_stops_at_the_first_failure_and_checks_the_data(fake_gcloud, tmp_path):
    r, calls = fake_gcloud("train", "--project", PROJECT, "--region", REGION, FAKE_FAIL="builds submit")
    assert r.returncode != 0 and "builds submit" in r.stderr and "Traceback" not in r.stderr
    assert calls[-1].startswith("builds submit")  # no job for an image that was not built
    fake_gcloud.log.unlink()
    r, calls = fake_gcloud("train", "--project", PROJECT, "--region", REGION, "--upload-data", str(tmp_path))
    assert r.returncode != 0 and "not a GTSRB root" in r.stderr and not calls


def test_real_run_without_gcloud_fails_with_one_clear_line():
    r = cli("train", "--project", PROJECT, "--region", REGION)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "gcloud not found on PATH" in r.stderr and "--dry-run" in r.stderr and not r.stdout


# --------------------------------------------------------------------------------------- the CI smoke test


@pytest.mark.e2e
def test_ci_smoke_test_passes_against_a_real_server_and_fails_without_one(tmp_path):
    smoke = [sys.executable, "deploy/ci_smoke.py"]
    with serving(tmp_path) as urls:
        r = subprocess.run([*smoke, urls["inference"], "--timeout", "60"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0 and "smoke test passed" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([*smoke, urls["inference"], "--timeout", "2"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("FAIL: no prediction")
