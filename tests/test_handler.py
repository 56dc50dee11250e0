"""The handler without Java: a real ts.context.Context, the shipped model, images made in memory."""

import base64
import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from tests.conftest import MODEL, ROOT
from tests.corpus import SAME_PREDICTION, encode, hostile_bodies, odd_images, png_header_only


def metrics_cache() -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(ROOT / "metrics.yaml"))
    cache.initialize_cache()
    cache.model_name = "gtsrb"  # as TorchServe's model loader sets it
    return cache


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    from gtsrb_handler import GTSRBHandler

    log_dir = tmp_path_factory.mktemp("logs")
    mp = pytest.MonkeyPatch()
    mp.setenv("LOG_LOCATION", str(log_dir))

    model_dir = tmp_path_factory.mktemp("model")
    shutil.copy(MODEL, model_dir / "gtsrb.pt")
    shutil.copy(ROOT / "handler" / "index_to_name.json", model_dir)
    cfg = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    ctx = Context("gtsrb", str(model_dir), {"model": {"serializedFile": "gtsrb.pt"}}, 8, None, "0.12.0",
                  metrics=metrics_cache(), model_yaml_config=cfg)  # fmt: skip
    h = GTSRBHandler()
    h.initialize(ctx)
    h.log_dir = log_dir
    yield h
    mp.undo()


def run(handler, rows):
    """handle() a batch; returns [(status, parsed JSON body)] per request."""
    ctx = Context("gtsrb", "", {}, len(rows), None, "0.12.0", metrics=metrics_cache())
    ctx.request_processor = [RequestProcessor({}) for _ in rows]
    ctx.request_ids = {i: f"request-{i}" for i in range(len(rows))}
    ctx.metrics.set_request_ids(ctx.request_ids)
    out = handler.handle(rows, ctx)
    assert len(out) == len(rows)
    return [(ctx.request_processor[i].get_response_status_code(), json.loads(o)) for i, o in enumerate(out)]


@pytest.fixture(scope="module")
def stop_sign(real_signs) -> Image.Image:
    path = next(p for p, c in real_signs if c == 14)
    return Image.open(path).convert("RGB").resize((96, 96), Image.BICUBIC)


def test_response_is_top5_names_sorted(handler, stop_sign):
    [(status, body)] = run(handler, [{"body": encode(stop_sign, "PNG")}])
    assert status == 200 and len(body) == 5
    probs = list(body.values())
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert next(iter(body)) == "Stop"
    names = json.loads((ROOT / "handler" / "index_to_name.json").read_text()).values()
    assert set(body) <= set(names)


def test_every_input_form_gives_the_same_answer(handler, stop_sign):
    png = encode(stop_sign, "PNG")
    b64 = base64.b64encode(png).decode()
    rows = [
        {"body": png},  # curl -T / --data-binary
        {"data": png},  # curl -F data=@img
        {"file": png},  # multipart with another field name
        {"body": {"data": b64}},  # JSON parsed by TorchServe
        {"body": json.dumps({"data": b64}).encode()},  # JSON left as bytes
        {"body": b64},  # base64 text body
    ]
    results = run(handler, rows)
    assert all(s == 200 for s, _ in results)
    assert all(b == results[0][1] for _, b in results)


def test_real_signs_are_classified(handler, real_signs):
    rows = [{"body": p.read_bytes()} for p, _ in real_signs]  # PPM, as in the dataset
    top1 = [next(iter(b)) for _, b in run(handler, rows)]
    names = json.loads((ROOT / "handler" / "index_to_name.json").read_text())
    assert top1 == [names[str(c)] for _, c in real_signs]


def test_odd_but_valid_images_get_predictions(handler, stop_sign):
    images = odd_images(stop_sign, large=True)
    results = run(handler, [{"body": b} for b in images.values()])
    for (name, _), (status, body) in zip(images.items(), results):
        assert status == 200 and len(body) == 5, (name, body)
    # Colour-preserving encodings of the sign still read as a stop sign (EXIF rotation undone).
    for name, (_, body) in zip(images, results):
        if name in SAME_PREDICTION:
            assert next(iter(body)) == "Stop", name


BAD = {
    "empty body": ({"body": b""}, 400, "EmptyInput"),
    "no fields": ({}, 400, "InvalidInput"),
    "text": ({"body": "hello, world"}, 400, "InvalidBase64"),
    "random bytes": ({"body": bytes(range(256)) * 4}, 400, "InvalidImage"),
    "bad base64 in json": ({"body": {"data": "%%%not base64%%%"}}, 400, "InvalidBase64"),
    "json without data": ({"body": {"image": "abc"}}, 400, "InvalidJSON"),
    "broken json": ({"body": b'{"data": "abc'}, 400, "InvalidJSON"),
    "svg": ({"body": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'}, 400, "InvalidImage"),
    "pdf": ({"body": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"}, 400, "InvalidImage"),
}


def test_hostile_bodies_get_their_4xx(handler, stop_sign):
    corpus = hostile_bodies(stop_sign)
    results = run(handler, [{"body": body} for body, _, _ in corpus.values()])
    for (name, (_, status, kind)), (got, body) in zip(corpus.items(), results):
        assert (got, body["code"], body["type"]) == (status, status, kind), (name, body)


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_4xx_json(handler, name):
    row, status, kind = BAD[name]
    [(got, body)] = run(handler, [row])
    assert (got, body["code"], body["type"]) == (status, status, kind), body
    assert body["message"]


def test_truncated_and_bomb_images(handler, stop_sign):
    png, jpg = encode(stop_sign, "PNG"), encode(stop_sign, "JPEG")
    bomb = png_header_only(60000, 60000)
    results = run(handler, [{"body": png[: len(png) // 2]}, {"body": jpg[: len(jpg) // 2]}, {"body": bomb}])
    assert [(s, b["type"]) for s, b in results] == [
        (400, "InvalidImage"),
        (400, "InvalidImage"),
        (413, "ImageTooLarge"),
    ]
    assert "too large" in results[2][1]["message"]


def test_bad_request_in_a_batch_fails_alone(handler, stop_sign):
    good = {"body": encode(stop_sign, "PNG")}
    rows = [good, {"body": b"garbage"}, good, {"body": b""}, good]
    results = run(handler, rows)
    assert [s for s, _ in results] == [200, 400, 200, 400, 200]
    assert results[0][1] == results[2][1] == results[4][1]


def test_handler_preprocessing_is_the_training_preprocessing(handler, real_signs, tmp_path):
    """The same image gives the same tensor through the served handler and the training data loader."""
    from training import data as gdata

    # A GTSRB-layout tree holding real sign images at a size the served path must resize.
    folder = tmp_path / "gtsrb" / "GTSRB" / "Training" / "00000"
    folder.mkdir(parents=True)
    files = []
    for i, (path, _) in enumerate(real_signs):
        img = Image.open(path).resize((50 + 7 * i, 40 + 5 * i), Image.BICUBIC)
        files.append(folder / f"00000_{i:05d}.ppm")
        img.save(files[-1])
    trained = gdata.load_tensors(gdata.gtsrb(str(tmp_path), "train"))["images"]
    batch = handler.preprocess([{"body": f.read_bytes()} for f in files])
    assert not batch["errors"]
    served = batch["images"]
    assert served.shape == trained.shape == (len(files), 3, 32, 32)
    assert torch.equal(served, trained)


def test_metrics_count_outcomes_classes_and_confidence(handler, stop_sign, caplog):
    good = {"body": encode(stop_sign, "PNG")}
    blank = {"body": encode(Image.new("RGB", (32, 32), (128, 128, 128)), "PNG")}  # no sign: low confidence
    with caplog.at_level("INFO"):
        results = run(handler, [good, {"body": b"junk"}, good, blank, {"body": png_header_only(60000, 60000)}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]GTSRB")]
    text = "\n".join(lines)
    assert "[METRICS]GTSRBRequests.Count:3|#ModelName:gtsrb,Outcome:predicted" in text
    assert "[METRICS]GTSRBRequests.Count:1|#ModelName:gtsrb,Outcome:bad_input" in text
    assert "[METRICS]GTSRBRequests.Count:1|#ModelName:gtsrb,Outcome:too_large" in text
    assert "GTSRBPredictedClass.Count:2|#ModelName:gtsrb,ClassName:Stop" in text
    assert sum(int(x.split(":")[1].split("|")[0]) for x in lines if x.startswith("[METRICS]GTSRBConfidence")) == 3
    low = [x for x in lines if x.startswith("[METRICS]GTSRBLowConfidence")]
    blank_p = next(iter(results[3][1].values()))
    assert bool(low) == (blank_p < 0.5)
    assert any(x.startswith("[METRICS]GTSRBPreprocessTime.Milliseconds:") for x in lines)
    assert any(x.startswith("[METRICS]GTSRBInferenceTime.Milliseconds:") for x in lines)


def test_input_statistics_are_logged_never_images(handler, stop_sign):
    log = handler.log_dir / "gtsrb_inputs.jsonl"
    before = log.read_text().splitlines() if log.exists() else []
    run(handler, [{"body": encode(stop_sign, "PNG")}, {"body": b"junk"}])
    new = log.read_text().splitlines()[len(before) :]
    assert len(new) == 1
    row = json.loads(new[0])
    assert (row["w"], row["h"]) == stop_sign.size and len(row["stats"]) == 7
    assert row["class"] == 14 and 0 < row["p"] <= 1
