"""Odd-but-valid images and hostile bodies, shared by the handler unit tests and the end-to-end tests."""

import io
import struct
import zipfile
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def odd_images(sign: Image.Image, *, large: bool = False) -> dict[str, bytes]:
    """Valid images in every mode and container the handler must accept (a prediction each)."""
    gray16 = Image.fromarray(np.asarray(sign.convert("L"), dtype=np.uint16) * 257)
    rgba = sign.convert("RGBA")
    rgba.putalpha(Image.new("L", sign.size, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    frames = [sign, sign.rotate(30)]
    images = {
        "L png": encode(sign.convert("L"), "PNG"),
        "LA png": encode(sign.convert("LA"), "PNG"),
        "P png": encode(sign.convert("P"), "PNG"),
        "P transparent gif": encode(sign.convert("P"), "GIF", transparency=0),
        "RGBA png": encode(rgba, "PNG"),
        "1-bit bmp": encode(sign.convert("1"), "BMP"),
        "16-bit png": encode(gray16, "PNG"),
        "CMYK jpeg": encode(sign.convert("CMYK"), "JPEG"),
        "EXIF-rotated jpeg": encode(sign.rotate(90, expand=True), "JPEG", exif=exif),
        "animated gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "webp": encode(sign, "WEBP"),
        "ppm": encode(sign, "PPM"),
        "1x1": encode(sign.resize((1, 1)), "PNG"),
        "1000x8": encode(sign.resize((1000, 8)), "PNG"),
        "16-bit pgm": encode(gray16, "PPM"),
        "float pfm": encode(Image.fromarray(np.asarray(sign.convert("L"), dtype=np.float32)), "PPM"),
    }
    if large:
        images["4000x3000 jpeg"] = encode(sign.resize((4000, 3000), Image.BILINEAR), "JPEG", quality=90)
    return images


# Colour-preserving encodings of a sign: the prediction must not change.
SAME_PREDICTION = ("RGBA png", "CMYK jpeg", "EXIF-rotated jpeg", "webp", "ppm", "4000x3000 jpeg")


def hostile_bodies(sign: Image.Image) -> dict[str, tuple[bytes, int, str]]:
    """name -> (raw body, expected status, expected error type) for bodies sent as image bytes."""
    png, jpg = encode(sign, "PNG"), encode(sign, "JPEG")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("sign.png", png)
    return {
        "empty body": (b"", 400, "EmptyInput"),
        "text": (b"hello, this is not an image", 400, "InvalidImage"),
        "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)), 400, "InvalidImage"),
        "truncated png": (png[: len(png) // 2], 400, "InvalidImage"),
        "truncated jpeg": (jpg[: len(jpg) // 2], 400, "InvalidImage"),
        "png header claiming 60000x60000": (png_header_only(60000, 60000), 413, "ImageTooLarge"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 400, "InvalidImage"),
        "pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 400, "InvalidImage"),
        "zip": (zipped.getvalue(), 400, "InvalidImage"),
        "broken json": (b'{"data": "abc', 400, "InvalidJSON"),
        "json without data": (b'{"image": "abc"}', 400, "InvalidJSON"),
        "json with bad base64": (b'{"data": "%%%not base64%%%"}', 400, "InvalidBase64"),
        "json list": (b"[1, 2, 3]", 400, "InvalidJSON"),
    }
