"""deploy/gce.py: the gcloud commands it would run (dry runs without gcloud), the cloud-init it renders, and how
a real run behaves (a fake gcloud on PATH records the calls). No network, no Google Cloud account."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import gce

ROOT = Path(__file__).resolve().parent.parent
PROJECT, ZONE, TAG = "demo-proj-123", "europe-west1-b", "abc1234"
IMAGE = f"europe-west1-docker.pkg.dev/{PROJECT}/gtsrb/gtsrb-serve:{TAG}"
LB_RANGES = {"130.211.0.0/22", "35.191.0.0/16"}
VERBS = {"create", "delete", "describe", "add-backend", "set-named-ports", "set-autoscaling", "enable", "submit"}
# Flags whose value names another resource, and that resource's kind.
REFERENCES = {
    "--template": "compute instance-templates",
    "--health-check": "compute health-checks",
    "--health-checks": "compute health-checks",
    "--instance-group": "compute instance-groups managed",
    "--default-service": "compute backend-services",
    "--url-map": "compute url-maps",
    "--target-http-proxy": "compute target-http-proxies",
}


def path_without_gcloud() -> str:
    return os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if d and not (Path(d) / "gcloud").exists())


def cli(*args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": path_without_gcloud() if path is None else path, **env}
    return subprocess.run(
        [sys.executable, "-m", "deploy.gce", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


class DryRun:
    def __init__(self, command: str, *extra: str):
        self.proc = cli(command, "--project", PROJECT, "--zone", ZONE, "--tag", TAG, "--dry-run", *extra)
        assert self.proc.returncode == 0, self.proc.stderr
        self.out = self.proc.stdout
        self.commands = [shlex.split(line) for line in self.out.splitlines() if line.startswith("gcloud ")]
        m = re.search(r"^# cloud-init rendered from deploy/cloud-init.yaml to (\S+)$", self.out, re.M)
        self.user_data = Path(m.group(1)) if m else None

    def find(self, *words: str) -> list[list[str]]:
        """Commands that start with `gcloud WORDS...`."""
        return [c for c in self.commands if c[1 : 1 + len(words)] == list(words)]

    def one(self, *words: str) -> list[str]:
        found = self.find(*words)
        assert len(found) == 1, f"expected one `gcloud {' '.join(words)}`, got {found}"
        return found[0]

    def index(self, *words: str) -> int:
        return self.commands.index(self.one(*words))


def flags(argv: list[str]) -> dict[str, str | bool]:
    """--name=value -> {--name: value}; a bare --switch -> True (the CLI writes every value with '=')."""
    return dict(a.split("=", 1) if "=" in a else (a, True) for a in argv if a.startswith("--"))


def resource(argv: list[str]) -> tuple[str, str, str | None]:
    """(kind, verb, name): `gcloud compute health-checks create http X` -> ('compute health-checks', 'create', 'X')."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    i = next(i for i, w in enumerate(words) if w in VERBS)
    rest = words[i + 1 :]
    if words[:i] == ["compute", "health-checks"] and words[i] == "create":
        rest = rest[1:]  # the protocol comes first
    return " ".join(words[:i]), words[i], rest[0] if rest else None


def created(commands: list[list[str]]) -> list[tuple[str, str]]:
    """Resources in the order they are first created."""
    out = []
    for argv in commands:
        kind, verb, name = resource(argv)
        if verb == "create" and (kind, name) not in out:
            out.append((kind, name))
    return out


@pytest.fixture(scope="module")
def runs():
    made = {"deploy": DryRun("deploy"), "scale-out": DryRun("scale-out"), "teardown": DryRun("teardown")}
    yield made
    for run in made.values():
        if run.user_data:
            run.user_data.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- dry runs


def test_dry_run_needs_no_gcloud_and_prints_a_script(runs):
    assert shutil.which("gcloud", path=path_without_gcloud()) is None  # the runs above really had no gcloud
    for name, run in runs.items():
        assert run.commands, name
        for line in run.out.splitlines():
            # Every line is a comment or something to paste into a shell: cd, gcloud, or the final IP/curl pair.
            assert line.startswith(("#", "cd ", "gcloud ", "IP=$(gcloud ", "curl ")), f"{name}: {line!r}"
            if not line.startswith("#"):
                shlex.split(line)  # balanced quoting
        assert all(argv[0] == "gcloud" and f"--project={PROJECT}" in argv for argv in run.commands), name


def test_firewall_opens_tcp_8080_only(runs):
    (public,) = runs["deploy"].find("compute", "firewall-rules", "create")
    (lb,) = runs["scale-out"].find("compute", "firewall-rules", "create")
    for rule in (public, lb):
        f = flags(rule)
        assert (f["--rules"], f["--direction"], f["--action"]) == ("tcp:8080", "INGRESS", "ALLOW"), rule
        assert f["--target-tags"] == "gtsrb-serve"
    assert flags(public)["--source-ranges"] == "0.0.0.0/0"
    assert set(flags(lb)["--source-ranges"].split(",")) == LB_RANGES
    # No other command opens anything, and the VM carries no tag that default-network rules (http-server...) match.
    for run in runs.values():
        opened = [a for argv in run.commands for a in argv if a.startswith(("--rules=", "--allow="))]
        assert set(opened) <= {"--rules=tcp:8080"}
    assert flags(runs["deploy"].one("compute", "instances", "create"))["--tags"] == "gtsrb-serve"
    narrowed = DryRun("deploy", "--source-ranges", "203.0.113.0/24")
    assert flags(narrowed.one("compute", "firewall-rules", "create"))["--source-ranges"] == "203.0.113.0/24"
    narrowed.user_data.unlink()


def test_vm_runs_container_optimized_os_with_the_cloud_init(runs):
    run = runs["deploy"]
    vm = flags(run.one("compute", "instances", "create"))
    assert (vm["--image-family"], vm["--image-project"]) == ("cos-stable", "cos-cloud")
    assert vm["--metadata-from-file"] == f"user-data={run.user_data}"
    assert run.user_data.is_file()  # the dry run's commands point at a file that exists
    assert vm["--zone"] == ZONE and vm["--machine-type"] == "e2-standard-2"
    assert vm["--scopes"] == "cloud-platform" and vm["--shielded-secure-boot"] is True
    template = flags(runs["scale-out"].one("compute", "instance-templates", "create"))
    for key in ("--image-family", "--image-project", "--tags", "--scopes", "--shielded-secure-boot"):
        assert template[key] == vm[key], key
    assert template["--metadata-from-file"].startswith("user-data=")
    for r in runs.values():  # the deprecated container startup agent is not used
        assert "create-with-container" not in r.out and "--container-image" not in r.out


def test_image_uri_and_registry(runs):
    run = runs["deploy"]
    build = run.one("builds", "submit")
    assert flags(build)["--config"] == "deploy/cloudbuild.yaml" and "." in build
    assert f"_IMAGE={IMAGE}" in flags(build)["--substitutions"].split(",")
    repo = flags(run.one("artifacts", "repositories", "create"))
    assert (repo["--location"], repo["--repository-format"]) == ("europe-west1", "docker")
    assert IMAGE in run.user_data.read_text()
    # The registry region follows the zone; the repository and tag are options.
    cfg = gce.Config(project="p-1", zone="northamerica-northeast1-a", repo="models", tag="v2")
    assert cfg.image == "northamerica-northeast1-docker.pkg.dev/p-1/models/gtsrb-serve:v2"
    bad = cli("deploy", "--project", PROJECT, "--zone", "europe-west1", "--dry-run")
    assert bad.returncode != 0 and "not a Compute Engine zone" in bad.stderr and not bad.stdout


def test_default_tag_is_the_git_commit():
    tag = gce.default_tag()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert tag == (head.stdout.strip() if head.returncode == 0 else "latest")


def test_shared_resources_are_created_only_when_missing(runs):
    run = runs["deploy"]
    for kind in (("artifacts", "repositories"), ("compute", "firewall-rules"), ("compute", "health-checks")):
        describe, create = run.index(*kind, "describe"), run.index(*kind, "create")
        assert create == describe + 1, kind  # the runner skips the create when the describe succeeds
    assert "created only if this describe fails" in run.out


def test_health_check_is_http_8080_ping_and_used_by_mig_and_backend(runs):
    hc = runs["deploy"].one("compute", "health-checks", "create")
    assert hc[3:5] == ["create", "http"] and (flags(hc)["--port"], flags(hc)["--request-path"]) == ("8080", "/ping")
    name = resource(hc)[2]
    run = runs["scale-out"]
    assert run.one("compute", "health-checks", "create") == hc  # scale-out works without deploy, same check
    mig = flags(run.one("compute", "instance-groups", "managed", "create"))
    assert mig["--health-check"] == name and int(mig["--initial-delay"]) >= 120  # boot + pull + model load
    assert flags(run.one("compute", "backend-services", "create"))["--health-checks"] == name
    assert "--named-ports=http:8080" in run.one("compute", "instance-groups", "managed", "set-named-ports")


def test_scale_out_creates_each_resource_before_it_is_used(runs):
    run = runs["scale-out"]
    made: set[tuple[str, str]] = set()
    for argv in run.commands:
        kind, verb, name = resource(argv)
        for flag, value in flags(argv).items():
            if flag in REFERENCES:
                assert (REFERENCES[flag], value) in made, f"{shlex.join(argv)} uses {value} before it exists"
        if verb in ("add-backend", "set-named-ports", "set-autoscaling"):
            assert (kind, name) in made, shlex.join(argv)
        if verb == "create":
            made.add((kind, name))
    pipeline = [
        run.index("compute", "instance-templates", "create"),
        run.index("compute", "instance-groups", "managed", "create"),
        run.index("compute", "backend-services", "create"),
        run.index("compute", "backend-services", "add-backend"),
        run.index("compute", "url-maps", "create"),
        run.index("compute", "target-http-proxies", "create"),
        run.index("compute", "forwarding-rules", "create"),
    ]
    assert pipeline == sorted(pipeline)
    assert run.index("compute", "firewall-rules", "create") < pipeline[1]  # health checks reach the first VMs
    rule = flags(run.one("compute", "forwarding-rules", "create"))
    assert rule["--ports"] == "80" and rule["--global"] is True
    scheme = flags(run.one("compute", "backend-services", "create"))["--load-balancing-scheme"]
    assert rule["--load-balancing-scheme"] == scheme


def test_autoscaling_on_cpu_or_requests_per_second(runs):
    cpu = runs["scale-out"]
    scaling = flags(cpu.one("compute", "instance-groups", "managed", "set-autoscaling"))
    assert scaling["--target-cpu-utilization"] == "0.6" and "--target-load-balancing-utilization" not in scaling
    assert (scaling["--min-num-replicas"], scaling["--max-num-replicas"]) == ("2", "4")
    rps = DryRun("scale-out", "--autoscale-on", "rps", "--max-rps", "15", "--max-replicas", "6")
    rps.user_data.unlink()
    backend = flags(rps.one("compute", "backend-services", "add-backend"))
    assert (backend["--balancing-mode"], backend["--max-rate-per-instance"]) == ("RATE", "15")
    scaling = flags(rps.one("compute", "instance-groups", "managed", "set-autoscaling"))
    assert "--target-load-balancing-utilization" in scaling and "--target-cpu-utilization" not in scaling
    assert scaling["--max-num-replicas"] == "6"
    # Load-balancing utilization is measured against the capacity that add-backend defines.
    assert rps.index("compute", "backend-services", "add-backend") < rps.index(
        "compute", "instance-groups", "managed", "set-autoscaling"
    )


def test_teardown_deletes_in_reverse_order_of_creation(runs):
    deletes = [resource(argv)[::2] for argv in runs["teardown"].commands]
    assert all(resource(argv)[1] == "delete" and "--quiet" in argv for argv in runs["teardown"].commands)
    everything = created(runs["deploy"].commands + runs["scale-out"].commands)
    assert deletes == everything[::-1]
    # Also right when only scale-out ran: its resources come out in reverse of its own order.
    scale_out = created(runs["scale-out"].commands)
    assert [d for d in deletes if d in scale_out] == scale_out[::-1]
    kept = DryRun("teardown", "--keep-images")
    assert [resource(a)[::2] for a in kept.commands] == [d for d in deletes if d[0] != "artifacts repositories"]


# ----------------------------------------------------------------------------------------------- cloud-init


def test_rendered_cloud_init(runs):
    text = runs["deploy"].user_data.read_text()
    assert text.splitlines()[0] == "#cloud-config"
    assert "$image" not in text and "$registry_host" not in text
    doc = yaml.safe_load(text)
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    service = files["/etc/systemd/system/gtsrb.service"]
    (run_line,) = [line for line in service.splitlines() if line.startswith("ExecStart=")]
    argv = shlex.split(run_line.removeprefix("ExecStart="))
    assert argv[:2] == ["/usr/bin/docker", "run"] and argv[-1] == IMAGE
    published = [argv[i + 1] for i, a in enumerate(argv) if a in ("-p", "--publish")]
    assert published == ["8080:8080"] and not any(a.startswith(("-p=", "--publish=", "--net")) for a in argv)
    assert "--log-driver=gcplogs" in argv and "Restart=always" in service
    assert "docker-credential-gcr configure-docker --registries europe-west1-docker.pkg.dev" in service
    assert "ExecStop=/usr/bin/docker stop gtsrb" in service
    watchdog = files["/etc/systemd/system/gtsrb-watchdog.service"]
    assert 'docker inspect -f "{{.State.Health.Status}}" gtsrb' in watchdog  # Go template braces survived
    assert "unhealthy" in watchdog and "systemctl restart gtsrb.service" in watchdog
    assert "OnUnitActiveSec=" in files["/etc/systemd/system/gtsrb-watchdog.timer"]
    assert doc["runcmd"] == [
        "systemctl daemon-reload",
        "systemctl start gtsrb.service",
        "systemctl start gtsrb-watchdog.timer",
    ]
    # The instance template boots the very same configuration.
    template = flags(runs["scale-out"].one("compute", "instance-templates", "create"))
    assert template["--metadata-from-file"] == f"user-data={runs['scale-out'].user_data}"
    assert runs["scale-out"].user_data.read_text() == text


# ---------------------------------------------------------------------------------------- real runs (no cloud)


def test_real_run_without_gcloud_fails_with_one_clear_line():
    r = cli("deploy", "--project", PROJECT, "--zone", ZONE, "--tag", TAG)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "gcloud not found on PATH" in r.stderr and "--dry-run" in r.stderr
    assert "Traceback" not in r.stderr and not r.stdout  # stopped before printing or running anything


FAKE_GCLOUD = """#!/bin/sh
# Records each call; describe fails unless it names $FAKE_EXISTING; anything matching $FAKE_FAIL fails.
printf '%s\\n' "$*" >> "$FAKE_LOG"
for a in "$@"; do
  case "$a" in --metadata-from-file=user-data=*) cp "${a#--metadata-from-file=user-data=}" "$FAKE_LOG.user-data" || exit 9;; esac
done
case "$*" in *"--format=get(networkInterfaces"*) echo 203.0.113.7; exit 0;; esac
if [ -n "$FAKE_FAIL" ]; then case "$*" in *"$FAKE_FAIL"*) echo "fake failure" >&2; exit 7;; esac; fi
case "$*" in *" describe "*)
  if [ -n "$FAKE_EXISTING" ]; then case "$*" in *"$FAKE_EXISTING"*) exit 0;; esac; fi
  exit 1;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"  # the fake shadows any real gcloud
        r = cli(*args, "--project", PROJECT, "--zone", ZONE, "--tag", TAG, path=path, FAKE_LOG=str(log), **env)
        return r, log.read_text().splitlines() if log.exists() else []

    run.log = log
    return run


def test_real_deploy_reuses_what_exists_and_cleans_up(fake_gcloud):
    r, calls = fake_gcloud("deploy", "--no-build", FAKE_EXISTING="firewall-rules describe")
    assert r.returncode == 0, r.stderr
    assert not any(c.startswith("builds submit") for c in calls)  # --no-build
    assert any(c.startswith("compute firewall-rules describe") for c in calls)
    assert not any(c.startswith("compute firewall-rules create") for c in calls)  # it exists: skipped
    assert any(c.startswith("artifacts repositories create") for c in calls)  # describe failed: created
    assert any(c.startswith("compute health-checks create http") for c in calls)
    (vm,) = [c for c in calls if c.startswith("compute instances create")]
    user_data = Path(re.search(r"--metadata-from-file=user-data=(\S+)", vm).group(1))
    assert IMAGE in Path(f"{fake_gcloud.log}.user-data").read_text()  # gcloud could read it during the call
    assert not user_data.exists()  # and the temp file is gone afterwards
    assert "curl -T sign.png http://203.0.113.7:8080/predictions/gtsrb" in r.stdout


def test_real_run_stops_at_the_first_failure(fake_gcloud):
    r, calls = fake_gcloud("scale-out", "--no-build", FAKE_FAIL="instance-templates create")
    assert r.returncode != 0
    assert "instance-templates create" in r.stderr and "Traceback" not in r.stderr
    assert calls[-1].startswith("compute instance-templates create")  # nothing ran after it
    assert not any("instance-groups managed create" in c for c in calls)


def test_real_teardown_goes_on_past_missing_resources_and_reports_them(fake_gcloud):
    r, calls = fake_gcloud("teardown", FAKE_FAIL="forwarding-rules delete")
    assert r.returncode == 1
    assert len(calls) == len(gce.teardown_commands(gce.Config(project=PROJECT, zone=ZONE)))  # all were tried
    assert "forwarding-rules delete" in r.stderr and "url-maps delete" not in r.stderr


def test_real_build_needs_the_model_archive(fake_gcloud, tmp_path, monkeypatch):
    monkeypatch.setattr(gce, "MAR", gce.ROOT / "model_store" / "missing-for-test.mar")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(fake_gcloud.log))
    with pytest.raises(SystemExit, match="make archive"):
        gce.main(["deploy", "--project", PROJECT, "--zone", ZONE, "--tag", TAG])
    assert not fake_gcloud.log.exists()  # checked before any gcloud call
