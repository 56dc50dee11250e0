"""The handler without Java: a real ts.context.Context, the shipped model, images made in memory."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from serving_metrics import input_log_path

from handler.presets import EvalPreset
from tests.conftest import MODEL, NAMES, ROOT
from tests.corpus import SAME_PREDICTION, encode, hostile_bodies, odd_images, png_header_only
from tests.handler_harness import CONFIG, MODEL_VERSION, batch_context, make_handler, run


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOG_LOCATION", str(log_dir))
        h = make_handler(tmp_path_factory.mktemp("model"))
        h.log_dir = log_dir
        yield h


def test_response_is_top5_names_sorted(handler, stop_sign, stop_answer):
    [(status, body)] = run(handler, [{"body": encode(stop_sign, "PNG")}])
    assert status == 200 and len(body) == 5
    probs = list(body.values())
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert next(iter(body)) == stop_answer
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
        {"body": b64.encode()},  # base64 text body, as TorchServe passes it (its text decoding is off)
        {"body": b64},  # base64 text body, decoded to str
    ]
    results = run(handler, rows)
    assert all(s == 200 for s, _ in results)
    assert all(b == results[0][1] for _, b in results)


def test_served_answers_are_the_models_in_process(handler, signs):
    """The handler's top 5 are the shipped model's own, probabilities included (no data set needed)."""
    from training import export

    model, preset = export.load(MODEL), EvalPreset()
    for (path, _), (status, body) in zip(signs, run(handler, [{"body": p.read_bytes()} for p, _ in signs])):
        with torch.inference_mode():
            top = torch.topk(torch.softmax(model(preset(Image.open(path))[None]), 1)[0], 5)
        assert status == 200 and list(body) == [NAMES[str(i)] for i in top.indices.tolist()], path.name
        assert list(body.values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_real_signs_are_classified(handler, real_signs):
    rows = [{"body": p.read_bytes()} for p, _ in real_signs]  # PPM, as in the dataset
    top1 = [next(iter(b)) for _, b in run(handler, rows)]
    names = json.loads((ROOT / "handler" / "index_to_name.json").read_text())
    assert top1 == [names[str(c)] for _, c in real_signs]


def test_odd_but_valid_images_get_predictions(handler, stop_sign, stop_answer):
    images = odd_images(stop_sign, large=True)
    results = run(handler, [{"body": b} for b in images.values()])
    for (name, _), (status, body) in zip(images.items(), results):
        assert status == 200 and len(body) == 5, (name, body)
    # Colour-preserving encodings of the sign still get its answer (EXIF rotation undone).
    for name, (_, body) in zip(images, results):
        if name in SAME_PREDICTION:
            assert next(iter(body)) == stop_answer, name


# Rows as TorchServe hands them over after decoding (raw bodies are corpus.hostile_bodies).
BAD = {
    "no fields": ({}, 400, "InvalidInput"),
    "text": ({"body": "hello, world"}, 400, "InvalidBase64"),
    "bad base64 in json": ({"body": {"data": "%%%not base64%%%"}}, 400, "InvalidBase64"),
    "json without data": ({"body": {"image": "abc"}}, 400, "InvalidJSON"),
}


def test_hostile_bodies_get_their_4xx(handler, stop_sign):
    corpus = hostile_bodies(stop_sign)
    results = run(handler, [{"body": body} for body, _, _ in corpus.values()])
    for (name, (_, status, kind)), (got, body) in zip(corpus.items(), results):
        assert (got, body["code"], body["type"]) == (status, status, kind), (name, body)
        assert body["message"], name


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


def test_handler_preprocessing_is_the_training_preprocessing(handler, signs, tmp_path):
    """The same image gives the same tensor through the served handler and the training data loader."""
    from training import data as gdata

    # A GTSRB-layout tree holding sign images at a size the served path must resize.
    folder = tmp_path / "gtsrb" / "GTSRB" / "Training" / "00000"
    folder.mkdir(parents=True)
    files = []
    for i, (path, _) in enumerate(signs):
        img = Image.open(path).resize((50 + 7 * i, 40 + 5 * i), Image.BICUBIC)
        files.append(folder / f"00000_{i:05d}.ppm")
        img.save(files[-1])
    trained = gdata.load_tensors(gdata.gtsrb(str(tmp_path), "train"))["images"]
    handler.context = batch_context(len(files))
    batch = handler.preprocess([{"body": f.read_bytes()} for f in files])
    assert not batch["errors"]
    served = batch["images"]
    assert served.shape == trained.shape == (len(files), 3, 32, 32)
    assert torch.equal(served, trained)


def test_metrics_count_outcomes_classes_and_confidence(handler, stop_sign, stop_answer, caplog):
    good = {"body": encode(stop_sign, "PNG")}
    blank = {"body": encode(Image.new("RGB", (32, 32), (128, 128, 128)), "PNG")}  # no sign: low confidence
    with caplog.at_level("INFO"):
        results = run(handler, [good, {"body": b"junk"}, good, blank, {"body": png_header_only(60000, 60000)}])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[METRICS]GTSRB")]
    text = "\n".join(lines)
    assert "[METRICS]GTSRBRequests.Count:3|#ModelName:gtsrb,Outcome:predicted" in text
    assert "[METRICS]GTSRBRequests.Count:1|#ModelName:gtsrb,Outcome:bad_input" in text
    assert "[METRICS]GTSRBRequests.Count:1|#ModelName:gtsrb,Outcome:too_large" in text
    assert f"GTSRBPredictedClass.Count:2|#ModelName:gtsrb,ClassName:{stop_answer}" in text
    assert sum(int(x.split(":")[1].split("|")[0]) for x in lines if x.startswith("[METRICS]GTSRBConfidence")) == 3
    low = [x for x in lines if x.startswith("[METRICS]GTSRBLowConfidence")]
    blank_p = next(iter(results[3][1].values()))
    assert bool(low) == (blank_p < 0.5)
    assert any(x.startswith("[METRICS]GTSRBPreprocessTime.Milliseconds:") for x in lines)
    assert any(x.startswith("[METRICS]GTSRBInferenceTime.Milliseconds:") for x in lines)


def test_input_statistics_are_logged_never_images(handler, stop_sign, stop_answer):
    log = input_log_path(handler.log_dir)  # this process's file
    before = log.read_text().splitlines() if log.exists() else []
    run(handler, [{"body": encode(stop_sign, "PNG")}, {"body": b"junk"}])
    new = log.read_text().splitlines()[len(before) :]
    assert len(new) == 1
    row = json.loads(new[0])
    assert (row["w"], row["h"]) == stop_sign.size and len(row["stats"]) == 7
    assert NAMES[str(row["class"])] == stop_answer and 0 < row["p"] <= 1
    assert row["model_version"] == MODEL_VERSION  # the archive's version, from TorchServe's manifest


def test_answer_does_not_depend_on_the_batch_it_was_served_in(handler, stop_sign):
    """Alone or in a full batch (other convolution kernels, channels-last layout): the client cannot tell."""
    png = {"body": encode(stop_sign, "PNG")}
    [(_, alone)] = run(handler, [png])
    for status, body in run(handler, [png] * 8):
        assert status == 200 and list(body) == list(alone)
        assert list(body.values()) == pytest.approx(list(alone.values()), abs=1e-5)


def test_monitoring_is_written_by_the_background_thread(handler, stop_sign):
    """Without any flush from the request path, the input log row appears within the monitor interval."""
    import time

    log = input_log_path(handler.log_dir)  # this process's file
    before = len(log.read_text().splitlines()) if log.exists() else 0
    ctx = batch_context(1)
    handler.handle([{"body": encode(stop_sign, "PNG")}], ctx)  # what the worker does: no flush
    deadline = time.monotonic() + 10 * CONFIG["handler"]["monitor_interval_s"]
    while (len(log.read_text().splitlines()) if log.exists() else 0) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(log.read_text().splitlines()) == before + 1


# ---- size limits and formats: what a request may cost


MAX_PIXELS = CONFIG["handler"]["max_pixels"]


def test_size_limit_counts_the_pixels_decoded(handler):
    """PNG up to the limit passes; one pixel row more is a 413 before decoding. A baseline JPEG decodes at
    1/8 scale, so a 24 MP phone photo passes; a progressive one holds the whole image, so it counts whole."""
    side = int(MAX_PIXELS**0.5)
    gray = Image.new("L", (side, side), 90)
    rows = [
        {"body": encode(gray, "PNG")},
        {"body": encode(gray.resize((side, side + 1)), "PNG")},
        {"body": encode(Image.new("RGB", (6000, 4000), (200, 30, 30)), "JPEG")},
        {"body": encode(Image.new("RGB", (side, side + 1), (200, 30, 30)), "JPEG", progressive=True)},
        {"body": encode(Image.new("RGB", (1000, 1000), (200, 30, 30)), "JPEG", progressive=True)},
    ]
    results = run(handler, rows)
    assert [s for s, _ in results] == [200, 413, 200, 413, 200]
    assert "progressive" in results[3][1]["message"]


def test_only_the_listed_formats_are_decoded(handler, stop_sign):
    """Formats Pillow could open but the README does not list (EPS would start Ghostscript) are refused."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\n"
    others = {fmt: encode(stop_sign, fmt) for fmt in ("ICO", "TGA", "PCX", "SGI", "DDS", "QOI")}
    results = run(handler, [{"body": eps}] + [{"body": b} for b in others.values()])
    assert [(s, b["type"]) for s, b in results] == [(400, "InvalidImage")] * (len(others) + 1)


def smooth_image(mode: str, size: tuple[int, int]) -> Image.Image:
    """A large image with structure at every scale the model sees (gradients and blocks)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, ((xx // 97 + yy // 61) % 2) * 200], -1).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "I;16", "1"])
def test_large_images_reach_the_model_as_they_would_at_full_size(mode):
    """Large images are box-reduced before their mode conversions (to bound memory); the 32x32 the model
    sees stays what a full-size conversion would give (within 2 levels on average)."""
    from image_input import decode_image
    from presets import EvalPreset

    img = smooth_image(mode, (2000, 1500))
    data = encode(img, "PNG")
    served = EvalPreset()(decode_image(data, max_pixels=MAX_PIXELS, draft_size=64)).float()
    full = Image.open(io.BytesIO(data))
    if mode == "I;16":
        full = Image.fromarray((np.asarray(full) // 257).astype(np.uint8))
    reference = EvalPreset()(full.convert("RGB")).float()
    assert (served - reference).abs().mean() < 2.0


def test_exif_orientation_of_a_large_image_is_applied():
    from image_input import decode_image

    img = smooth_image("RGB", (2048, 1024))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: turn 90 degrees clockwise to show
    decoded = decode_image(encode(img, "PNG", exif=exif), max_pixels=MAX_PIXELS, draft_size=64)
    upright = img.transpose(Image.Transpose.ROTATE_270).resize(decoded.size, Image.Resampling.BOX)
    assert decoded.size[1] > decoded.size[0]
    assert np.abs(np.asarray(decoded, dtype=float) - np.asarray(upright, dtype=float)).mean() < 2.0


# ---- explanations


def test_explanations_are_answered_per_request(handler, stop_sign, stop_answer):
    """/explanations and /predictions requests can share a batch (BaseHandler would treat every request
    as request 0 is): each gets its own kind of answer, a bad one its 4xx."""
    good = {"body": encode(stop_sign, "PNG")}
    results = run(handler, [good, good, {"body": b"junk"}, good], explain={1, 2, 3})
    (s0, prediction), (s1, explanation), (s2, error), (s3, explanation3) = results
    assert (s0, s1, s2, s3) == (200, 200, 400, 200) and error["type"] == "InvalidImage"
    assert next(iter(prediction)) == stop_answer and len(prediction) == 5
    assert set(explanation) == {"class", "probability", "saliency"}
    assert explanation["class"] == stop_answer
    assert explanation["probability"] == pytest.approx(prediction[stop_answer])
    saliency = np.array(explanation["saliency"])
    assert saliency.shape == (32, 32) and saliency.min() >= 0 and saliency.max() == 1
    assert explanation3 == explanation
    results = run(handler, [good, good], explain={0})
    assert "saliency" in results[0][1] and next(iter(results[1][1])) == stop_answer


def test_saliency_is_integrated_gradients_as_captum_computes_it(handler):
    """Our few lines against captum's IntegratedGradients on the shipped model: the same attributions; and
    with the served number of steps they add up to the logit's change from the black baseline."""
    from captum.attr import IntegratedGradients
    from saliency import integrated_gradients

    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    targets = [0, 14, 42]
    black = torch.zeros(3, 1, 1)
    steps = CONFIG["handler"]["explain_steps"]
    ours = integrated_gradients(handler.model, images, targets, baseline=black, steps=steps)
    theirs = IntegratedGradients(handler.model).attribute(
        images.float(), baselines=0.0, target=targets, n_steps=steps, method="gausslegendre"
    )
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-6 * theirs.abs().max().item())
    with torch.no_grad():
        change = handler.model(images.float())[range(3), targets] - handler.model(torch.zeros(1, 3, 32, 32))[0, targets]
    assert torch.allclose(ours.sum((1, 2, 3)), change, rtol=0.15)
