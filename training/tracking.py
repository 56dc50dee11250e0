"""Experiment tracking with MLflow: one MLflow run per training run, the shipped model a registered version.

The store is ``$MLFLOW_TRACKING_URI`` when set (a server URL, ``databricks``, ...); otherwise a local
SQLite store ``mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts`` (the model registry needs a
database store). ``make mlflow-ui`` opens it.

    python -m training.tracking lineage gtsrb          # the versions of a registered model and their lineage
    python -m training.tracking promote gtsrb 3        # version 3 becomes the `champion` (what make deploy ships)
    python -m training.tracking champion gtsrb         # which version is the champion

The `champion` alias names the promoted version: the promotion gate (training/promote.py --register, through
promote_version) moves it to a candidate that passed; `promote` above (make promote VERSION=N) moves it by hand.
`make archive-champion` packs that version's model into the .mar (its version `v<N>-<sha12>`), and `make deploy`
refuses an archive that is not it (deploy/gce.py).
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
CHAMPION = "champion"  # the registry alias of the shipped model: what make deploy serves


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


def set_champion(name: str, version: str | int, alias: str = CHAMPION) -> None:
    """Point the alias (default `champion`) at a registered version: the promotion of that model."""
    MlflowClient(tracking_uri()).set_registered_model_alias(name, alias, str(version))


def champion(name: str, alias: str = CHAMPION) -> dict | None:
    """The version the alias names: {version, run_id, source, tags}; None when no version carries it."""
    client = MlflowClient(tracking_uri())
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags)}


def download_model(version: dict, dest: Path) -> Path:
    """The TorchScript file of a registered version (champion()'s dict), downloaded into dest."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version["source"], dst_path=str(dest),
                                                     tracking_uri=tracking_uri()))  # fmt: skip
    (model,) = [local] if local.is_file() else sorted(local.glob("*.pt"))
    return model


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
    set_champion(name, version)
    return str(version)


def lineage(name: str) -> list[dict]:
    client = MlflowClient(tracking_uri())
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        run = client.get_run(mv.run_id)
        rows.append({"version": str(mv.version), "run_id": mv.run_id, "source": mv.source, **mv.tags,
                     "top1_train": run.data.metrics.get("train_top1")})  # fmt: skip
    return sorted(rows, key=lambda r: int(r["version"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["lineage", "promote", "champion"])
    p.add_argument("name", nargs="?", default="gtsrb")
    p.add_argument("version", nargs="?", help="promote: the registered version")
    p.add_argument("--alias", default=CHAMPION)
    args = p.parse_args()
    if args.command == "promote":
        if not args.version:
            p.error("promote needs a VERSION")
        set_champion(args.name, args.version, args.alias)
    if args.command in ("promote", "champion"):
        found = champion(args.name, args.alias)
        if found is None:
            raise SystemExit(f"{args.name} has no version with alias {args.alias!r}")
        print(json.dumps(found, indent=2))
        return
    print(json.dumps(lineage(args.name), indent=2))


if __name__ == "__main__":
    main()
