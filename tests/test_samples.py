"""The real signs shipped in samples/: one 32x32 RGB GTSRB training frame per class (the data rule allows two),
each listed in samples/README.md with its source frame, next to the citation; equal to that frame where the real
data is at hand."""

import re

import numpy as np
from PIL import Image

from tests.conftest import NAMES, REAL_DATA, ROOT, SAMPLES, SHARED_DATA


def test_one_cited_real_training_frame_per_class():
    files = sorted(SAMPLES.glob("*.png"))
    assert [int(f.name[:2]) for f in files] == list(range(43))
    readme = (SAMPLES / "README.md").read_text()
    assert "Stallkamp" in readme and "*Neural Networks* 32 (2012)" in readme
    rows = dict(re.findall(r"^\| \[`([^`]+)`\].*\| `(Training/\d{5}/\d{5}_\d{5}\.ppm)` \|$", readme, re.M))
    assert set(rows) == {f.name for f in files}
    for f in files:
        cls = int(f.name[:2])
        assert rows[f.name].startswith(f"Training/{cls:05d}/") and f"| {cls} | {NAMES[str(cls)]} |" in readme
        image = Image.open(f)
        assert image.format == "PNG" and image.size == (32, 32) and image.mode == "RGB"
        if REAL_DATA:
            source = Image.open(SHARED_DATA / "gtsrb" / "GTSRB" / rows[f.name])
            assert np.array_equal(np.asarray(image), np.asarray(source.convert("RGB"))), f.name


def test_make_predict_sends_a_shipped_sign_by_default():
    default = re.search(r"^IMG \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert (ROOT / default).parent == SAMPLES and (ROOT / default).is_file()
