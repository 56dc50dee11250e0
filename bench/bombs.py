"""Requests that are cheap to send and were costly to answer (issue 22): one builder per family, each taking
how many of its costly units to repeat. Shared by ``bench.decode_cost`` and the tests.

Every body is a valid image apart from its repetitions, so a decoder that does not check structure decodes
it to the end.
"""

import functools
import io
import struct
import zlib

from PIL import Image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SMALL = Image.new("RGB", (32, 32), (200, 30, 30))


# ---- JPEG


@functools.cache
def _progressive(side: int) -> bytes:
    return encode(Image.new("RGB", (side, side), (200, 30, 30)), "JPEG", progressive=True)


def progressive_jpeg_scans(n: int, side: int = 2048) -> bytes:
    """A progressive JPEG of side x side (at the pixel limit: accepted before decoding) whose last scan, a
    refinement of a few bytes, is repeated n times: libjpeg makes one pass over the whole image per scan."""
    base = _progressive(side)
    sos = base.rindex(b"\xff\xda")
    start = base.rindex(b"\xff\xc4", 0, sos)  # the Huffman table that goes with it
    return base[:-2] + base[start:-2] * n + b"\xff\xd9"


def jpeg_segment_flood(n: int, marker: int = 0xEF, payload: bytes = b"") -> bytes:
    """A small JPEG with n segments (APP15 by default, empty) after its start-of-image marker: Pillow reads
    each in Python and keeps every APPn."""
    base = encode(SMALL, "JPEG")
    segment = bytes((0xFF, marker)) + struct.pack(">H", 2 + len(payload)) + payload
    return base[:2] + segment * n + base[2:]


def jpeg_dqt_flood(n: int) -> bytes:
    """n quantization tables: Pillow parses each in Python (64 values)."""
    return jpeg_segment_flood(n, 0xDB, b"\x00" + bytes(range(1, 65)))


def jpeg_dense(side_w: int, side_h: int, quality: int = 95, progressive: bool = False, seed: int = 0) -> bytes:
    """A JPEG of noise (the most entropy-coded data per pixel a real encoder writes). Progressive ones are CMYK:
    Pillow's output buffer for them is 4 bytes a pixel (1 for RGB, too few for noise)."""
    import numpy as np

    bands = 4 if progressive else 3
    noise = np.random.default_rng(seed).integers(0, 256, (side_h, side_w, bands), dtype=np.uint8)
    img = Image.frombytes("CMYK", (side_w, side_h), noise.tobytes()) if progressive else Image.fromarray(noise)
    return encode(img, "JPEG", quality=quality, progressive=progressive, subsampling=0)


# ---- PNG


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_empty_chunks(n: int, kind: bytes = b"teSt") -> bytes:
    """A small PNG with n empty ancillary chunks before its image data: each is a Python step in Pillow."""
    base = encode(SMALL, "PNG")
    at = 8 + 25  # after the signature and IHDR
    return base[:at] + png_chunk(kind, b"") * n + base[at:]


def png_split_idat(n: int) -> bytes:
    """A small PNG whose image data is followed by n empty IDAT chunks (read one by one after decoding)."""
    base = encode(SMALL, "PNG")
    return base[:-12] + png_chunk(b"IDAT", b"") * n + base[-12:]


def png_ztxt(n: int, mb: float = 1.0) -> bytes:
    """n compressed text chunks, each inflating to ``mb`` MB (Pillow keeps the text, up to 64 MB)."""
    base = encode(SMALL, "PNG")
    at = 8 + 25
    text = zlib.compress(b"a" * int(mb * 2**20), 9)
    return base[:at] + b"".join(png_chunk(b"zTXt", b"c%d\x00\x00" % i + text) for i in range(n)) + base[at:]


# ---- GIF


def gif_subblocks(n: int) -> bytes:
    """A small GIF with a comment of n 1-byte sub-blocks before its image: Pillow keeps a bytes object each."""
    base = encode(SMALL.convert("P"), "GIF")
    at = base.index(b"\x2c")  # the first image descriptor (the palette of a 32x32 red square holds no 0x2C)
    return base[:at] + b"\x21\xfe" + b"\x01x" * n + b"\x00" + base[at:]


# ---- TIFF


def tiff_strips(n: int) -> bytes:
    """A 1 x n grayscale TIFF in n one-byte strips: Pillow makes a Python tile per strip."""
    entries = [
        (256, 4, 1, 1),  # width
        (257, 4, 1, n),  # height
        (258, 3, 1, 8),  # bits per sample
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 1),  # black is zero
        (273, 4, n, None),  # strip offsets
        (277, 3, 1, 1),  # samples per pixel
        (278, 4, 1, 1),  # rows per strip
        (279, 4, n, None),  # strip byte counts
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    offsets_at = 8 + ifd_size
    counts_at = offsets_at + 4 * n
    pixels_at = counts_at + 4 * n
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if tag == 273:
            value = offsets_at
        elif tag == 279:
            value = counts_at
        ifd += struct.pack("<HHI", tag, typ, count) + (
            struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        )
    ifd += struct.pack("<I", 0)
    offsets = struct.pack(f"<{n}I", *range(pixels_at, pixels_at + n))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + offsets + struct.pack(f"<{n}I", *[1] * n) + b"\x80" * n


# ---- BMP, PPM


def bmp_rle_runs(n: int) -> bytes:
    """An 8-bit run-length BMP of n one-pixel runs (Pillow decodes RLE in Python, a step per run)."""
    width = 2048
    height = max(1, -(-n // width))
    rows = (b"\x01\x07" * width + b"\x00\x00") * height  # runs of 1 pixel, end of line
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    header_size = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", header_size + len(rows), 0, 0, header_size) + info + palette + rows


def plain_ppm(n: int) -> bytes:
    """A plain (ASCII) PPM of n pixel values: Pillow parses the numbers in Python."""
    width = 2048
    height = max(1, -(-n // (3 * width)))
    return b"P3\n%d %d\n255\n" % (width, height) + b"7 " * (3 * width * height)


_EXIF_TAGS = [t for t in range(0x200, 0x10000) if t not in (0x8769, 0x8825, 0xA005)]  # not the sub-directories
MAX_EXIF_ENTRIES = len(_EXIF_TAGS)


def exif_entries(n: int) -> bytes:
    """EXIF (TIFF layout) whose first directory has n entries (at most MAX_EXIF_ENTRIES), each a 4-byte value."""
    tags = _EXIF_TAGS[:n]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, 4, 1, t) for t in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def png_exif(n: int) -> bytes:
    base = encode(SMALL, "PNG")
    return base[:33] + png_chunk(b"eXIf", exif_entries(n)) + base[33:]


def webp_exif(n: int) -> bytes:
    return encode(SMALL, "WEBP", exif=exif_entries(n))


def webp_frames(n: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), (i % 256, 0, 0)) for i in range(n)]
    return encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)


def gif_data_subblocks(side: int = 2048) -> bytes:
    """A side x side GIF whose image data is re-packed in 1-byte sub-blocks."""
    base = encode(Image.new("P", (side, side), 0), "GIF")
    at = base.index(b"\x2c")
    head, rest = base[: at + 10 + 1], base[at + 10 + 1 :]  # descriptor (no local palette) and LZW code size
    data, i = b"", 0
    while rest[i]:
        data += rest[i + 1 : i + 1 + rest[i]]
        i += 1 + rest[i]
    return head + b"".join(b"\x01" + data[j : j + 1] for j in range(len(data))) + b"\x00" + rest[i + 1 :]


def ppm_maxval(n: int, maxval: int = 254) -> bytes:
    """A binary PPM of about n pixels with a maxval other than 255: Pillow rescales it in Python, per sample."""
    width = 1024
    height = max(1, -(-n // width))
    return b"P6\n%d %d\n%d\n" % (width, height, maxval) + b"\x07" * (3 * width * height)


def ppm_header_whitespace(n: int) -> bytes:
    """A PPM whose header holds n bytes of whitespace: Pillow reads its header a byte at a time in Python."""
    return b"P6" + b" " * n + b"\n32 32\n255\n" + b"\x07" * (3 * 32 * 32)


def jpeg_junk(n: int) -> bytes:
    """A small JPEG with n junk bytes after its first segment: Pillow steps over each in Python."""
    base = encode(SMALL, "JPEG")
    at = 4 + int.from_bytes(base[4:6], "big")  # after the start of image and APP0
    return base[:at] + b"\x00" * n + base[at:]
