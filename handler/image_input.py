"""Request -> PIL image, or an ``InputError`` that says what was wrong (HTTP 400 or 413).

Plain functions, no TorchServe: the handler calls them per request, the tests call them directly.
Whatever a client sends, each function returns or raises ``InputError``; nothing the client controls
ever goes into an HTTP header (``InputError.phrase`` is fixed text). Copied into the model archive as
a top-level module.
"""

import base64
import binascii
import io
import json
import logging
import warnings
from http import HTTPStatus

import image_structure
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# The formats the README lists; Image.open tries no other plugin (no EPS/Ghostscript, JPEG 2000, PSD, ...).
# Not TIFF: no camera or browser sends it, and its strips, tiles and directories are each a Python step in Pillow.
FORMATS = ("PNG", "JPEG", "PPM", "BMP", "WEBP", "GIF")
# A JSON request is {"data": "<base64 image>"}: a few strings, one object. Bodies with more of the tokens
# below are refused before parsing, so that 16 MiB of "[[],[],..." cannot cost 400 MB of Python objects.
MAX_JSON_TOKENS = 64


class InputError(ValueError):
    def __init__(self, message: str, *, status: int = 400, kind: str = "InvalidInput") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase: fixed ASCII text per status, never client bytes."""
        return HTTPStatus(self.status).phrase

    def as_response(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": str(self)}


def as_input_error(e: Exception) -> InputError:
    """Any failure to read one request becomes that request's 4xx (an unforeseen one is logged)."""
    if isinstance(e, InputError):
        return e
    if isinstance(e, MemoryError):
        return InputError("image too large to decode", status=413, kind="ImageTooLarge")
    log.warning("unexpected %s while reading a request", type(e).__name__, exc_info=True)
    return InputError(f"cannot read this request as an image ({type(e).__name__})")


def _name(key: object) -> str:
    """A client's field name, quoted, ASCII and short enough for an error message."""
    text = ascii(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse_json(value: bytes) -> object:
    tokens = sum(value.count(c) for c in (b"{", b"[", b",", b'"'))
    if tokens > MAX_JSON_TOKENS:
        raise InputError(
            f'JSON body with {tokens} brackets, commas and quotes: send {{"data": "<base64 image>"}}',
            kind="InvalidJSON",
        )
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, a 5,000-digit number
        raise InputError(f"body looks like JSON but does not parse: {e}", kind="InvalidJSON") from None


def request_bytes(row: object) -> bytes:
    """The image bytes of one TorchServe request row.

    Raw body (``curl -T``, ``--data-binary``) arrives as ``body``; multipart as the form field's name
    (``data`` by convention, any single field accepted); JSON ``{"data": "<base64>"}`` as bytes (the
    handler turns TorchServe's own JSON decoding off) or, in tests, already parsed.
    """
    try:
        return _request_bytes(row)
    except Exception as e:
        raise as_input_error(e) from None


def _request_bytes(row: object) -> bytes:
    if not isinstance(row, dict) or not row:
        raise InputError('empty request: send an image as the body, a multipart field, or JSON {"data": base64}')
    value = row.get("data", row.get("body"))
    if value is None:
        if len(row) != 1:
            shown = ", ".join(_name(k) for k in list(row)[:3]) + (", ..." if len(row) > 3 else "")
            raise InputError(f"{len(row)} form fields ({shown}): send the image in one field named 'data'")
        value = next(iter(row.values()))
    if isinstance(value, bytearray):
        value = bytes(value)
    if isinstance(value, bytes) and value[:64].lstrip()[:1] in (b"{", b"["):
        value = _parse_json(value)  # a JSON body, or one sent without its content type
    elif isinstance(value, bytes) and value.isascii():  # base64 text (TorchServe's text decoding is off)
        try:
            value = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            pass  # other text: the image decoder says what it is not (a plain PPM is ASCII too)
    if isinstance(value, dict):
        if "data" not in value:
            raise InputError('JSON body has no \'data\' field: send {"data": "<base64 image>"}', kind="InvalidJSON")
        value = value["data"]
    if isinstance(value, list):
        raise InputError('JSON list given: send one image per request, {"data": "<base64 image>"}', kind="InvalidJSON")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise InputError("text is neither an image nor valid base64", kind="InvalidBase64") from None
    if not isinstance(value, bytes):
        raise InputError(f"unsupported input of type {type(value).__name__}", kind="InvalidJSON")
    if not value:
        raise InputError("empty body: no image bytes received", kind="EmptyInput")
    return value


# ---- decoding


def _too_large(message: str) -> InputError:
    return InputError(f"image too large: {message}", status=413, kind="ImageTooLarge")


def _too_complex(message: str) -> InputError:
    return InputError(f"image too costly to decode: {message}", status=413, kind="ImageTooComplex")


def _open(data: bytes, max_pixels: int, max_bytes: int | None, draft_size: int | None) -> Image.Image:
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_large(f"{len(data)} bytes, limit {max_bytes}")
    if why := image_structure.problem(data):
        raise _too_complex(why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise _too_large(str(e)) from None
    except Exception:  # Pillow raises assorted errors on unknown formats and malformed headers
        raise InputError(
            f"not an image in a supported format ({', '.join(FORMATS)}), or its header is damaged",
            kind="InvalidImage",
        ) from None
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError(f"image has no pixels ({w}x{h})", kind="InvalidImage")
    if img.format in ("JPEG", "MPO"):
        if image_structure.jpeg_buffers_whole_image(data, len(img.getbands())) and w * h > max_pixels:
            raise _too_large(f"progressive or multi-scan JPEG of {w}x{h} = {w * h} pixels, limit {max_pixels}")
        if draft_size:  # decode at 1/2..1/8 scale, still at least draft_size a side
            img.draft(img.mode, (draft_size, draft_size))
    dw, dh = img.size
    if dw * dh > max_pixels:
        raise _too_large(f"{dw}x{dh} = {dw * dh} pixels to decode, limit {max_pixels}")
    if why := image_structure.exif_problem(img.info):
        raise _too_complex(why)
    return img


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float images to 8-bit grayscale (Pillow's own conversion clips them to white),
    in integer or float32 arithmetic, in place."""
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I (int32)
        a = np.array(img, dtype=np.int32 if img.mode == "I" else np.uint16)
        if a.max() > 255:  # a full 16-bit range; an image that only uses 0..255 is taken as it is
            np.floor_divide(a, 257, out=a)
        return Image.fromarray(np.clip(a, 0, 255, out=a).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.array(img, dtype=np.float32)
        np.nan_to_num(a, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        a -= lo
        a *= np.float32(255 / max(hi - lo, 1e-12))
        return Image.fromarray(a.astype(np.uint8), "L")
    return img


def _shrink(img: Image.Image, size: int | None) -> Image.Image:
    """Box-reduce a large image by an integer factor before any full-size conversion, keeping at least
    8x ``size`` a side: the antialiased resize that follows makes the same 32x32 image from it. Images
    at the scale of the training data (GTSRB crops are at most 250 px) are left as they are."""
    k = min(img.size) // (8 * size) if size else 0
    if k < 2:
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    return img.reduce(k) if img.mode in ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr") else img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Transparent areas become white, as a sign cut-out would look on a page."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img


def decode_image(
    data: bytes, *, max_pixels: int, max_bytes: int | None = None, draft_size: int | None = None
) -> Image.Image:
    """Bytes -> PIL image in an 8-bit mode without alpha, EXIF orientation applied (first frame of an
    animation). ``draft_size``: the image will be shrunk to about this size, so a JPEG is decoded at a
    reduced scale and a large image is box-reduced before its mode conversions.

    Bounded cost: at most ``max_bytes`` and ``max_pixels`` (for a single-scan JPEG, counted after the
    reduced-scale decode), with integer or float32 arithmetic on them, and what ``image_structure`` allows
    besides pixels (scans, segments, chunks, blocks). A 413 before decoding otherwise."""
    img = _open(data, max_pixels, max_bytes, draft_size)
    try:
        img.load()
        transpose = _TRANSPOSE.get(img.getexif().get(0x0112))
        img = _flatten_alpha(_shrink(_to_8bit(img), draft_size))
        if transpose is not None:
            img = img.transpose(transpose)
    except Exception as e:  # truncated or corrupt data surfaces only while decoding pixels
        if isinstance(e, MemoryError):
            raise _too_large("out of memory while decoding") from None
        raise InputError(f"corrupt or truncated {img.format or 'image'} data: {e}", kind="InvalidImage") from None
    return img
