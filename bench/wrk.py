"""The load generator: wrk (a Debian package, apt-get install -y wrk) PUTting real PNG bodies in a cycle.

    files = write_inputs(work, images)            # the Lua script + the list of bodies
    r = run_wrk(url, concurrency, seconds, *files)  # {"requests", "rps", "errors": {...}, "latency_us": {...}}
    socket_errors(r), http_4xx_5xx(r), failed_requests(r)

wrk's "errors" (its own word, kept in the dict) are of two kinds, named apart everywhere else: socket errors
(connect, read, write, timeout: the request got no answer) and HTTP 4xx/5xx (an answer with status >= 400;
wrk prints it as "Non-2xx or 3xx responses"). A failed request is either.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

SCRIPT = r"""
-- Cycles through the PNG files listed in args[1]; method args[2]; prints a JSON summary in done().
local requests = {}
local n = 0
local i = 0

function init(args)
  local list = assert(io.open(args[1]))
  wrk.method = args[2] or "PUT"
  wrk.headers["Content-Type"] = "application/octet-stream"
  for path in list:lines() do
    local f = assert(io.open(path, "rb"))
    local body = f:read("*a")
    f:close()
    n = n + 1
    requests[n] = wrk.format(nil, nil, nil, body)
  end
  list:close()
  i = math.random(n) - 1
end

function request()
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %.0f, "duration_us": %.0f, "bytes": %.0f, ' ..
    '"errors": {"connect": %.0f, "read": %.0f, "write": %.0f, "status": %.0f, "timeout": %.0f}, ' ..
    '"latency_us": {"p50": %.0f, "p90": %.0f, "p99": %.0f, "mean": %.1f, "max": %.0f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


class WrkFiles(typing.NamedTuple):
    script: Path  # SCRIPT
    listing: Path  # one body (file path) per line


def write_inputs(work: Path, bodies: list[Path]) -> WrkFiles:
    """The script and the listing of ``bodies`` in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    files = WrkFiles(work / "bodies.lua", work / "bodies.txt")
    files.script.write_text(SCRIPT)
    files.listing.write_text("".join(f"{p}\n" for p in bodies))
    return files


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def ensure_wrk() -> None:
    if have_wrk():
        return
    print("wrk (the load generator) is not installed; trying: apt-get install -y wrk", flush=True)
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
        if not have_wrk():
            subprocess.run(["apt-get", "update", "-qq"], check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
    if not have_wrk():
        sys.exit("wrk is required: sudo apt-get install -y wrk (Debian/Ubuntu) or brew install wrk (macOS)")


def parse_wrk(stdout: str) -> dict:
    """The JSON line printed by done(); falls back on wrk's own --latency text."""
    m = re.search(r"^WRK_JSON (\{.*\})$", stdout, re.M)
    if m:
        r = json.loads(m.group(1))
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
        return r
    units = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 6e7}

    def us(text: str) -> float:
        num, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
        return float(num) * units[unit]

    lat = {f"p{p}": us(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)$", stdout, re.M)}
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", stdout)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()))) if sock else {}
    errors["status"] = int(non2xx.group(1)) if non2xx else 0
    requests = re.search(r"(\d+) requests in", stdout)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", stdout)
    return {
        "requests": int(requests.group(1)) if requests else 0,
        "rps": float(rps.group(1)) if rps else 0.0,
        "errors": {k: errors.get(k, 0) for k in ("connect", "read", "write", "status", "timeout")},
        "latency_us": lat,
    }


def run_wrk(url: str, concurrency: int, seconds: int, script: Path, listing: Path) -> dict:
    cmd = [
        "wrk", "-t1", f"-c{concurrency}", f"-d{max(1, seconds)}s", "--timeout", "30s", "--latency",
        "-s", str(script), url, "--", str(listing), "PUT",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if p.returncode != 0:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stderr or p.stdout}")
    return parse_wrk(p.stdout)


def socket_errors(r: dict) -> int:
    """Requests that got no answer: connect, read and write errors and timeouts (30 s)."""
    e = r["errors"]
    return e["connect"] + e["read"] + e["write"] + e["timeout"]


def http_4xx_5xx(r: dict) -> int:
    """Requests answered with HTTP status >= 400."""
    return r["errors"]["status"]


def failed_requests(r: dict) -> int:
    """Requests that did not succeed: socket errors plus HTTP 4xx/5xx answers."""
    return socket_errors(r) + http_4xx_5xx(r)
