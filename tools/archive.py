"""Pack model_store/gtsrb.mar: the TorchScript model, the handler, its modules, class names, config.

python -m tools.archive [--model models/gtsrb.pt] [--export-path model_store] [--registered-version N]
python -m tools.archive --champion gtsrb   # the MLflow version with alias `champion`: its model, its number

The archive's version names the model it carries: the first 12 hex digits of the model file's sha256
(``1e52a9c1b0d4``), after the registered MLflow model version when one is given (``v3-1e52a9c1b0d4``).
TorchServe reports it as ``modelVersion`` on ``GET :8081/models/gtsrb``.
"""

import argparse
import hashlib
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
    p.add_argument("--registered-version", help="the MLflow registered model version of --model, if any")
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
    print(build(args.model, args.export_path, registered=args.registered_version))


if __name__ == "__main__":
    main()
