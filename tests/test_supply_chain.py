"""What goes into the serving image is pinned by hash: requirements/image-lock.txt (make docker-lock), installed
with pip --require-hashes. Offline checks; tests/test_container.py checks the built image against the lock."""

import re

from tests.conftest import ROOT

REQ = ROOT / "requirements"


def pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` requirement line."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if m:
            found[m.group(1).lower().replace("_", "-")] = m.group(2)
    return found


def lock_entries() -> dict[str, list[str]]:
    """name==version -> its --hash values, from the lock file's continuation lines."""
    entries, current = {}, None
    for line in (REQ / "image-lock.txt").read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = line.split(" ")[0]
            entries[current] = []
        elif current and "--hash=sha256:" in line:
            entries[current].append(line.split("--hash=sha256:")[1].split()[0])
    return entries


def test_every_locked_package_has_a_sha256():
    entries = lock_entries()
    assert len(entries) >= 15
    for req, hashes in entries.items():
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), req


def test_lock_matches_the_pins_it_was_made_from():
    """A pin changed in serve.txt or image.in without `make docker-lock` fails here, not in the image."""
    locked = pins((REQ / "image-lock.txt").read_text())
    wanted = pins((REQ / "serve.txt").read_text()) | pins((REQ / "image.in").read_text())
    assert {k: locked.get(k) for k in wanted} == wanted
    # torch's own dependencies are pinned too (the resolver wrote "via torch" under each of them).
    via_torch = re.findall(r"^([a-z0-9-]+)==\S+ \\\n(?:    --hash=\S+(?: \\)?\n)+    # via torch$",
                           (REQ / "image-lock.txt").read_text(), re.M)  # fmt: skip
    assert {"filelock", "sympy", "networkx", "jinja2", "fsspec", "typing-extensions"} <= set(via_torch)


def test_the_image_build_installs_the_lock_with_hashes_only():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --require-hashes" in dockerfile and "-r /tmp/image-lock.txt" in dockerfile
    assert "COPY requirements/image-lock.txt" in dockerfile and "serve.txt" not in dockerfile
    build = (ROOT / "docker" / "build.sh").read_text()
    assert "--require-hashes" in build and "-r requirements/image-lock.txt" in build
    assert "!requirements/image-lock.txt" in (ROOT / ".dockerignore").read_text()  # in the build context
