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

SHARED_DATA = ROOT.parent / "shared" / "data"
MODEL = ROOT / "models" / "gtsrb.pt"


@pytest.fixture(scope="session")
def gtsrb_root() -> Path:
    """The real GTSRB training split (read-only, never committed); tests that need it skip without it."""
    if not (SHARED_DATA / "gtsrb" / "GTSRB" / "Training").is_dir():
        pytest.skip(f"real GTSRB data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_signs(gtsrb_root) -> list[tuple[Path, int]]:
    """A few real training images, one track-end frame (the sharpest) of several classes."""
    picks = []
    for cls in (1, 12, 13, 14, 17, 25, 33, 38):
        folder = gtsrb_root / "gtsrb" / "GTSRB" / "Training" / f"{cls:05d}"
        picks.append((sorted(folder.glob("*_00029.ppm"))[0], cls))
    return picks
