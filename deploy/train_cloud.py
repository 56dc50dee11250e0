"""Train on Google Cloud (a Vertex AI custom job), and build + test the serving image on every push (Cloud Build).

    python -m deploy.train_cloud train --project P --region europe-west1 --upload-data ../shared/data
    python -m deploy.train_cloud ci-trigger --project P --region europe-west1 --github-owner O --github-repo R

`train`: the training image (docker/train.Dockerfile) is built by Cloud Build and pushed to Artifact Registry;
the data set goes to gs://BUCKET/data (`gcloud storage rsync`: only changed files); the job reads it through
Vertex AI's Cloud Storage mount (/gcs/BUCKET/...), runs docker/train-job.sh (teacher, student, archive) and
writes the run folders, the model, the archive and the MLflow runs back under gs://BUCKET/.
`ci-trigger`: a Cloud Build trigger on pushes to main of the GitHub repository runs deploy/cloudbuild-ci.yaml.

Add --dry-run to print every gcloud command and run nothing; it needs no gcloud. README: "The MLOps loop".
"""

import argparse
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from deploy.commands import CPU_INDEX, Step, ensure, gcloud, repository_commands
from deploy.gce import default_tag, run

ROOT = Path(__file__).resolve().parent.parent
TRAIN_BUILD = "deploy/cloudbuild-train.yaml"  # relative: gcloud runs from ROOT, the build context
TRAIN_IGNORE = "deploy/train.gcloudignore"  # what the training image's build uploads (.gcloudignore is serving's)
CI_BUILD = "deploy/cloudbuild-ci.yaml"
GPU_INDEX = "https://pypi.org/simple"  # PyPI's Linux torch wheels are the CUDA build


@dataclass(frozen=True)
class Config:
    project: str
    region: str
    repo: str = "gtsrb"
    tag: str = "latest"
    bucket: str = ""  # default: <project>-gtsrb
    name: str = ""  # the job's display name; default: gtsrb-train-<tag>-<time>
    machine_type: str = "n1-standard-8"
    accelerator: str = ""  # e.g. NVIDIA_TESLA_T4: then the image takes the CUDA torch
    upload_data: str = ""  # a local GTSRB root to rsync to gs://<bucket>/data first
    mlflow_tracking_uri: str = ""  # default: MLflow's file store in the bucket (file:///gcs/<bucket>/mlruns)
    build: bool = True
    train_args: str = ""  # extra flags for both training runs, e.g. "--epochs 1" for a smoke job

    @property
    def gcs_bucket(self) -> str:
        return self.bucket or f"{self.project}-gtsrb"

    @property
    def job_name(self) -> str:
        return self.name or f"gtsrb-train-{self.tag}-{time.strftime('%Y%m%d-%H%M%S')}"

    @property
    def image(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repo}/gtsrb-train:{self.tag}"

    @property
    def torch_index_url(self) -> str:
        return GPU_INDEX if self.accelerator else CPU_INDEX

    def mount(self, path: str) -> str:
        """gs://<bucket>/<path> as the job's container sees it (Vertex AI mounts Cloud Storage at /gcs)."""
        return f"/gcs/{self.gcs_bucket}/{path}"


# ---------------------------------------------------------------------------------------------- commands


def job_spec(cfg: Config, name: str) -> dict:
    """The Vertex AI CustomJobSpec (gcloud ai custom-jobs create --config)."""
    machine = {"machineType": cfg.machine_type}
    if cfg.accelerator:
        machine |= {"acceleratorType": cfg.accelerator, "acceleratorCount": 1}
    env = {"DATA_ROOT": cfg.mount("data"), "OUTPUT": cfg.mount(f"jobs/{name}"), "TRAIN_ARGS": cfg.train_args}
    if cfg.mlflow_tracking_uri:  # a tracking server (its artifact store on gs://, say)
        env["MLFLOW_TRACKING_URI"] = cfg.mlflow_tracking_uri
    else:
        # No server: MLflow's file store, straight in the bucket. MLflow keeps that backend in maintenance mode
        # and refuses it unless told otherwise; a database on a Cloud Storage mount would be worse.
        env |= {"MLFLOW_TRACKING_URI": f"file://{cfg.mount('mlruns')}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    container = {"imageUri": cfg.image, "env": [{"name": k, "value": v} for k, v in env.items()]}
    return {"workerPoolSpecs": [{"machineSpec": machine, "replicaCount": 1, "containerSpec": container}]}


def train_commands(cfg: Config, spec_file: str, name: str) -> list[Step]:
    bucket = f"gs://{cfg.gcs_bucket}"
    steps = [
        *repository_commands(cfg, ("aiplatform.googleapis.com", "artifactregistry.googleapis.com",
                                   "cloudbuild.googleapis.com", "storage.googleapis.com")),
        *ensure(
            cfg,
            ["storage", "buckets", "describe", bucket],
            ["storage", "buckets", "create", bucket, f"--location={cfg.region}", "--uniform-bucket-level-access"],
            f"bucket {bucket}: data, job outputs and MLflow runs; created only if this describe fails",
        ),
    ]  # fmt: skip
    if cfg.upload_data:
        steps.append(Step(
            gcloud(cfg, "storage", "rsync", cfg.upload_data, f"{bucket}/data", "--recursive"),
            "the GTSRB root to the bucket: only new or changed files are copied",
        ))  # fmt: skip
    if cfg.build:
        steps.append(Step(
            gcloud(cfg, "builds", "submit", f"--config={TRAIN_BUILD}", f"--ignore-file={TRAIN_IGNORE}",
                   f"--substitutions=_IMAGE={cfg.image},_TORCH_INDEX_URL={cfg.torch_index_url}", "."),
            f"the training image {cfg.image} (docker/train.Dockerfile), built and pushed by Cloud Build",
        ))  # fmt: skip
    steps.append(Step(
        gcloud(cfg, "ai", "custom-jobs", "create", f"--region={cfg.region}", f"--display-name={name}",
               f"--config={spec_file}"),
        f"the job: teacher, student and archive on {cfg.machine_type}"
        f"{' + ' + cfg.accelerator if cfg.accelerator else ''}; results in {bucket}/jobs/{name}/",
    ))  # fmt: skip
    return steps


@dataclass(frozen=True)
class TriggerConfig:
    project: str
    region: str
    github_owner: str
    github_repo: str
    repo: str = "gtsrb"
    name: str = "gtsrb-serve-ci"
    branch: str = "main"


def ci_trigger_commands(cfg: TriggerConfig) -> list[Step]:
    return [
        *repository_commands(cfg, ("cloudbuild.googleapis.com", "artifactregistry.googleapis.com")),
        *ensure(
            cfg,
            ["builds", "triggers", "describe", cfg.name],
            ["builds", "triggers", "create", "github", f"--name={cfg.name}", f"--repo-owner={cfg.github_owner}",
             f"--repo-name={cfg.github_repo}", f"--branch-pattern=^{cfg.branch}$", f"--build-config={CI_BUILD}",
             f"--substitutions=_REGION={cfg.region},_REPO={cfg.repo}",
             "--description=gtsrb-serve: build, test and push the serving image"],
            f"trigger {cfg.name}: every push to {cfg.branch} runs {CI_BUILD}; created only if this describe fails "
            "(the GitHub repository must be connected to Cloud Build once, in the console)",
        ),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", required=True, help="Google Cloud project id")
    common.add_argument("--region", required=True, help="e.g. europe-west1 (Vertex AI, Artifact Registry, bucket)")
    common.add_argument("--repo", default="gtsrb", help="Artifact Registry repository (default: %(default)s)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")

    p = argparse.ArgumentParser(prog="python -m deploy.train_cloud", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", parents=[common], help="a Vertex AI custom job: teacher, student, archive")
    t.add_argument("--tag", help="image tag (default: the short git commit, else 'latest')")
    t.add_argument("--bucket", default="", help="Cloud Storage bucket (default: <project>-gtsrb)")
    t.add_argument("--name", default="", help="job display name (default: gtsrb-train-<tag>-<time>)")
    t.add_argument("--machine-type", default="n1-standard-8", help="default: %(default)s")
    t.add_argument("--accelerator", default="", help="e.g. NVIDIA_TESLA_T4 (one GPU; the image gets CUDA torch)")
    t.add_argument("--upload-data", default="", metavar="DIR", help="rsync this GTSRB root to gs://BUCKET/data first")
    t.add_argument("--mlflow-tracking-uri", default="",
                   help="the job's MLflow store (default: file:///gcs/BUCKET/mlruns; or a tracking server URL)")  # fmt: skip
    t.add_argument("--train-args", default="", help='extra training flags, e.g. "--epochs 1" for a smoke job')
    t.add_argument("--no-build", dest="build", action="store_false", help="reuse the image pushed under --tag")
    c = sub.add_parser("ci-trigger", parents=[common], help="Cloud Build trigger on pushes to main")
    c.add_argument("--github-owner", required=True, help="owner of the GitHub repository")
    c.add_argument("--github-repo", required=True, help="name of the GitHub repository")
    c.add_argument("--name", default="gtsrb-serve-ci", help="trigger name (default: %(default)s)")
    c.add_argument("--branch", default="main", help="default: %(default)s")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("command", "dry_run")}
    if not args.dry_run and shutil.which("gcloud") is None:
        sys.exit(
            "error: gcloud not found on PATH. Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
            " and run `gcloud auth login`, or add --dry-run to only print the commands."
        )
    mode = "dry run: nothing is executed" if args.dry_run else "running"
    print(f"# gtsrb {args.command} ({mode}); project {args.project}, region {args.region}")
    print(f"cd {shlex.quote(str(ROOT))}" if args.dry_run else f"# in {ROOT}")
    if args.command == "ci-trigger":
        run(ci_trigger_commands(TriggerConfig(**values)), args.dry_run)
        return 0

    cfg = Config(**{**values, "tag": args.tag or default_tag()})
    if cfg.upload_data and not args.dry_run and not (Path(cfg.upload_data) / "gtsrb" / "GTSRB" / "Training").is_dir():
        sys.exit(f"error: {cfg.upload_data} is not a GTSRB root (no gtsrb/GTSRB/Training in it)")
    name = cfg.job_name
    fd, spec_file = tempfile.mkstemp(prefix="gtsrb-train-job-", suffix=".yaml")
    spec = yaml.safe_dump(job_spec(cfg, name), sort_keys=False)
    with open(fd, "w") as f:
        f.write(spec)
    print(f"# job spec written to {spec_file}:")
    print("\n".join(f"#   {line}" for line in spec.splitlines()))
    try:
        run(train_commands(cfg, spec_file, name), args.dry_run)
    finally:
        if not args.dry_run:  # gcloud has read it; a dry run's commands still point at it
            Path(spec_file).unlink(missing_ok=True)
    bucket = f"gs://{cfg.gcs_bucket}"
    print(f"# follow it:  gcloud ai custom-jobs list --region={cfg.region} --project={cfg.project}"
          f" --filter=displayName={name}")  # fmt: skip
    print(f"# results:    gcloud storage ls {bucket}/jobs/{name}/   (models/gtsrb.pt, model_store/gtsrb.mar, runs/)")
    if not cfg.mlflow_tracking_uri:
        print(f"# MLflow:     gcsfuse {cfg.gcs_bucket} /gcs/{cfg.gcs_bucket} && MLFLOW_ALLOW_FILE_STORE=true "
              f"MLFLOW_TRACKING_URI=file:///gcs/{cfg.gcs_bucket}/mlruns make mlflow-ui")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
