"""What the worst requests cost the handler to read and decode: CPU time and peak memory, per family.

    python -m bench.decode_cost [--max-bytes N] [--max-pixels N] [--lib handler] [--repeat 3] [--only WORD]

Two kinds of family. Images at the pixel limit (small files with a large canvas, one per format). And the
bombs of ``bench.bombs`` (issue 22), each a number n of a costly unit (scans, segments, chunks, blocks): for
each, the largest n the checks of this checkout accept (found by bisection on ``image_input``'s checks,
which run before any pixel is decoded) and the largest n whose body fits ``--max-bytes``.

Each body goes through ``image_input.request_bytes`` + ``decode_image`` + ``presets.EvalPreset`` in a fresh
process: CPU seconds (best of ``--repeat``) and peak RSS growth (VmHWM after the request, the peak having
been reset to the current RSS after a warm-up). A process past ``--cpu-limit`` seconds is stopped
(TorchServe kills a worker after its 30 s ``responseTimeout``). ``--lib`` points at another copy of handler/
(e.g. an older checkout, with ``--max-bytes`` at its body limit) for a "before" column. SECURITY.md quotes
the numbers ("Cost of one request").
"""

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from bench import bombs

ROOT = Path(__file__).resolve().parent.parent


def canvases(side: int) -> dict:
    s = side
    return {
        "16-bit PNG": (lambda: Image.fromarray(np.zeros((s, s), np.uint16)), "PNG", {"compress_level": 9}),
        "16-bit TIFF": (lambda: Image.fromarray(np.zeros((s, s), np.uint16)), "TIFF", {"compression": "tiff_adobe_deflate"}),
        "palette PNG, transparency": (lambda: Image.new("P", (s, s), 0), "PNG", {"bits": 1, "transparency": 0, "optimize": True}),
        "RGBA PNG": (lambda: Image.new("RGBA", (s, s), (0, 0, 0, 0)), "PNG", {"compress_level": 9}),
        "WebP canvas": (lambda: Image.new("RGB", (s, s), (200, 30, 30)), "WEBP", {"lossless": True}),
        "float TIFF": (lambda: Image.fromarray(np.zeros((s, s), np.float32)), "TIFF", {"compression": "tiff_adobe_deflate"}),
        "float PFM": (lambda: Image.fromarray(np.zeros((s, s), np.float32)), "PPM", {}),
        "GIF, transparency": (lambda: Image.new("P", (s, s), 0), "GIF", {"transparency": 0}),
        "1-bit BMP": (lambda: Image.new("1", (s, s), 0), "BMP", {}),
        "progressive JPEG": (lambda: Image.new("RGB", (s, s), (200, 30, 30)), "JPEG", {"progressive": True, "subsampling": 0}),
        "baseline JPEG 88 Mpx": (lambda: Image.new("RGB", (9400, 9400), (200, 30, 30)), "JPEG", {"quality": 90}),
    }  # fmt: skip


def dense(side: int, max_bytes: int) -> dict:
    """The most coded data per pixel real encoders write (noise), as large as the limits allow."""
    png_side = min(side, int((max_bytes / 3.01) ** 0.5))  # 3 bytes a pixel, incompressible

    def progressive_jpeg() -> bytes:
        for q in (95, 85, 75, 60, 50, 40, 30, 20, 10):
            if len(data := bombs.jpeg_dense(side, side, q, progressive=True)) <= max_bytes:
                return data
        raise ValueError("no progressive JPEG of noise fits max_bytes")

    return {
        "progressive CMYK JPEG of noise": progressive_jpeg,
        "PNG of noise": lambda: bombs.encode(
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (png_side, png_side, 3), dtype=np.uint8)), "PNG"
        ),
    }


# name -> (builder of n units, the most units it can build); issue 22's families first
BOMBS = {
    "progressive JPEG, a scan repeated": (bombs.progressive_jpeg_scans, None),
    "JPEG, empty APPn segments": (bombs.jpeg_segment_flood, None),
    "TIFF, one-byte strips": (bombs.tiff_strips, None),
    "GIF, 1-byte comment sub-blocks": (bombs.gif_subblocks, None),
    "PNG, empty chunks": (bombs.png_empty_chunks, None),
    "PNG, empty IDAT chunks after the image": (bombs.png_split_idat, None),
    "PNG, zTXt chunks of 1 MB text": (bombs.png_ztxt, None),
    "JPEG, quantization tables": (bombs.jpeg_dqt_flood, None),
    "JPEG, junk bytes between segments": (bombs.jpeg_junk, None),
    "PNG, EXIF entries": (bombs.png_exif, bombs.MAX_EXIF_ENTRIES),
    "WebP, EXIF entries": (bombs.webp_exif, bombs.MAX_EXIF_ENTRIES),
    "BMP, run-length 1-pixel runs": (bombs.bmp_rle_runs, None),
    "PPM, plain (ASCII) values": (bombs.plain_ppm, None),
    "PPM, maxval 254 pixels": (bombs.ppm_maxval, None),
    "PPM, header whitespace": (bombs.ppm_header_whitespace, None),
}


CHILD = r"""
import inspect, io, json, re, resource, sys, time
resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[5]), int(sys.argv[5]) + 5))
sys.path.insert(0, sys.argv[1])
import image_input, presets
from PIL import Image
def vm(key):  # kB
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
data, max_pixels, max_bytes, preset = open(sys.argv[2], "rb").read(), int(sys.argv[3]), int(sys.argv[4]), presets.EvalPreset()
kw = {"max_bytes": max_bytes} if "max_bytes" in inspect.signature(image_input.decode_image).parameters else {}
warm = io.BytesIO()
Image.new("RGB", (40, 40), (1, 2, 3)).save(warm, "PNG")
preset(image_input.decode_image(warm.getvalue(), max_pixels=max_pixels, draft_size=64))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
base, t0 = vm("VmRSS"), time.process_time()
try:
    preset(image_input.decode_image(image_input.request_bytes({"body": data}), max_pixels=max_pixels, draft_size=64, **kw))
    result = "200"
except image_input.InputError as e:
    result = f"{e.status} {e.kind}"
print(json.dumps({"cpu_s": time.process_time() - t0, "peak_mb": (vm("VmHWM") - base) / 1024, "result": result}))
"""


def measure(data: bytes, args, tmp: Path) -> dict:
    path = tmp / "payload"
    path.write_bytes(data)
    cmd = [sys.executable, "-c", CHILD, str(args.lib), str(path), str(args.max_pixels), str(args.max_bytes)]
    runs = []
    for _ in range(args.repeat):
        p = subprocess.run(cmd + [str(args.cpu_limit)], capture_output=True, text=True)
        if p.returncode:  # SIGXCPU: over the CPU limit (or a crash: its message)
            why = f"over {args.cpu_limit} s CPU" if p.returncode in (-24, 152) else p.stderr.strip()[-200:]
            return {"cpu_s": None, "peak_mb": None, "result": f"killed ({why})"}
        runs.append(json.loads(p.stdout))
        if runs[-1]["cpu_s"] > args.cpu_limit / 4:
            break  # slow enough: once is enough
    return {"cpu_s": min(r["cpu_s"] for r in runs), "peak_mb": max(r["peak_mb"] for r in runs),
            "result": runs[0]["result"]}  # fmt: skip


def accepted_by_checks(data: bytes, max_pixels: int, max_bytes: int) -> bool:
    """Whether this checkout's handler reads the body further than its checks: the size, structure and
    pixel checks that ``decode_image`` runs before decoding pixels (no pixel is decoded here)."""
    import image_input

    try:
        image_input._open(data, max_pixels, max_bytes, 64)  # the checks, without the decoding
    except image_input.InputError:
        return False
    return True


def largest(make, fits, hi: int) -> int:
    """The largest n in [0, hi] with fits(make(n)) (fits is monotone: more units, never more accepted)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(make(mid)) else (lo, mid - 1)
    return lo


def n_for_bytes(make, max_bytes: int, max_n: int | None) -> int:
    """The largest n whose body is at most max_bytes (bodies grow linearly with n), or max_n."""
    small, k = len(make(1)), 1000
    while (big := len(make(1 + k))) == small:  # some grow a row at a time
        k *= 10
    n = min(max(1, int((max_bytes - small) / ((big - small) / k))), max_n or 2**62)
    while len(make(n)) > max_bytes:
        n = int(n * 0.999) - 1
    return n


def row(name: str, request: str, data: bytes, r: dict) -> str:
    cpu = "-" if r["cpu_s"] is None else f"{r['cpu_s']:.3f}"
    mb = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
    return f"| {name} | {request} | {len(data):,} | {cpu} | {mb} | {r['result']} |"


def main() -> None:
    cfg = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-bytes", type=int, default=cfg["max_bytes"], help="the body limit (bombs are sized to it)")
    p.add_argument("--max-pixels", type=int, default=cfg["max_pixels"])
    p.add_argument("--lib", type=Path, default=ROOT / "handler", help="folder with image_input.py and presets.py")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cpu-limit", type=int, default=30, help="CPU seconds before a request is stopped")
    p.add_argument("--only", help="only the families whose name contains this")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "handler"))  # this checkout's checks, for the bisection
    side = int(args.max_pixels**0.5)
    print(f"max_bytes={args.max_bytes:,}, max_pixels={args.max_pixels:,} ({side}x{side}), code from {args.lib}")
    print("| family | request | bytes | CPU s | peak RSS MB | status |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, fmt, kw) in canvases(side).items():
            if args.only and args.only not in name:
                continue
            buf = io.BytesIO()
            make().save(buf, fmt, **kw)
            print(row(name, "at the pixel limit", buf.getvalue(), measure(buf.getvalue(), args, Path(tmp))), flush=True)
        for name, make in dense(side, args.max_bytes).items():
            if args.only and args.only not in name:
                continue
            data = make()
            print(row(name, "within max_bytes and max_pixels", data, measure(data, args, Path(tmp))), flush=True)
        for name, (make, max_n) in BOMBS.items():
            if args.only and args.only not in name:
                continue
            at_limit = n_for_bytes(make, args.max_bytes, max_n)
            accepted = largest(make, lambda d: accepted_by_checks(d, args.max_pixels, args.max_bytes), at_limit)
            rows = [(at_limit, "largest within max_bytes")]
            if accepted != at_limit and accepted_by_checks(make(accepted), args.max_pixels, args.max_bytes):
                rows.insert(0, (accepted, "largest accepted"))  # by this checkout (some families never are)
            for n, what in rows:
                data = make(n)
                print(row(name, f"n={n:,} ({what})", data, measure(data, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
