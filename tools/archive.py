"""Pack model_store/gtsrb.mar: the TorchScript model, the handler, its modules, class names, config.

python -m tools.archive [--model models/gtsrb.pt] [--export-path model_store] [--registered-version N]
python -m tools.archive --champion gtsrb   # the MLflow version with alias `champion`: its model, its number

The archive's version names the model it carries: the first 12 hex digits of the model file's sha256
(``1e52a9c1b0d4``), after the registered MLflow model version (``v3-1e52a9c1b0d4``). That version is read from
the lineage training writes beside the exported model (``models/gtsrb_lineage.json``: ``registered_version``),
so `make archive` and the DVC archive stage both carry it; ``--registered-version`` overrides it.
TorchServe reports it as ``modelVersion`` on ``GET :8081/models/gtsrb``; the handler writes it into every line
of the input log (``model_version``).
"""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANDLER_DIR = ROOT / "handler"
MODEL_CONFIG = HANDLER_DIR / "model-config.yaml"


def extra_files(handler_dir: Path = HANDLER_DIR) -> list[Path]:
    """handler/ is the archive: every other module and data file in it is copied flat into the archive root
    and imported there as a top-level module."""
    return sorted(f for f in handler_dir.iterdir() if f.suffix in {".py", ".json"} and f.name != "gtsrb_handler.py")


def lineage_of(model: Path) -> Path:
    """Where training writes a model's lineage: ``<stem>_lineage.json`` beside it (training/train.py --export)."""
    return Path(model).with_name(Path(model).stem + "_lineage.json")


def registered_version(model: Path) -> str | None:
    """The registered MLflow version in ``model``'s lineage; None without a lineage, a registered version, or
    when the lineage names another file (its ``model_sha256``, where it records one)."""
    try:
        lineage = json.loads(lineage_of(model).read_text())
    except FileNotFoundError:
        return None
    recorded = lineage.get("model_sha256")
    if recorded and recorded != hashlib.sha256(Path(model).read_bytes()).hexdigest():
        print(f"{lineage_of(model)} describes another model file: no registered version", file=sys.stderr)
        return None
    version = lineage.get("registered_version")
    return str(version) if version else None


def model_version(model: Path, registered: str | None = None) -> str:
    """``<sha256[:12]>`` of the model file, or ``v<registered>-<sha256[:12]>``."""
    digest = hashlib.sha256(Path(model).read_bytes()).hexdigest()[:12]
    return f"v{registered}-{digest}" if registered else digest


def build(
    model: Path = ROOT / "models" / "gtsrb.pt",
    export_path: Path = ROOT / "model_store",
    name: str = "gtsrb",
    registered: str | None = None,
    config: Path = MODEL_CONFIG,
    handler_dir: Path = HANDLER_DIR,
) -> Path:
    export_path.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    cmd = [
        str(archiver), "--force", "--model-name", name, "--version", model_version(model, registered),
        "--export-path", str(export_path), "--serialized-file", str(model), "--handler", str(handler_dir / "gtsrb_handler.py"),
        "--extra-files", ",".join(str(f) for f in extra_files(handler_dir)), "--config-file", str(config),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return export_path / f"{name}.mar"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "gtsrb.pt")
    p.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    p.add_argument("--registered-version",
                   help="the MLflow registered model version of --model (default: read from its lineage file)")  # fmt: skip
    p.add_argument("--champion", metavar="NAME", help="pack the `champion` version of this MLflow registered model")
    args = p.parse_args()
    if args.champion:
        import tempfile

        from training import tracking

        version = tracking.champion(args.champion)
        if version is None:
            sys.exit(f"error: {args.champion} has no `champion` version: python -m training.tracking promote NAME N")
        with tempfile.TemporaryDirectory() as tmp:
            model = tracking.download_model(version, Path(tmp))
            print(build(model, args.export_path, registered=version["version"]))
        return
    registered = args.registered_version or registered_version(args.model)
    print(build(args.model, args.export_path, registered=registered))


if __name__ == "__main__":
    main()
