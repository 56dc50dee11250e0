"""Smoke test of a running serving image, for Cloud Build (deploy/cloudbuild-ci.yaml) and anywhere else:

    python deploy/ci_smoke.py http://HOST:8080 [--timeout 300]

Waits until the server answers a prediction, then checks what a client sees: an image gets the top-5 classes
as JSON (class names of handler/index_to_name.json when run from the repository), bad input a 400 JSON error.
Standard library only: it runs in a plain python image.
"""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

NAMES = Path(__file__).resolve().parent.parent / "handler" / "index_to_name.json"


def sign_ppm(size: int = 48) -> bytes:
    """A red ring on white (a prohibitory sign's shape), as a binary PPM: no imaging library needed."""
    c, pixels = (size - 1) / 2, bytearray()
    for y in range(size):
        for x in range(size):
            r = ((x - c) ** 2 + (y - c) ** 2) ** 0.5
            pixels += bytes((200, 20, 20) if size * 0.3 < r < size * 0.45 else (235, 235, 235))
    return f"P6 {size} {size} 255\n".encode() + bytes(pixels)


def put(url: str, body: bytes) -> tuple[int, dict]:
    # Without a content type urllib sends form-encoded, and TorchServe would parse the image as form fields.
    req = urllib.request.Request(
        f"{url}/predictions/gtsrb", data=body, method="PUT", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the inference API, e.g. http://gtsrb-ci:8080")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the model (default: %(default)s)")
    args = p.parse_args(argv)
    deadline, status, body = time.monotonic() + args.timeout, 0, {}
    while time.monotonic() < deadline:
        try:
            status, body = put(args.url, sign_ppm())
        except (OSError, ValueError):  # not listening yet, or an HTML error page
            status = 0
        if status == 200:
            break
        time.sleep(2)
    if status != 200:
        sys.exit(f"FAIL: no prediction within {args.timeout:.0f} s (last status {status}: {body})")
    names = set(json.loads(NAMES.read_text()).values()) if NAMES.exists() else None
    probs = list(body.values())
    if len(body) != 5 or probs != sorted(probs, reverse=True) or (names and not set(body) <= names):
        sys.exit(f"FAIL: not the top-5 classes: {body}")
    bad_status, bad = put(args.url, b"not an image")
    if bad_status != 400 or bad.get("code") != 400:
        sys.exit(f"FAIL: bad input got {bad_status} {bad}, not a 400 JSON error")
    print(f"smoke test passed: top-1 {next(iter(body))!r} ({probs[0]:.2f}); bad input -> 400")
    return 0


if __name__ == "__main__":
    sys.exit(main())
