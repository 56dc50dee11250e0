"""Request -> PIL image, or an ``InputError`` that says what was wrong (HTTP 400 or 413).

Plain functions, no TorchServe: the handler calls them per request, the tests call them directly.
Copied into the model archive as a top-level module.
"""

import base64
import binascii
import io
import json
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A 4000x3000 phone photo is 12 MP; anything over this is refused before its pixels are decoded.
MAX_PIXELS = 40_000_000


class InputError(ValueError):
    def __init__(self, message: str, *, status: int = 400, kind: str = "InvalidInput") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind

    def as_response(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": str(self)}


def request_bytes(row: dict) -> bytes:
    """The image bytes of one TorchServe request row.

    Raw body (``curl -T``, ``--data-binary``) arrives as ``body``; multipart as the form field's name
    (``data`` by convention, any single field accepted); JSON ``{"data": "<base64>"}`` arrives already
    parsed when the content type is application/json.
    """
    if not isinstance(row, dict) or not row:
        raise InputError('empty request: send an image as the body, a multipart field, or JSON {"data": base64}')
    value = row.get("data", row.get("body"))
    if value is None:
        if len(row) != 1:
            raise InputError(
                f"several form fields ({', '.join(sorted(row))}): send the image in one field named 'data'"
            )
        value = next(iter(row.values()))
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value)
        if value[:1] in (b"{", b"["):  # a JSON body TorchServe could not parse, or sent without its content type
            try:
                value = json.loads(value)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InputError(f"body looks like JSON but does not parse: {e}", kind="InvalidJSON") from None
    if isinstance(value, dict):
        if "data" not in value:
            raise InputError('JSON body has no \'data\' field: send {"data": "<base64 image>"}', kind="InvalidJSON")
        value = value["data"]
    if isinstance(value, list):
        raise InputError('JSON list given: send one image per request, {"data": "<base64 image>"}', kind="InvalidJSON")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("text is neither an image nor valid base64", kind="InvalidBase64") from None
    if not isinstance(value, bytes):
        raise InputError(f"unsupported input of type {type(value).__name__}", kind="InvalidJSON")
    if not value:
        raise InputError("empty body: no image bytes received", kind="EmptyInput")
    return value


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images to 8-bit grayscale (Pillow's own conversion clips them to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(a / (257.0 if a.max() > 255 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        return Image.fromarray(((a - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    return img


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Transparent areas become white, as a sign cut-out would look on a page."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Bytes -> PIL image in an 8-bit mode without alpha, EXIF orientation applied (first frame of an
    animation). ``draft_size`` lets JPEG decode at a reduced scale when the image will be shrunk anyway."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        if isinstance(e, UnidentifiedImageError):
            raise InputError(
                "not an image Pillow can decode (expected PNG, JPEG, PPM, BMP, WEBP, TIFF, GIF)", kind="InvalidImage"
            ) from None
        raise InputError(f"image too large: {e}", status=413, kind="ImageTooLarge") from None
    except Exception as e:  # Pillow raises assorted errors on malformed headers
        raise InputError(f"cannot read image header: {e}", kind="InvalidImage") from None
    w, h = img.size
    if w * h > max_pixels:
        raise InputError(
            f"image too large: {w}x{h} = {w * h} pixels, limit {max_pixels}", status=413, kind="ImageTooLarge"
        )
    if w < 1 or h < 1:
        raise InputError(f"image has no pixels ({w}x{h})", kind="InvalidImage")
    try:
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = _flatten_alpha(_to_8bit(img))
    except Exception as e:  # truncated or corrupt data surfaces only while decoding pixels
        raise InputError(f"corrupt or truncated {img.format or 'image'} data: {e}", kind="InvalidImage") from None
    return img
