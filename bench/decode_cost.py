"""What the worst accepted images cost the handler to decode: CPU time and peak memory, per format.

    python -m bench.decode_cost [--side 2048] [--max-pixels N] [--lib handler] [--repeat 3]

Each image is made here (small files with a large canvas: what an attacker would send), then decoded by
``image_input.decode_image`` + ``presets.EvalPreset`` in a fresh process: peak RSS growth (VmHWM - VmRSS;
``ru_maxrss`` would inherit the parent's) and CPU seconds, best of ``--repeat``. ``--lib`` points at another
copy of handler/ (e.g. an older checkout) to compare. The README quotes the numbers ("Size limit").
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

ROOT = Path(__file__).resolve().parent.parent


def payloads(side: int) -> dict:
    s = side
    return {
        "16-bit PNG": (lambda: Image.fromarray(np.zeros((s, s), np.uint16)), "PNG", {"compress_level": 9}),
        "16-bit TIFF": (lambda: Image.fromarray(np.zeros((s, s), np.uint16)), "TIFF", {"compression": "tiff_adobe_deflate"}),
        "palette PNG, transparency": (lambda: Image.new("P", (s, s), 0), "PNG", {"bits": 1, "transparency": 0, "optimize": True}),
        "RGBA PNG": (lambda: Image.new("RGBA", (s, s), (0, 0, 0, 0)), "PNG", {"compress_level": 9}),
        "WebP canvas": (lambda: Image.new("RGB", (s, s), (200, 30, 30)), "WEBP", {"lossless": True}),
        "float TIFF": (lambda: Image.fromarray(np.zeros((s, s), np.float32)), "TIFF", {"compression": "tiff_adobe_deflate"}),
        "GIF, transparency": (lambda: Image.new("P", (s, s), 0), "GIF", {"transparency": 0}),
        "1-bit BMP": (lambda: Image.new("1", (s, s), 0), "BMP", {}),
        "progressive JPEG": (lambda: Image.new("RGB", (s, s), (200, 30, 30)), "JPEG", {"progressive": True, "subsampling": 0}),
        "baseline JPEG 88 Mpx": (lambda: Image.new("RGB", (9400, 9400), (200, 30, 30)), "JPEG", {"quality": 90}),
    }  # fmt: skip


CHILD = r"""
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
import image_input, presets
def vm(key):  # kB
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
data, max_pixels, preset = open(sys.argv[2], "rb").read(), int(sys.argv[3]), presets.EvalPreset()
preset(image_input.decode_image(open(sys.argv[4], "rb").read(), max_pixels=max_pixels, draft_size=64))  # warm-up
base, t0 = vm("VmRSS"), time.process_time()
try:
    img = image_input.decode_image(image_input.request_bytes({"body": data}), max_pixels=max_pixels, draft_size=64)
    preset(img)
    result = "accepted"
except image_input.InputError as e:
    result = f"{e.status} {e.kind}"
print(json.dumps({"cpu_s": time.process_time() - t0, "peak_mb": (vm("VmHWM") - base) / 1024, "result": result}))
"""


def main() -> None:
    cfg = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["handler"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", type=int, default=int(cfg["max_pixels"] ** 0.5), help="square images of this side")
    p.add_argument("--max-pixels", type=int, default=cfg["max_pixels"])
    p.add_argument("--lib", type=Path, default=ROOT / "handler", help="folder with image_input.py and presets.py")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    print(f"{args.side}x{args.side} images, max_pixels={args.max_pixels}, code from {args.lib}")
    print("| image | bytes | peak RSS growth | CPU | result |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm.png"
        Image.new("RGB", (40, 40), (1, 2, 3)).save(warm)
        for name, (make, fmt, kw) in payloads(args.side).items():
            buf = io.BytesIO()
            make().save(buf, fmt, **kw)
            path = Path(tmp) / "payload"
            path.write_bytes(buf.getvalue())
            cmd = [sys.executable, "-c", CHILD, str(args.lib), str(path), str(args.max_pixels), str(warm)]
            runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
                    for _ in range(args.repeat)]  # fmt: skip
            cpu, peak = min(r["cpu_s"] for r in runs), max(r["peak_mb"] for r in runs)
            print(f"| {name} | {len(buf.getvalue()):,} | {peak:.0f} MB | {cpu:.3f} s | {runs[0]['result']} |")


if __name__ == "__main__":
    main()
