"""Fuzz the decode path: any bytes give an image or an InputError (a 4xx), never another exception."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.corpus import encode

image_input = pytest.importorskip("image_input")
presets = pytest.importorskip("presets")

_rng = np.random.default_rng(0)
_SIGN = Image.fromarray(_rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
SEEDS = [encode(_SIGN, fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")]
SEEDS.append(encode(_SIGN, "JPEG", progressive=True))  # the JPEG marker walk in image_input
PRESET = presets.EvalPreset()


def decode_or_input_error(data: bytes) -> None:
    try:
        img = image_input.decode_image(image_input.request_bytes({"body": data}), max_pixels=4_000_000, draft_size=64)
    except image_input.InputError as e:
        assert e.status in (400, 413) and str(e)
        return
    assert PRESET(img).shape == (3, 32, 32)


@st.composite
def mutated_images(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[max(1, pos) :]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos : pos + len(chunk)] = chunk
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(mutated_images())
def test_mutated_images(data):
    decode_or_input_error(data)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=512))
def test_arbitrary_bytes(data):
    decode_or_input_error(data)


def test_seeds_decode():
    for seed in SEEDS:
        assert Image.open(io.BytesIO(seed)).size == (24, 24)
        decode_or_input_error(seed)
