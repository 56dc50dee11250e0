"""Experiment tracking with MLflow: one MLflow run per training run, the shipped model a registered version.

The store is ``$MLFLOW_TRACKING_URI`` when set (a server URL, ``databricks``, ...); otherwise a local
SQLite store ``mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (the model registry needs a
database store). ``make mlflow-ui`` opens it.

    python -m training.tracking lineage gtsrb          # the versions of a registered model and their lineage
"""

import argparse
import json
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
LOCAL_STORE = ROOT / "mlruns"
EXPERIMENT = "gtsrb"


def tracking_uri() -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    LOCAL_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{LOCAL_STORE / 'mlflow.db'}"


def start_run(experiment: str, run_name: str, params: dict, tags: dict, run_id: str | None = None) -> mlflow.ActiveRun:
    """Start (or, with ``run_id``, resume) the MLflow run of a training run; params and tags logged once."""
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        location = None if os.environ.get("MLFLOW_TRACKING_URI") else (LOCAL_STORE / "artifacts").as_uri()
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    if run_id:
        return mlflow.start_run(run_id=run_id)
    run = mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in params.items()})
    return run


def end_run() -> None:
    mlflow.end_run()


def log_epoch(row: dict) -> None:
    mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def log_outputs(run_dir: Path) -> None:
    """Every report file of the run folder (not the checkpoints: they hold the optimiser state)."""
    for f in sorted(run_dir.iterdir()):
        if f.is_file() and f.suffix in {".json", ".yaml", ".png", ".log", ".pt"}:
            mlflow.log_artifact(str(f), artifact_path="model" if f.suffix == ".pt" else "reports")


def register(name: str, run_id: str, tags: dict) -> str:
    """Register the run's TorchScript model as a new version of ``name``; returns the version."""
    client = MlflowClient(tracking_uri())
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description="GTSRB traffic-sign classifier (TorchScript, uint8 32x32 in)")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    mv = client.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()})
    return mv.version


CHAMPION = "champion"  # the registry alias of the shipped model: what make deploy serves


def _flat(prefix: str, d: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def promote_version(name: str, run_id: str, model_path: Path, lineage: dict) -> str:
    """The promotion in the registry: the version ``lineage`` names (or a new one, with the calibrated TorchScript
    file logged to its run) gets the held-out numbers and the gate's decision as tags, and the ``champion``
    alias moves to it. Returns the version."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient(tracking_uri())
    ev = lineage.get("evaluation", {})
    numbers = {
        **_flat("public_test_", ev.get("public_test") or {}),
        **_flat("held_out_", ev.get("held_out_tracks") or {}),
    }
    numbers["temperature"] = ev.get("temperature", 1.0)
    version = lineage.get("registered_version") if lineage.get("registered_model") == name else None
    if version is None:
        try:
            client.get_run(run_id)
        except mlflow.exceptions.MlflowException:  # trained against another store: a run of its own for the file
            start_run(EXPERIMENT, "promoted", {}, {"trained_as": run_id})
            run_id = mlflow.active_run().info.run_id
            end_run()
        with mlflow.start_run(run_id=run_id):
            mlflow.log_artifact(str(model_path), artifact_path="model")
        tags = {k: v for k, v in lineage.items() if isinstance(v, (str, int, float)) and k != "registered_model"}
        version = register(name, run_id, tags)
    for k, v in {**numbers, "promotion": json.dumps(lineage.get("promotion", {}))}.items():
        client.set_model_version_tag(name, str(version), k, str(v))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    return str(version)


def lineage(name: str) -> list[dict]:
    client = MlflowClient(tracking_uri())
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        run = client.get_run(mv.run_id)
        rows.append({"version": mv.version, "run_id": mv.run_id, "source": mv.source, **mv.tags,
                     "top1_train": run.data.metrics.get("train_top1")})  # fmt: skip
    return sorted(rows, key=lambda r: int(r["version"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["lineage"])
    p.add_argument("name", nargs="?", default="gtsrb")
    args = p.parse_args()
    print(json.dumps(lineage(args.name), indent=2))


if __name__ == "__main__":
    main()
