"""Every install is pinned by hash: the image installs requirements/image-lock.txt (make docker-lock), the Makefile's
stamps serve-, dev- and bench-lock.txt (make lock), all with pip --require-hashes; make serve installs what the image
installs. Offline checks that the locks are not stale; tests/test_container.py checks the built image against its
lock."""

import re

import pytest

from tests.conftest import ROOT

REQ = ROOT / "requirements"
MAKEFILE = (ROOT / "Makefile").read_text()


def pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` requirement line."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", line)
        if m:
            found[m.group(1).lower().replace("_", "-")] = m.group(2)
    return found


def pins_with_includes(name: str) -> dict[str, str]:
    """The pins of requirements/NAME and of the files it pulls in with `-r`: what `pip install -r NAME` asks for."""
    text = (REQ / name).read_text()
    found = pins(text)
    for include in re.findall(r"^-r (\S+)", text, re.M):
        found |= pins_with_includes(include)
    return found


def lock_entries(lock: str = "image-lock.txt") -> dict[str, list[str]]:
    """name==version -> its --hash values, from the lock file's continuation lines."""
    entries, current = {}, None
    for line in (REQ / lock).read_text().splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            current = line.split(" ")[0]
            entries[current] = []
        elif current and "--hash=sha256:" in line:
            entries[current].append(line.split("--hash=sha256:")[1].split()[0])
    return entries


def make_lock_inputs() -> dict[str, list[str]]:
    """lock file -> the .txt files `make lock` resolves into it (read from the Makefile, where it is defined)."""
    recipe = MAKEFILE.split("\nlock:", 1)[1].split("\n\n", 1)[0]
    locks = {}
    for args, lock in re.findall(r"\$\(UV_COMPILE\) (.*?) -o (\S+)", recipe):
        words = args.split()
        locks[lock] = [w for i, w in enumerate(words) if w.endswith((".txt", ".in")) and words[i - 1] != "-c"]
    return locks


# lock -> the Makefile's stamp that installs it: the serving environment (.venv-serve) and .venv's two.
LOCAL_LOCKS = {
    "serve-lock.txt": "$(SERVE_VENV)/.serve",
    "dev-lock.txt": "$(VENV)/.dev",
    "bench-lock.txt": "$(VENV)/.bench",
}


@pytest.mark.parametrize("lock", ["image-lock.txt", *LOCAL_LOCKS])
def test_every_locked_package_has_a_sha256(lock):
    entries = lock_entries(lock)
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


def test_make_lock_writes_one_lock_per_install_stamp():
    assert make_lock_inputs() == {
        "bench-lock.txt": ["bench.txt"],
        "dev-lock.txt": ["dev.txt"],
        "serve-lock.txt": ["image.in"],
        "pip-lock.txt": [],  # pip alone, at dev-lock.txt's version
    }


def test_make_serve_installs_what_the_image_installs():
    """serve-lock.txt is the image's lock plus pip: the same packages, versions and hashes, torch 2.13.0+cpu too."""
    image, serve = lock_entries("image-lock.txt"), lock_entries("serve-lock.txt")
    assert {k: v for k, v in serve.items() if not k.startswith("pip==")} == image
    assert any(k.startswith("pip==") for k in serve) and any(k.endswith("+cpu") for k in image)


@pytest.mark.parametrize("lock", LOCAL_LOCKS)
def test_local_lock_holds_every_pin_of_its_inputs(lock):
    """A pin added or changed in requirements/*.txt without `make lock` fails here, not at someone's install."""
    locked = pins((REQ / lock).read_text())
    wanted = {}
    for name in make_lock_inputs()[lock]:
        wanted |= pins_with_includes(name)
    assert {k: locked.get(k) for k in wanted} == wanted
    # A pin deleted from an input: the lock still says the package came from that file.
    text = (REQ / lock).read_text()
    for entry in re.split(r"\n(?=[a-z0-9])", text)[1:]:
        name = entry.split("==")[0]
        for source in re.findall(r"-r (\S+\.txt)", entry):
            assert name in pins((REQ / source).read_text()), f"{lock}: {name} is no longer in {source}"


@pytest.mark.parametrize(("lock", "stamp"), LOCAL_LOCKS.items())
def test_the_makefile_installs_each_lock_with_hashes_only(lock, stamp):
    rule = re.search(rf"^{re.escape(stamp)}: (.*)\n((?:\t.*\n)+)", MAKEFILE, re.M)
    assert f"requirements/{lock}" in rule.group(1).split()  # a new lock reinstalls
    installs = [line for line in rule.group(2).splitlines() if "pip install" in line]
    python = "$(SERVE_PY)" if stamp.startswith("$(SERVE_VENV)") else "$(PY)"
    # The serving torch is not on PyPI: its wheel comes from a local folder or PyTorch's CPU index (find-links).
    links = "--find-links $(TORCH_FIND_LINKS) " if lock == "serve-lock.txt" else ""
    wanted = [f"\t{python} -m pip install -q --require-hashes {links}-r requirements/{lock}"]
    if lock == "dev-lock.txt":  # the venv is new there: the locked pip first, then the lock
        assert "requirements/pip-lock.txt" in rule.group(1).split()
        wanted.insert(0, "\t$(PY) -m pip install -q --require-hashes -r requirements/pip-lock.txt")
    assert installs == wanted


def test_the_locked_pip_is_dev_locks_pip():
    (pip,) = lock_entries("pip-lock.txt")
    assert pip.startswith("pip==") and lock_entries("pip-lock.txt")[pip] == lock_entries("dev-lock.txt")[pip]
