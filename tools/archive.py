"""Pack model_store/gtsrb.mar: the TorchScript model, the handler, its modules, class names, config.

python -m tools.archive [--model models/gtsrb.pt] [--export-path model_store]
"""

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANDLER = ROOT / "handler" / "gtsrb_handler.py"
# Copied flat into the archive root and imported there as top-level modules.
EXTRA_FILES = [
    ROOT / "handler" / "image_input.py",
    ROOT / "handler" / "serving_metrics.py",
    ROOT / "training" / "presets.py",
    ROOT / "handler" / "index_to_name.json",
]
MODEL_CONFIG = ROOT / "handler" / "model-config.yaml"


def build(
    model: Path = ROOT / "models" / "gtsrb.pt", export_path: Path = ROOT / "model_store", name: str = "gtsrb"
) -> Path:
    export_path.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    cmd = [
        str(archiver), "--force", "--model-name", name, "--version", "1.0", "--export-path", str(export_path),
        "--serialized-file", str(model), "--handler", str(HANDLER),
        "--extra-files", ",".join(str(f) for f in EXTRA_FILES), "--config-file", str(MODEL_CONFIG),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    return export_path / f"{name}.mar"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "models" / "gtsrb.pt")
    p.add_argument("--export-path", type=Path, default=ROOT / "model_store")
    args = p.parse_args()
    print(build(args.model, args.export_path))


if __name__ == "__main__":
    main()
