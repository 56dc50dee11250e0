import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The archive is handler/, flat: its modules import each other as top-level modules.
for p in (ROOT / "handler", ROOT):
    sys.path.insert(0, str(p))

# Training runs in the tests log to a throw-away MLflow store, never to the developer's mlruns/.
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp(prefix='gtsrb-mlflow-')}/mlflow.db")

# GTSRB_SHARED_DATA=/nonexistent runs the tests as on a fresh clone without ../shared.
SHARED_DATA = Path(os.environ.get("GTSRB_SHARED_DATA") or ROOT.parent / "shared" / "data")
REAL_DATA = (SHARED_DATA / "gtsrb" / "GTSRB" / "Training").is_dir()
MODEL = ROOT / "models" / "gtsrb.pt"
NAMES = json.loads((ROOT / "handler" / "index_to_name.json").read_text())
# Real signs committed with the project (samples/README.md): one GTSRB training frame per class, "NN-name.png".
SAMPLES = ROOT / "samples"
# The sign classes the tests send; 14 (Stop) is the one the handler tests transform.
SIGN_CLASSES = (1, 12, 13, 14, 17, 25, 33, 38)


def sample(cls: int) -> Path:
    """The shipped real sign of class ``cls``."""
    (path,) = SAMPLES.glob(f"{cls:02d}-*.png")
    return path


@pytest.fixture(scope="session")
def gtsrb_root(tmp_path_factory) -> Path:
    """A GTSRB training split in torchvision's layout: the real one at ../shared/data (or $GTSRB_SHARED_DATA),
    else training.data's synthetic drawings (6 tracks of 5 frames per class), rendered here, never committed."""
    if REAL_DATA:
        return SHARED_DATA
    from training.data import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("gtsrb"), tracks_per_class=6, frames=5, test_per_class=0)


@pytest.fixture(scope="session")
def real_signs() -> list[tuple[Path, int]]:
    """Real GTSRB training frames shipped in samples/ (path, true class), one per SIGN_CLASSES entry."""
    return [(sample(cls), cls) for cls in SIGN_CLASSES]


@pytest.fixture(scope="session")
def signs(real_signs) -> list[tuple[Path, int]]:
    """(path, class the served model must answer), one image per SIGN_CLASSES entry, in that order: the shipped
    real signs and their true class (the shipped model must get these right)."""
    return real_signs


@pytest.fixture(scope="session")
def stop_sign(signs):
    """The class-14 sign as a 96x96 RGB image (PIL)."""
    from PIL import Image

    path, _ = signs[SIGN_CLASSES.index(14)]
    return Image.open(path).convert("RGB").resize((96, 96), Image.BICUBIC)


@pytest.fixture(scope="session")
def stop_answer(signs) -> str:
    """The class name the served model must answer for stop_sign: "Stop" on real data."""
    return NAMES[str(signs[SIGN_CLASSES.index(14)][1])]


def fake_command(tmp_path: Path, name: str, script: str) -> tuple[str, Path]:
    """An executable ``name`` running the shell ``script``, in a folder put first on a PATH so that it shadows
    any real one: (that PATH, the log file the script may write to as $FAKE_LOG)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / name).write_text(script)
    (bin_dir / name).chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", tmp_path / f"{name}.log"
