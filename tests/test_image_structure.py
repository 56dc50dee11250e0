"""The structure checks without TorchServe: what real encoders write passes, each bomb family is refused with a
413 at one unit over its limit and accepted at the limit, and the JPEG scan count is exact."""

import io

import image_structure as s
import numpy as np
import pytest
import yaml
from image_input import InputError, decode_image
from PIL import Image

from bench import bombs
from tests.conftest import ROOT
from tests.corpus import encode

HANDLER = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
MAX_PIXELS, MAX_BYTES = HANDLER["max_pixels"], HANDLER["max_bytes"]
SIGN = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))


def status(data: bytes) -> tuple[int, str]:
    try:
        decode_image(data, max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES, draft_size=64)
    except InputError as e:
        return e.status, e.kind
    return 200, ""


def scans(data: bytes) -> int:
    return sum(marker == 0xDA for marker, _, _ in s.jpeg_markers(data))


def real_encodings() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    icc = b"\0" * 200_000  # a large ICC profile: Pillow splits it over 4 APP2 segments
    frames = [SIGN, SIGN.rotate(30), SIGN.rotate(60)]
    png_text = {"comment": "x" * 100, "Software": "gimp"}
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in png_text.items():
        info.add_text(k, v, zip=k == "comment")
    return {
        "progressive RGB jpeg": encode(SIGN, "JPEG", progressive=True),
        "progressive grayscale jpeg": encode(SIGN.convert("L"), "JPEG", progressive=True),
        "progressive CMYK jpeg": encode(SIGN.convert("CMYK"), "JPEG", progressive=True),
        "jpeg with EXIF, ICC, restart markers": encode(SIGN, "JPEG", exif=exif, icc_profile=icc, restart_marker_rows=1),
        "optimized jpeg": encode(SIGN, "JPEG", optimize=True, quality=95, subsampling=0),
        "png with text": encode(SIGN, "PNG", pnginfo=info),
        "animated png": encode(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "animated gif with a comment": encode(
            frames[0].convert("P"), "GIF", save_all=True, append_images=frames[1:], comment=b"a sign " * 100, loop=0
        ),  # fmt: skip
        "bmp": encode(SIGN, "BMP"),
        "ppm": encode(SIGN, "PPM"),
        "16-bit pgm": encode(Image.fromarray(np.full((8, 8), 4000, np.uint16)), "PPM"),
        "ppm with a comment": b"P6\n# made by hand\n2 1\n255\n" + bytes(6),
        "webp": encode(SIGN, "WEBP"),
    }


@pytest.mark.parametrize("name, data", real_encodings().items())
def test_what_real_encoders_write_passes(name, data):
    assert s.problem(data) is None and status(data) == (200, ""), name


def test_libjpeg_progressive_scripts_fit_the_scan_limit():
    """libjpeg writes 10 scans for colour, 6 for grayscale, 18 for CMYK: all under the limit."""
    counts = {mode: scans(encode(SIGN.convert(mode), "JPEG", progressive=True)) for mode in ("RGB", "L", "CMYK")}
    assert counts == {"RGB": 10, "L": 6, "CMYK": 18} and max(counts.values()) <= s.MAX_JPEG_SCANS


def test_scans_inside_metadata_are_not_counted():
    """An APPn segment may hold a whole JPEG (an EXIF thumbnail): its FF DA bytes are not scans of the image."""
    thumbnail = encode(SIGN, "JPEG", progressive=True) * 3  # 30 "scans" inside one segment
    main = encode(SIGN, "JPEG", progressive=True)
    data = main[:2] + b"\xff\xe1" + (2 + len(thumbnail)).to_bytes(2, "big") + thumbnail + main[2:]
    assert data.count(b"\xff\xda") == 40 and scans(data) == 10
    assert status(data) == (200, "")


def test_restart_markers_and_stuffed_bytes_are_not_markers():
    data = encode(SIGN, "JPEG", restart_marker_blocks=1, quality=100)
    assert data.count(b"\xff\xd0") > 0 and data.count(b"\xff\x00") > 0
    markers = [m for m, _, _ in s.jpeg_markers(data)]
    assert markers.count(0xDA) == 1 and not any(0xD0 <= m <= 0xD7 for m in markers) and markers[-1] == 0xD9


def progressive_base_scans() -> int:
    return scans(bombs.progressive_jpeg_scans(0, side=64))


# family -> (builder of n units, the largest n accepted)
FAMILIES = {
    "progressive JPEG, repeated scans": (
        lambda n: bombs.progressive_jpeg_scans(n, side=64),
        s.MAX_JPEG_SCANS - progressive_base_scans(),
    ),
    "JPEG APPn flood": (bombs.jpeg_segment_flood, s.MAX_JPEG_SEGMENTS - 8),  # SOI-less count: APP0, 2 DQT, SOF, 4 DHT
    "JPEG DQT flood": (bombs.jpeg_dqt_flood, s.MAX_JPEG_SEGMENTS - 8),
    "JPEG junk between segments": (bombs.jpeg_junk, s.MAX_JPEG_JUNK),
    "PNG empty chunks": (bombs.png_empty_chunks, s.MAX_PNG_CHUNKS - 3),  # IHDR, IDAT, IEND
    "PNG empty IDAT chunks": (bombs.png_split_idat, s.MAX_PNG_CHUNKS - 3),
    "PNG zTXt chunks": (lambda n: bombs.png_ztxt(n, mb=0.01), s.MAX_PNG_TEXT_CHUNKS),
    "GIF 1-byte sub-blocks": (bombs.gif_subblocks, s.MAX_GIF_BLOCKS - 1),  # and the comment's terminator
    "PPM header whitespace": (bombs.ppm_header_whitespace, s.MAX_PNM_HEADER_BYTES - 12),  # and 12 bytes of header
    "PNG EXIF entries": (bombs.png_exif, (s.MAX_EXIF_BYTES - 20) // 12),  # "Exif\0\0", TIFF header, count, next
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_bomb_family_is_refused_one_unit_over_its_limit(family):
    make, accepted = FAMILIES[family]
    assert status(make(accepted)) == (200, ""), family
    assert status(make(accepted + 1)) == (413, "ImageTooComplex"), family


@pytest.mark.parametrize(
    "name, data",
    [
        ("BMP run-length over 1 MiB", bombs.bmp_rle_runs(600_000)),
        ("plain PPM", bombs.plain_ppm(30)),
        ("PPM maxval 254", bombs.ppm_maxval(30)),
        ("RGB PPM maxval 65535", b"P6 1 1 65535\n" + bytes(6)),
        ("WebP EXIF over 64 KiB", bombs.webp_exif(6000)),
    ],
)
def test_variants_decoded_in_python_are_refused(name, data):
    assert status(data) == (413, "ImageTooComplex"), name


def test_small_run_length_bmp_passes():
    assert status(bombs.bmp_rle_runs(10_000)) == (200, "")


def test_tiff_is_not_decoded():
    assert status(bombs.tiff_strips(10)) == (400, "InvalidImage")
    assert status(encode(SIGN, "TIFF")) == (400, "InvalidImage")


def test_body_over_max_bytes_is_refused_before_anything_else():
    data = encode(SIGN, "PNG") + b"\0" * MAX_BYTES
    assert status(data) == (413, "ImageTooLarge")


def test_truncated_and_damaged_structures_are_left_to_the_decoder():
    """A walk that runs off the end raises nothing: the decoder reports the damage (a 400), or decodes what is
    there (the first frame of an animation may be whole)."""
    for data in real_encodings().values():
        for cut in (3, 9, 14, 30, len(data) // 2):
            s.problem(data[:cut])
            assert status(data[:cut])[0] in (200, 400, 413)
    assert s.problem(b"\xff\xd8\xff") is None and s.problem(b"GIF89a") is None and s.problem(b"P6") is None


def test_body_limit_is_the_frontends():
    """handler.max_bytes (the handler's 413) and config.properties' max_request_size (the frontend's) agree."""
    props = dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines() if "=" in line)
    assert int(props["max_request_size"]) == MAX_BYTES


def test_a_large_photo_fits_the_body_limit():
    """A 2048x2048 photo-like image (sensor noise over gradients) as a quality-95 JPEG fits."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:2048, 0:2048]
    img = np.stack([xx // 8, yy // 8, (xx + yy) // 16], -1) + rng.normal(0, 6, (2048, 2048, 3))
    data = encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), "JPEG", quality=95)
    assert len(data) < MAX_BYTES and status(data) == (200, "")
    assert Image.open(io.BytesIO(data)).size == (2048, 2048)
