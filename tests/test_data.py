import torch

from tests.conftest import REAL_DATA
from training import data as gdata


def test_loader_reads_gtsrb_layout(tmp_path):
    gdata.make_synthetic(tmp_path, tracks_per_class=2, frames=3, test_per_class=1)
    train = gdata.load_tensors(gdata.gtsrb(str(tmp_path), "train"))
    assert train["images"].shape == (43 * 2 * 3, 3, 32, 32) and train["images"].dtype == torch.uint8
    assert torch.equal(torch.bincount(train["labels"]), torch.full((43,), 6))
    assert set(train["tracks"].tolist()) == {0, 1}
    test = gdata.load_tensors(gdata.gtsrb(str(tmp_path), "test"))
    assert len(test["labels"]) == 43 and (test["tracks"] == -1).all()


def _assert_split_by_track(labels, tracks, val_fraction):
    tr, va = gdata.track_split(labels, tracks, val_fraction, seed=0)
    assert len(tr) + len(va) == len(labels) and not set(tr.tolist()) & set(va.tolist())
    key = lambda idx: set(zip(labels[idx].tolist(), tracks[idx].tolist()))  # noqa: E731
    assert not key(tr) & key(va), "a track is on both sides of the split"
    assert set(labels[tr].tolist()) == set(labels[va].tolist()) == set(range(43)), "every class on both sides"
    return len(va) / len(labels)


def test_track_split_on_synthetic(tmp_path):
    gdata.make_synthetic(tmp_path, tracks_per_class=4, frames=2, test_per_class=0)
    d = gdata.load_tensors(gdata.gtsrb(str(tmp_path), "train"))
    _assert_split_by_track(d["labels"], d["tracks"], 0.25)


def test_track_split_on_the_gtsrb_tree(gtsrb_root):
    """The real split where ../shared/data exists (all of it is read), else the tests' synthetic one (6 tracks a
    class)."""
    ds = gdata.gtsrb(str(gtsrb_root), "train")
    if REAL_DATA:
        assert len(ds) == 39209
    labels = torch.tensor([c for _, c in ds._samples])
    tracks = torch.tensor([gdata.track_of(p) for p, _ in ds._samples])
    assert 0.10 < _assert_split_by_track(labels, tracks, 0.15) < 0.20


def test_fingerprint_sees_changed_files(tmp_path):
    gdata.make_synthetic(tmp_path, tracks_per_class=1, frames=1, test_per_class=0)
    paths = [p for p, _ in gdata.gtsrb(str(tmp_path), "train")._samples]
    before = gdata.fingerprint(paths)
    with open(paths[0], "ab") as f:
        f.write(b"\0")
    assert gdata.fingerprint(paths) != before
