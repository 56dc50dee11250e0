"""deploy/gce.py: the gcloud commands it would run (dry runs without gcloud), the cloud-init it renders, and how
a real run behaves (a fake gcloud on PATH records the calls). No network, no Google Cloud account.

What a deployment must be by default (issue 12, item 5): not open to the internet except through an HTTPS load
balancer with a managed certificate, IAP and a Cloud Armor rate limit; VMs without public addresses and with a
dedicated, minimal service account; no metadata server from the container; health checks on model READY.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import commands, gce
from tests.conftest import fake_command

ROOT = Path(__file__).resolve().parent.parent
PROJECT, ZONE, TAG, DOMAIN = "demo-proj-123", "europe-west1-b", "abc1234", "signs.example.com"
MEMBER = "serviceAccount:client@demo-proj-123.iam.gserviceaccount.com"
IMAGE = f"europe-west1-docker.pkg.dev/{PROJECT}/gtsrb/gtsrb-serve:{TAG}"
DIGEST = "sha256:" + "ab" * 32
BY_DIGEST = f"europe-west1-docker.pkg.dev/{PROJECT}/gtsrb/gtsrb-serve@{DIGEST}"
SA = f"gtsrb-serve-vm@{PROJECT}.iam.gserviceaccount.com"
LB_RANGES = {"130.211.0.0/22", "35.191.0.0/16"}
SECURE = ("--domain", DOMAIN, "--iap-member", MEMBER)
VERBS = {"create", "delete", "describe", "add-backend", "set-named-ports", "set-autoscaling", "enable", "submit",
         "update", "update-backend", "add-iam-policy-binding", "remove-iam-policy-binding", "list-instances",
         "list", "start-update", "wait-until"}  # fmt: skip
# Flags whose value names another resource, and that resource's kind.
REFERENCES = {
    "--template": "compute instance-templates",
    "--health-check": "compute health-checks",
    "--health-checks": "compute health-checks",
    "--instance-group": "compute instance-groups managed",
    "--default-service": "compute backend-services",
    "--service": "compute backend-services",
    "--url-map": "compute url-maps",
    "--target-https-proxy": "compute target-https-proxies",
    "--ssl-certificates": "compute ssl-certificates",
    "--ssl-policy": "compute ssl-policies",
    "--address": "compute addresses",
    "--security-policy": "compute security-policies",
    "--router": "compute routers",
    "--service-account": "iam service-accounts",
    "--network": "compute networks",
    "--subnet": "compute networks subnets",
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

    def cloud_init(self) -> dict:
        doc = yaml.safe_load(self.user_data.read_text())
        return {f["path"]: f["content"] for f in doc["write_files"]} | {"runcmd": doc["runcmd"]}


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
    if words[:i] == ["compute", "security-policies", "rules"]:
        return "compute security-policies", f"rule-{words[i]}", flags(argv)["--security-policy"]
    if words[:i] == ["iam", "service-accounts"] and words[i] == "create":
        rest = [f"{rest[0]}@{PROJECT}.iam.gserviceaccount.com"]  # created by account id, used by email
    return " ".join(words[:i]), words[i], rest[0] if rest else None


def created(cmds: list[list[str]]) -> list[tuple[str, str]]:
    """Resources in the order they are first created."""
    out = []
    for argv in cmds:
        kind, verb, name = resource(argv)
        if verb == "create" and (kind, name) not in out:
            out.append((kind, name))
    return out


def docker_run_argv(unit: str) -> list[str]:
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.fixture(scope="module")
def runs():
    made = {
        "deploy": DryRun("deploy", *SECURE),
        "demo": DryRun("deploy", "--public-http-demo"),
        "scale-out": DryRun("scale-out"),
        "teardown": DryRun("teardown"),
        "drift-logs": DryRun("drift-logs"),
    }
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


def test_the_secure_default_needs_a_domain_and_keeps_demo_options_apart():
    for args, message in (
        ((), "needs --domain"),
        (("--public-http-demo", "--domain", DOMAIN), "plain HTTP"),
        (("--domain", DOMAIN, "--source-ranges", "0.0.0.0/0"), "admits the load balancer only"),
    ):
        r = cli("deploy", "--project", PROJECT, "--zone", ZONE, "--dry-run", *args)
        assert r.returncode == 2 and message in r.stderr and not r.stdout, (args, r.stderr)
    nobody = DryRun("deploy", "--domain", DOMAIN)  # no --iap-member: said loudly, nobody is let in
    nobody.user_data.unlink()
    assert "IAP will let nobody through" in nobody.out and not nobody.find("iap", "web", "add-iam-policy-binding")


def test_only_https_through_the_load_balancer_reaches_the_vms(runs):
    run = runs["deploy"]
    rules = {resource(r)[2]: flags(r) for r in run.find("compute", "firewall-rules", "create")}
    assert set(rules) == {"gtsrb-serve-allow-lb", "gtsrb-serve-allow-iap-ssh", "gtsrb-serve-deny-all"}
    lb, ssh = rules["gtsrb-serve-allow-lb"], rules["gtsrb-serve-allow-iap-ssh"]
    assert (lb["--rules"], set(lb["--source-ranges"].split(","))) == ("tcp:8080", LB_RANGES)
    assert (ssh["--rules"], ssh["--source-ranges"]) == ("tcp:22", "35.235.240.0/20")  # IAP TCP forwarding only
    assert all(r["--direction"] == "INGRESS" and r["--target-tags"] == "gtsrb-serve" for r in rules.values())
    assert [n for n, r in rules.items() if "0.0.0.0/0" in r["--source-ranges"]] == ["gtsrb-serve-deny-all"]
    # The VMs have no public address; they go out through Cloud NAT.
    template = flags(run.one("compute", "instance-templates", "create"))
    assert template["--no-address"] is True and template["--tags"] == "gtsrb-serve"
    nat = flags(run.one("compute", "routers", "nats", "create"))
    assert nat["--router"] == "gtsrb-serve-router" and nat["--nat-all-subnet-ip-ranges"] is True
    # The one public entry point: HTTPS on 443 with a Google-managed certificate for --domain, modern TLS.
    (rule,) = run.find("compute", "forwarding-rules", "create")
    assert (flags(rule)["--ports"], flags(rule)["--target-https-proxy"]) == ("443", "gtsrb-serve-https-proxy")
    assert not run.find("compute", "target-http-proxies", "create")
    assert flags(run.one("compute", "ssl-certificates", "create"))["--domains"] == DOMAIN
    tls = flags(run.one("compute", "ssl-policies", "create"))
    assert (tls["--profile"], tls["--min-tls-version"]) == ("MODERN", "1.2")
    proxy = flags(run.one("compute", "target-https-proxies", "create"))
    assert (proxy["--ssl-certificates"], proxy["--ssl-policy"]) == ("gtsrb-serve-cert", "gtsrb-serve-tls")


def test_the_vms_network_admits_nothing_else_and_login_is_by_os_login(runs):
    """ "LB ranges only" holds whatever the network allows: the VMs get a network of their own (no default
    allow-internal/allow-ssh), and on a network given with --network (the default one, say) a deny of all other
    ingress for their tag outranks its rules. SSH is by IAM identity (OS Login), project-wide keys blocked."""
    for name in ("deploy", "demo"):
        run = runs[name]
        net = run.one("compute", "networks", "create")
        assert resource(net)[2] == "gtsrb-serve-net" and flags(net)["--subnet-mode"] == "custom"
        subnet = flags(run.one("compute", "networks", "subnets", "create"))
        assert subnet["--network"] == "gtsrb-serve-net" and subnet["--enable-private-ip-google-access"] is True
        rules = {resource(r)[2]: flags(r) for r in run.find("compute", "firewall-rules", "create")}
        deny = rules.pop("gtsrb-serve-deny-all")
        assert (deny["--action"], deny["--rules"], deny["--source-ranges"]) == ("DENY", "all", "0.0.0.0/0")
        assert all(r["--action"] == "ALLOW" and int(r["--priority"]) < int(deny["--priority"]) for r in rules.values())
        assert int(deny["--priority"]) < 65534  # the default network's allow-internal and allow-ssh
        assert all(r["--network"] == "gtsrb-serve-net" for r in [deny, *rules.values()])
        vm = flags(
            (run.find("compute", "instance-templates", "create") or run.find("compute", "instances", "create"))[0]
        )
        assert (vm["--network"], vm["--subnet"]) == ("gtsrb-serve-net", "gtsrb-serve-subnet")
        assert set(vm["--metadata"].split(",")) == {"enable-oslogin=TRUE", "block-project-ssh-keys=TRUE"}
    existing = DryRun("deploy", *SECURE, "--network", "default")
    existing.user_data.unlink()
    assert not existing.find("compute", "networks", "create") and not existing.find("compute", "networks", "subnets")
    rules = [flags(r) for r in existing.find("compute", "firewall-rules", "create")]
    assert {r["--network"] for r in rules} == {"default"} and "DENY" in {r["--action"] for r in rules}
    assert "--subnet" not in flags(existing.one("compute", "instance-templates", "create"))


def test_callers_are_authenticated_by_iap_and_rate_limited_by_cloud_armor(runs):
    run = runs["deploy"]
    updates = [flags(u) for u in run.find("compute", "backend-services", "update")]
    assert {"--iap": "enabled", "--global": True} in [
        {k: u[k] for k in u if k in ("--iap", "--global")} for u in updates
    ]
    assert "iap.googleapis.com" in run.one("services", "enable")
    (grant,) = run.find("iap", "web", "add-iam-policy-binding")
    assert flags(grant) | {"--project": None} == {
        "--resource-type": "backend-services", "--service": "gtsrb-serve-backend", "--member": MEMBER,
        "--role": "roles/iap.httpsResourceAccessor", "--project": None,
    }  # fmt: skip
    throttle = flags(run.one("compute", "security-policies", "rules", "create"))
    assert (throttle["--action"], throttle["--enforce-on-key"], throttle["--exceed-action"]) == (
        "throttle",
        "IP",
        "deny-429",
    )
    assert (throttle["--rate-limit-threshold-count"], throttle["--rate-limit-threshold-interval-sec"]) == ("600", "60")
    assert any(u.get("--security-policy") == "gtsrb-serve-armor" for u in updates)
    tighter = DryRun("deploy", *SECURE, "--rate-limit", "120")
    tighter.user_data.unlink()
    assert (
        flags(tighter.one("compute", "security-policies", "rules", "create"))["--rate-limit-threshold-count"] == "120"
    )


def test_vms_run_as_a_dedicated_service_account_with_only_the_roles_they_need(runs):
    run = runs["deploy"]
    assert resource(run.one("iam", "service-accounts", "create"))[2] == SA
    project_roles = {flags(b)["--role"] for b in run.find("projects", "add-iam-policy-binding")}
    assert project_roles == {"roles/logging.logWriter", "roles/monitoring.metricWriter"}
    repo = flags(run.one("artifacts", "repositories", "add-iam-policy-binding"))
    assert (repo["--role"], repo["--member"]) == ("roles/artifactregistry.reader", f"serviceAccount:{SA}")
    assert all(flags(b)["--member"] == f"serviceAccount:{SA}" for b in run.find("projects", "add-iam-policy-binding"))
    for name in ("deploy", "demo"):
        vm = flags((runs[name].find("compute", "instance-templates", "create") or
                    runs[name].find("compute", "instances", "create"))[0])  # fmt: skip
        assert vm["--service-account"] == SA
        assert set(vm["--scopes"].split(",")) == {"logging-write", "monitoring-write", "storage-ro"}
        assert "cloud-platform" not in vm["--scopes"]


def test_health_checks_ask_for_model_ready_not_ping(runs):
    """Routing asks /ready (a worker READY); autohealing has its own, lenient check: a VM is recreated only after
    5 minutes without a READY worker, never for a worker or container restart."""
    run = runs["deploy"]
    checks = {resource(hc)[2]: hc for hc in run.find("compute", "health-checks", "create")}
    assert set(checks) == {"gtsrb-serve-hc", "gtsrb-serve-hc-autoheal"}
    for hc in checks.values():
        assert hc[3:5] == ["create", "http"]
        assert (flags(hc)["--port"], flags(hc)["--request-path"]) == ("8080", "/ready")
    assert "/ping" not in " ".join(" ".join(c) for c in run.commands)
    # /ready is what HAProxy answers from the model's readiness (docker/haproxy.cfg, tested in test_container).
    assert "if { path /ready } { nbsrv(torchserve) ge 1 }" in (ROOT / "docker" / "haproxy.cfg").read_text()

    def seconds_to_unhealthy(hc) -> int:
        f = flags(hc)
        return int(f["--check-interval"].rstrip("s")) * int(f["--unhealthy-threshold"])

    assert seconds_to_unhealthy(checks["gtsrb-serve-hc"]) == 30
    assert seconds_to_unhealthy(checks["gtsrb-serve-hc-autoheal"]) >= 300
    mig = flags(run.one("compute", "instance-groups", "managed", "create"))
    assert mig["--health-check"] == "gtsrb-serve-hc-autoheal" and int(mig["--initial-delay"]) >= 120
    backend = flags(run.one("compute", "backend-services", "create"))
    assert backend["--health-checks"] == "gtsrb-serve-hc" and backend["--connection-draining-timeout"] == "60"


def test_each_resource_is_created_before_it_is_used(runs):
    for name in ("deploy", "demo"):
        run = runs[name]
        made: set[tuple[str, str]] = set()
        for argv in run.commands:
            kind, verb, res = resource(argv)
            for flag, value in flags(argv).items():
                if flag in REFERENCES:
                    assert (REFERENCES[flag], value) in made, f"{shlex.join(argv)} uses {value} before it exists"
            if verb == "create":
                made.add((kind, res))
    run = runs["deploy"]
    pipeline = [run.index(*w) for w in (("compute", "instance-templates", "create"),
                                        ("compute", "instance-groups", "managed", "create"),
                                        ("compute", "backend-services", "create"),
                                        ("compute", "backend-services", "add-backend"),
                                        ("compute", "url-maps", "create"),
                                        ("compute", "target-https-proxies", "create"),
                                        ("compute", "forwarding-rules", "create"))]  # fmt: skip
    assert pipeline == sorted(pipeline)
    first_fw = min(run.commands.index(c) for c in run.find("compute", "firewall-rules", "create"))
    assert first_fw < pipeline[1]  # health checks reach the first VMs
    roles = [run.commands.index(c) for c in run.find("projects", "add-iam-policy-binding")]
    assert max(roles) < pipeline[0]  # the account can write logs before a VM boots
    scheme = flags(run.one("compute", "backend-services", "create"))["--load-balancing-scheme"]
    assert flags(run.one("compute", "forwarding-rules", "create"))["--load-balancing-scheme"] == scheme


def test_public_http_demo_is_one_public_vm_behind_an_explicit_flag(runs):
    run = runs["demo"]
    assert "PUBLIC DEMO" in run.out
    rules = {resource(r)[2]: flags(r) for r in run.find("compute", "firewall-rules", "create")}
    assert set(rules) == {"gtsrb-serve-demo-allow-8080", "gtsrb-serve-allow-iap-ssh", "gtsrb-serve-deny-all"}
    rule = rules["gtsrb-serve-demo-allow-8080"]
    assert (rule["--rules"], rule["--source-ranges"]) == ("tcp:8080", "0.0.0.0/0")
    vm = flags(run.one("compute", "instances", "create"))
    assert "--no-address" not in vm and (vm["--image-family"], vm["--image-project"]) == ("cos-stable", "cos-cloud")
    for absent in ("forwarding-rules", "routers", "security-policies", "backend-services", "instance-templates"):
        assert not run.find("compute", absent, "create"), absent
    assert "iap.googleapis.com" not in run.one("services", "enable")
    narrowed = DryRun("deploy", "--public-http-demo", "--source-ranges", "203.0.113.0/24")
    narrowed.user_data.unlink()
    demo_rule = [r for r in narrowed.find("compute", "firewall-rules", "create") if "tcp:8080" in " ".join(r)]
    assert [flags(r)["--source-ranges"] for r in demo_rule] == ["203.0.113.0/24"]
    assert "curl -T sign.png http://$IP:8080/predictions/gtsrb" in run.out


def test_image_uri_registry_and_container_os(runs):
    run = runs["deploy"]
    build = run.one("builds", "submit")
    assert flags(build)["--config"] == "deploy/cloudbuild.yaml" and "." in build
    assert f"_IMAGE={IMAGE}" in flags(build)["--substitutions"].split(",")
    pinned = "debian:bookworm-20250520-slim@sha256:" + "0" * 64
    with_digest = DryRun("deploy", *SECURE, "--base-image", pinned)
    with_digest.user_data.unlink()
    assert f"_BASE_IMAGE={pinned}" in flags(with_digest.one("builds", "submit"))["--substitutions"].split(",")
    cloudbuild = yaml.safe_load((ROOT / "deploy" / "cloudbuild.yaml").read_text())
    assert "--build-arg=BASE_IMAGE=${_BASE_IMAGE}" in cloudbuild["steps"][0]["args"]
    assert cloudbuild["substitutions"]["_BASE_IMAGE"] in (ROOT / "Dockerfile").read_text()  # same default tag
    repo = flags(run.one("artifacts", "repositories", "create"))
    assert (repo["--location"], repo["--repository-format"]) == ("europe-west1", "docker")
    template = flags(run.one("compute", "instance-templates", "create"))
    assert (template["--image-family"], template["--image-project"]) == ("cos-stable", "cos-cloud")
    assert template["--metadata-from-file"] == f"user-data={run.user_data}" and run.user_data.is_file()
    assert template["--shielded-secure-boot"] is True
    for r in runs.values():  # the deprecated container startup agent is not used
        assert "create-with-container" not in r.out and "--container-image" not in r.out
    cfg = commands.Config(project="p-1", zone="northamerica-northeast1-a", repo="models", tag="v2")
    assert cfg.image == "northamerica-northeast1-docker.pkg.dev/p-1/models/gtsrb-serve:v2"
    bad = cli("deploy", "--project", PROJECT, "--zone", "europe-west1", "--dry-run", *SECURE)
    assert bad.returncode != 0 and "not a Compute Engine zone" in bad.stderr and not bad.stdout


def test_default_tag_is_the_git_commit():
    tag = gce.default_tag()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert tag == (head.stdout.strip() if head.returncode == 0 else "latest")


def test_shared_resources_are_created_only_when_missing(runs):
    run = runs["deploy"]
    made = {resource(c)[::2] for c in run.commands if resource(c)[1] == "create"}
    probed = set()
    for i, argv in enumerate(run.commands):
        # A describe with --format reads a value (the image's digest, the group's template); the others probe.
        if resource(argv)[1] == "describe" and not any(a.startswith("--format=") for a in argv):
            create = run.commands[i + 1]  # the runner skips the create when the describe succeeds
            assert resource(create)[::2] == resource(argv)[::2] and resource(create)[1] == "create", argv
            probed.add(resource(argv)[::2])
    for kind in ("artifacts repositories", "iam service-accounts", "compute health-checks", "compute routers",
                 "compute networks", "compute firewall-rules"):  # fmt: skip
        assert {m for m in made if m[0] == kind} <= probed, kind
    assert "created only if this describe fails" in run.out


def test_autoscaling_on_cpu_or_requests_per_second(runs):
    cpu = runs["scale-out"]
    scaling = flags(cpu.one("compute", "instance-groups", "managed", "set-autoscaling"))
    assert resource(cpu.one("compute", "instance-groups", "managed", "set-autoscaling"))[2] == "gtsrb-serve-mig"
    assert scaling["--target-cpu-utilization"] == "0.6" and "--target-load-balancing-utilization" not in scaling
    assert (scaling["--min-num-replicas"], scaling["--max-num-replicas"]) == ("1", "4")
    assert not cpu.find("compute", "backend-services", "update-backend")
    rps = DryRun("scale-out", "--autoscale-on", "rps", "--max-rps", "15", "--max-replicas", "6")
    backend = flags(rps.one("compute", "backend-services", "update-backend"))
    assert (backend["--balancing-mode"], backend["--max-rate-per-instance"]) == ("RATE", "15")
    scaling = flags(rps.one("compute", "instance-groups", "managed", "set-autoscaling"))
    assert "--target-load-balancing-utilization" in scaling and "--target-cpu-utilization" not in scaling
    assert scaling["--max-num-replicas"] == "6"
    # Load-balancing utilization is measured against the capacity that update-backend defines.
    assert rps.index("compute", "backend-services", "update-backend") < rps.index(
        "compute", "instance-groups", "managed", "set-autoscaling"
    )


def test_teardown_deletes_in_reverse_order_of_creation(runs):
    teardown = [a for a in runs["teardown"].commands if resource(a)[1] != "list"]  # the templates' list
    assert all(resource(argv)[1] in ("delete", "remove-iam-policy-binding") and "--quiet" in argv for argv in teardown)
    deletes = [resource(argv)[::2] for argv in teardown if resource(argv)[1] == "delete"]
    # Templates are named per rollout (deploy/rollout.py): teardown deletes each TEMPLATE the list shows.
    everything = [(k, "TEMPLATE" if k == "compute instance-templates" else n)
                  for k, n in created(runs["deploy"].commands + runs["demo"].commands)]  # fmt: skip
    assert sorted(deletes) == sorted(everything)  # everything both modes create, nothing else
    for mode in ("deploy", "demo"):  # and each mode's resources in reverse of that mode's order
        mine = [(k, "TEMPLATE" if k == "compute instance-templates" else n) for k, n in created(runs[mode].commands)]
        assert [d for d in deletes if d in mine] == mine[::-1], mode
    # The account's role bindings go before the account itself.
    removals = [teardown.index(a) for a in teardown if resource(a)[1] == "remove-iam-policy-binding"]
    assert len(removals) == 3 and max(removals) < teardown.index(
        runs["teardown"].one("iam", "service-accounts", "delete")
    )
    kept = DryRun("teardown", "--keep-images")
    assert ("artifacts repositories", "gtsrb") not in [
        resource(a)[::2] for a in kept.commands if resource(a)[1] == "delete"
    ]


# ----------------------------------------------------------------------------------------------- cloud-init


def test_rendered_cloud_init_runs_the_container_bounded_and_without_metadata_access(runs):
    text = runs["deploy"].user_data.read_text()
    assert text.splitlines()[0] == "#cloud-config"
    assert not re.search(r"\$(image|registry_host|memory|cpus|collector_image)\b", text)
    files = runs["deploy"].cloud_init()
    service = files["/etc/systemd/system/gtsrb.service"]
    argv = docker_run_argv(service)
    # By digest; a dry run cannot know it (a real run reads it: test_real_deploy_reuses_what_exists_and_cleans_up).
    assert argv[:2] == ["/usr/bin/docker", "run"] and argv[-1] == f"{IMAGE.rsplit(':', 1)[0]}@sha256:UNRESOLVED"
    # Locked down, with the flags docker/run.sh gives make docker-run (the container tests run those).
    locked = {"--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--pids-limit=512", "--cpus=1.8",
              "--tmpfs=/home/model-server/tmp:rw,nosuid,nodev,exec,size=256m,uid=10001,gid=0",
              "--tmpfs=/tmp:rw,nosuid,nodev,noexec,size=64m"}  # fmt: skip
    assert locked <= set(argv)
    run_sh = (ROOT / "docker" / "run.sh").read_text()
    for flag in locked - {"--cpus=1.8"}:
        assert flag.replace("=", " ", 1) in run_sh or flag in run_sh, flag
    published = [argv[i + 1] for i, a in enumerate(argv) if a in ("-p", "--publish")]
    # 8080 for the load balancer; the metrics only on the VM's loopback, for the collector on the VM.
    assert published == ["8080:8080", "127.0.0.1:8082:8082"] and "TS_METRICS_ADDRESS=http://0.0.0.0:8082" in argv
    assert not any(a.startswith(("-p=", "--publish=", "--net", "--privileged", "--cap-add")) for a in argv)
    assert "--memory=4g" in argv and "--memory-swap=4g" in argv and "--stop-timeout=45" in argv
    assert "--log-driver=gcplogs" in argv and "Restart=always" in service
    assert "ExecStop=/usr/bin/docker stop --time=45 gtsrb" in service  # the drain has time to finish
    # The input-statistics log (and the server's other logs) on the persistent disk, writable by the image's user.
    assert f"{commands.LOG_DIR}:/home/model-server/logs" in argv
    assert f"ExecStartPre=/usr/bin/install -d -o 10001 -g 0 -m 0775 {commands.LOG_DIR}" in service
    # Containers on the bridge cannot reach the metadata server (its tokens are the VM's); DNS there still works.
    pre = [line for line in service.splitlines() if "169.254.169.254" in line and line.startswith("ExecStartPre=")]
    assert any(" -I DOCKER-USER -d 169.254.169.254/32 -j REJECT" in line for line in pre)
    assert any("-p udp --dport 53 -j RETURN" in line for line in pre)
    assert "docker-credential-gcr configure-docker --registries europe-west1-docker.pkg.dev" in service
    watchdog = files["/etc/systemd/system/gtsrb-watchdog.service"]
    assert 'docker inspect -f "{{.State.Health.Status}}" gtsrb' in watchdog  # Go template braces survived
    assert "systemctl restart gtsrb.service" in watchdog
    assert files["runcmd"][:4] == ["systemctl daemon-reload", "systemctl start gtsrb.service",
                                   "systemctl start gtsrb-watchdog.timer", "systemctl start gtsrb-metrics.service"]  # fmt: skip
    # The demo VM boots the very same configuration.
    assert runs["demo"].user_data.read_text() == text
    bigger = DryRun("deploy", *SECURE, "--memory", "6g", "--machine-type", "e2-standard-4")
    assert "--memory=6g" in docker_run_argv(bigger.cloud_init()["/etc/systemd/system/gtsrb.service"])
    bigger.user_data.unlink()


def test_metrics_are_scraped_on_the_vm_into_managed_prometheus(runs):
    files = runs["deploy"].cloud_init()
    collector = docker_run_argv(files["/etc/systemd/system/gtsrb-metrics.service"])
    assert "--network=host" in collector and not any(a in ("-p", "--publish") for a in collector)
    assert collector[-2] == commands.COLLECTOR_IMAGE and collector[-1] == "--config=/etc/otelcol-google/config.yaml"
    assert "/etc/gtsrb/otelcol.yaml:/etc/otelcol-google/config.yaml:ro" in collector
    config = yaml.safe_load(files["/etc/gtsrb/otelcol.yaml"])
    (job,) = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8082"]}]  # the port gtsrb.service publishes
    assert config["service"]["pipelines"]["metrics"]["exporters"] == ["googlemanagedprometheus"]
    assert config["service"]["pipelines"]["metrics"]["receivers"] == ["prometheus"]


def test_drift_logs_copy_every_vm_input_log_through_iap(runs):
    run = runs["drift-logs"]
    listing = run.one("compute", "instance-groups", "managed", "list-instances")
    assert resource(listing)[2] == "gtsrb-serve-mig" and flags(listing)["--format"] == "value(name)"
    scp = run.one("compute", "scp")
    assert "--tunnel-through-iap" in scp
    assert f"INSTANCE:{commands.LOG_DIR}/gtsrb_inputs.jsonl*" in scp and "logs/deployed/INSTANCE/" in scp
    # make deploy-drift-report runs tools/drift_report.py on what was copied.
    makefile = (ROOT / "Makefile").read_text()
    assert "--log 'logs/deployed/*/gtsrb_inputs.jsonl*'" in makefile


# ---------------------------------------------------------------------------------------- real runs (no cloud)


def test_real_run_without_gcloud_fails_with_one_clear_line():
    r = cli("deploy", "--project", PROJECT, "--zone", ZONE, "--tag", TAG, *SECURE)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "gcloud not found on PATH" in r.stderr and "--dry-run" in r.stderr
    assert "Traceback" not in r.stderr and not r.stdout  # stopped before printing or running anything


FAKE_GCLOUD = """#!/bin/sh
# Records each call; describe fails unless it names $FAKE_EXISTING; anything matching $FAKE_FAIL fails.
printf '%s\\n' "$*" >> "$FAKE_LOG"
for a in "$@"; do
  case "$a" in --metadata-from-file=user-data=*) cp "${a#--metadata-from-file=user-data=}" "$FAKE_LOG.user-data" || exit 9;; esac
done
case "$*" in *"--format=get(address)"*) echo 203.0.113.7; exit 0;; esac
case "$*" in *"docker images describe"*) echo "sha256:$(printf 'ab%.0s' $(seq 32))"; exit 0;; esac
case "$*" in *"list-instances"*) printf 'gtsrb-serve-ab12\\ngtsrb-serve-cd34\\n'; exit 0;; esac
case "$*" in *"instanceTemplate.basename()"*)
  sed -n 's/.*instance-templates create \\([^ ]*\\).*/\\1/p' "$FAKE_LOG" | tail -1; exit 0;; esac
if [ -n "$FAKE_FAIL" ]; then case "$*" in *"$FAKE_FAIL"*) echo "fake failure" >&2; exit 7;; esac; fi
case "$*" in *" describe "*)
  if [ -n "$FAKE_EXISTING" ]; then case "$*" in *"$FAKE_EXISTING"*) exit 0;; esac; fi
  exit 1;;
esac
exit 0
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    path, log = fake_command(tmp_path, "gcloud", FAKE_GCLOUD)

    def run(*args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        r = cli(*args, "--project", PROJECT, "--zone", ZONE, "--tag", TAG, path=path, FAKE_LOG=str(log), **env)
        return r, log.read_text().splitlines() if log.exists() else []

    run.log = log
    return run


def test_real_deploy_reuses_what_exists_and_cleans_up(fake_gcloud):
    r, calls = fake_gcloud("deploy", *SECURE, "--no-build", FAKE_EXISTING="firewall-rules describe")
    assert r.returncode == 0, r.stderr
    assert not any(c.startswith("builds submit") for c in calls)  # --no-build
    assert any(c.startswith("compute firewall-rules describe") for c in calls)
    assert not any(c.startswith("compute firewall-rules create") for c in calls)  # they exist: skipped
    assert any(c.startswith("artifacts repositories create") for c in calls)  # describe failed: created
    (template,) = [c for c in calls if c.startswith("compute instance-templates create")]
    user_data = Path(re.search(r"--metadata-from-file=user-data=(\S+)", template).group(1))
    # gcloud could read it during the call, with the digest the build's describe returned
    assert f" {BY_DIGEST}\n" in Path(f"{fake_gcloud.log}.user-data").read_text()
    digest = next(i for i, c in enumerate(calls) if c.startswith("artifacts docker images describe"))
    assert calls[digest].split()[4] == IMAGE and digest < calls.index(template)
    assert not user_data.exists()  # and the temp file is gone afterwards
    assert f"point the DNS A record of {DOMAIN} at 203.0.113.7" in r.stdout
    assert f"https://{DOMAIN}/predictions/gtsrb" in r.stdout


def test_real_run_stops_at_the_first_failure(fake_gcloud):
    r, calls = fake_gcloud("deploy", *SECURE, "--no-build", FAKE_FAIL="instance-templates create")
    assert r.returncode != 0
    assert "instance-templates create" in r.stderr and "Traceback" not in r.stderr
    assert calls[-1].startswith("compute instance-templates create")  # nothing ran after it
    assert not any("instance-groups managed create" in c for c in calls)


def test_real_teardown_goes_on_past_missing_resources_and_reports_them(fake_gcloud):
    r, calls = fake_gcloud("teardown", FAKE_FAIL="forwarding-rules delete")
    assert r.returncode == 1
    # all tried, and the list of the templates to delete (none here)
    assert len(calls) == len(commands.teardown_commands(commands.Config(project=PROJECT, zone=ZONE))) + 1
    assert "forwarding-rules delete" in r.stderr and "url-maps delete" not in r.stderr


def test_real_drift_logs_copies_from_each_vm(fake_gcloud, tmp_path):
    r, calls = fake_gcloud("drift-logs", "--dest", str(tmp_path / "deployed"))
    assert r.returncode == 0, r.stderr
    scps = [c.split() for c in calls if c.startswith("compute scp")]
    vms = ("gtsrb-serve-ab12", "gtsrb-serve-cd34")  # what the fake's list-instances returned
    assert [s[-2] for s in scps] == [f"{tmp_path}/deployed/{vm}/" for vm in vms]
    assert all("--tunnel-through-iap" in s for s in scps)
    assert all((tmp_path / "deployed" / vm).is_dir() for vm in vms)  # scp needs the folder; the run made it


def test_real_build_needs_the_model_archive(fake_gcloud, tmp_path, monkeypatch):
    monkeypatch.setattr(gce, "MAR", gce.ROOT / "model_store" / "missing-for-test.mar")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(fake_gcloud.log))
    with pytest.raises(SystemExit, match="make archive"):
        gce.main(["deploy", "--project", PROJECT, "--zone", ZONE, "--tag", TAG, *SECURE])
    assert not fake_gcloud.log.exists()  # checked before any gcloud call
