"""What a body may hold besides its pixels: checked on the bytes before anything is decoded (issue 22).

The pixel limit bounds the work per pixel; Pillow and libjpeg also work per scan, segment, chunk, block or
junk byte, and some decoders run in Python a step per value. Each of those is counted here against a limit
far above what a real encoder writes, so that with the body limit every accepted request stays within
SECURITY.md's bound (0.5 s of CPU, 200 MB). The walks jump from length to length, search for markers with
``re`` (in C), and stop at their limit: they cost little whatever the bytes. Plain functions, no Pillow;
copied into the model archive as a top-level module.
"""

import re
from collections.abc import Iterator

# libjpeg's progressive scripts write 10 scans for colour, 6 for grayscale, 18 for CMYK; each scan is a pass
# over every block of the image (~2.4 ms at 2048x2048), whatever its size in bytes.
MAX_JPEG_SCANS = 24
# Marker segments other than scans (APPn, COM, tables...): a camera writes ~10, a progressive file a table per
# scan. Pillow reads each before the first scan in Python, and keeps every APPn.
MAX_JPEG_SEGMENTS = 96
# Bytes between segments before the first scan: Pillow steps over each in Python. Encoders write none.
MAX_JPEG_JUNK = 1024
# libpng writes image data in 8 KiB chunks: 1,024 in the largest body. Pillow reads each chunk in Python.
MAX_PNG_CHUNKS = 4096
# Text chunks: Pillow inflates and keeps each (up to 1 MB each, 64 MB in all).
MAX_PNG_TEXT_CHUNKS = 16
# GIF sub-blocks before the first image's pixels (comments, application data): Pillow keeps each in Python.
MAX_GIF_BLOCKS = 4096
# EXIF in a JPEG is one segment, 64 KiB at most; a larger one (PNG eXIf, WebP EXIF) is not a camera's, and
# Pillow reads its entries in Python.
MAX_EXIF_BYTES = 65536
# Pillow decodes run-length BMP in Python, a step per run (2 bytes or more).
MAX_BMP_RLE_BYTES = 2**20
# Pillow reads a PNM header a byte at a time in Python; a real one is a few dozen bytes.
MAX_PNM_HEADER_BYTES = 4096


def problem(data: bytes) -> str | None:
    """Why decoding ``data`` would cost more than its pixels, or None (also for what is not an image here:
    the decoder says what is wrong with it)."""
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif(data)
    if data[:2] == b"BM":
        return _bmp(data)
    if data[:1] == b"P" and data[1:2] in b"0123456fy":
        return _pnm(data)
    return None


def exif_problem(info: dict) -> str | None:
    """An EXIF block (read by Pillow's ``getexif()``, for the orientation) over MAX_EXIF_BYTES."""
    exif = info.get("exif") or b""
    raw = info.get("Raw profile type exif") or ""  # PNG text chunk of hex digits (ImageMagick)
    size = max(len(exif), len(raw) // 2)
    return f"EXIF of {size} bytes, limit {MAX_EXIF_BYTES}" if size > MAX_EXIF_BYTES else None


# ---- JPEG

_MARKER = re.compile(rb"\xff[^\x00\xff]")  # between segments (fill bytes FF FF may precede a marker)
_MARKER_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # in coded data FF 00 is a data byte, FF D0-D7 a restart
_PROGRESSIVE_FRAMES = (0xC2, 0xC6, 0xCA, 0xCE)


def jpeg_markers(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, position, bytes skipped before it) for each marker from the start of image to the end of
    image. Exact: a scan's coded data cannot hold a marker (FF is followed by 00 or a restart marker)."""
    i, pattern = 2, _MARKER
    while m := pattern.search(data, i):
        at, marker = m.start(), data[m.start() + 1]
        yield marker, at, at - i
        if marker == 0xD9:  # end of image (an MPO's other images follow: never decoded)
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i, pattern = at + 2, _MARKER
            continue
        i = at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")
        pattern = _MARKER_AFTER_SCAN if marker == 0xDA else _MARKER


def jpeg_buffers_whole_image(data: bytes, components: int) -> bool:
    """True when libjpeg must hold every DCT coefficient of the whole image (~6 bytes a pixel, whatever
    the draft scale): a progressive JPEG, or one whose first scan does not carry every component."""
    for marker, at, _ in jpeg_markers(data):
        if marker in _PROGRESSIVE_FRAMES:
            return True
        if marker == 0xDA:  # start of the first scan: does it carry every component?
            return at + 4 >= len(data) or data[at + 4] < components
    return True


def _jpeg(data: bytes) -> str | None:
    scans = segments = junk = 0
    for marker, _, skipped in jpeg_markers(data):
        if scans == 0:
            junk += skipped
            if junk > MAX_JPEG_JUNK:
                return f"JPEG with over {MAX_JPEG_JUNK} bytes between its segments"
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                return f"JPEG with over {MAX_JPEG_SCANS} scans"
        elif marker != 0xD9:
            segments += 1
            if segments > MAX_JPEG_SEGMENTS:
                return f"JPEG with over {MAX_JPEG_SEGMENTS} marker segments (metadata, tables)"
    return None


# ---- PNG, GIF


def _png(data: bytes) -> str | None:
    i, chunks, text = 8, 0, 0
    while i + 8 <= len(data):
        kind = data[i + 4 : i + 8]
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            return f"PNG with over {MAX_PNG_CHUNKS} chunks"
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            text += 1
            if text > MAX_PNG_TEXT_CHUNKS:
                return f"PNG with over {MAX_PNG_TEXT_CHUNKS} text chunks"
        if kind == b"IEND":
            break
        i += 12 + int.from_bytes(data[i : i + 4], "big")
    return None


def _gif(data: bytes) -> str | None:
    """Walks the blocks before the first image's pixels (the only ones decoded); Pillow's C decoder reads
    those pixels' sub-blocks."""
    if len(data) < 13:
        return None
    flags = data[10]
    i, blocks = 13 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0), 0
    while i < len(data):
        if data[i] != 0x21:  # the first image (or the trailer, or damage the decoder will report)
            return None
        i += 2  # an extension: its label, then sub-blocks up to an empty one
        while True:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                return f"GIF with over {MAX_GIF_BLOCKS} extension blocks before its image"
            if i >= len(data) or not data[i]:
                break
            i += 1 + data[i]
        i += 1
    return None


# ---- BMP, PNM: formats that Pillow decodes partly in Python


def _bmp(data: bytes) -> str | None:
    header = int.from_bytes(data[14:18], "little")
    compression = int.from_bytes(data[30:34], "little") if header >= 40 and len(data) >= 34 else 0
    if compression in (1, 2) and len(data) > MAX_BMP_RLE_BYTES:  # RLE8, RLE4
        return f"run-length BMP of {len(data)} bytes, limit {MAX_BMP_RLE_BYTES}"
    return None


_PNM_TOKEN = re.compile(rb"(?:[ \t\n\r\v\f]|#[^\r\n]*[\r\n])*([^ \t\n\r\v\f#]+)")  # whitespace, comments, a token


def _pnm(data: bytes) -> str | None:
    """The header (magic, width, height, maxval or scale) within MAX_PNM_HEADER_BYTES; and only the variants
    Pillow decodes in C: binary, with a maxval of 255 (or 65535 for grayscale). Plain (ASCII) PNM and other
    maxvals are rescaled by Pillow in Python, a step per value."""
    magic = data[:6].split(None, 1)[0]
    if magic in (b"P1", b"P2", b"P3"):
        return "plain (ASCII) PNM: send it binary (P4, P5, P6)"
    i, tokens = len(magic), []
    for _ in range(2 if magic == b"P4" else 3):
        m = _PNM_TOKEN.match(data, i, MAX_PNM_HEADER_BYTES)
        if m is None:
            return f"PNM header longer than {MAX_PNM_HEADER_BYTES} bytes" if len(data) > MAX_PNM_HEADER_BYTES else None
        tokens.append(m.group(1))
        i = m.end()
    maxval = tokens[-1] if magic in (b"P5", b"P6") else None
    if maxval is not None and maxval.isdigit() and int(maxval) not in ((255, 65535) if magic == b"P5" else (255,)):
        return f"PNM with maxval {maxval.decode(errors='replace')[:10]}: send 255 (or 65535 for grayscale)"
    return None
