"""Deploy gtsrb-serve to Compute Engine: one VM, or a load-balanced, autoscaled managed instance group.

    make archive                                                      # model_store/gtsrb.mar goes into the image
    python -m deploy.gce deploy    --project P --zone europe-west1-b  # build + push, firewall, health check, VM
    python -m deploy.gce scale-out --project P --zone europe-west1-b  # template, MIG, autoscaler, HTTP load balancer
    python -m deploy.gce teardown  --project P --zone europe-west1-b  # delete all of it again

Add --dry-run to print every gcloud command (a copyable shell script) and run nothing; it needs no gcloud.
`python -m deploy.gce <command> --help` lists the options. deploy/README.md explains what gets created.
"""

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CLOUD_INIT = HERE / "cloud-init.yaml"
CLOUDBUILD = "deploy/cloudbuild.yaml"  # relative: gcloud runs from ROOT, the build context
MAR = ROOT / "model_store" / "gtsrb.mar"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PORT = 8080  # the container publishes TorchServe's inference API only
# Where Google's health checkers and the global external Application Load Balancer's proxies connect from.
GOOGLE_LB_RANGES = ("130.211.0.0/22", "35.191.0.0/16")
ZONE_RE = re.compile(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$")  # europe-west1-b -> europe-west1


@dataclass(frozen=True)
class Config:
    project: str
    zone: str
    name: str = "gtsrb-serve"
    repo: str = "gtsrb"
    tag: str = "latest"
    machine_type: str = "e2-standard-2"
    network: str = "default"
    source_ranges: str = "0.0.0.0/0"
    torch_index_url: str = CPU_INDEX
    build: bool = True
    size: int = 2
    min_replicas: int = 2
    max_replicas: int = 4
    autoscale_on: str = "cpu"  # or "rps"
    target_cpu: float = 0.6
    max_rps: float = 500.0  # ~half of what one 2-core server does at concurrency 32 (BENCHMARKS.md)
    target_lb_utilization: float = 0.8
    initial_delay: int = 180
    keep_images: bool = False

    @property
    def region(self) -> str:
        m = ZONE_RE.match(self.zone)
        if not m:
            raise ValueError(f"not a Compute Engine zone: {self.zone!r} (expected e.g. europe-west1-b)")
        return m.group(1)

    @property
    def registry_host(self) -> str:
        return f"{self.region}-docker.pkg.dev"

    @property
    def image(self) -> str:
        return f"{self.registry_host}/{self.project}/{self.repo}/gtsrb-serve:{self.tag}"

    # Resource names, all derived from --name so two deployments can live in one project. The network tag
    # is the name too: both firewall rules select instances by it.
    @property
    def net_tag(self) -> str:
        return self.name

    @property
    def fw_public(self) -> str:
        return f"{self.name}-allow-{PORT}"

    @property
    def fw_lb(self) -> str:
        return f"{self.name}-allow-lb-{PORT}"

    @property
    def health_check(self) -> str:
        return f"{self.name}-hc"

    @property
    def template(self) -> str:
        return f"{self.name}-template"

    @property
    def mig(self) -> str:
        return f"{self.name}-mig"

    @property
    def backend(self) -> str:
        return f"{self.name}-backend"

    @property
    def url_map(self) -> str:
        return f"{self.name}-urlmap"

    @property
    def proxy(self) -> str:
        return f"{self.name}-proxy"

    @property
    def forwarding_rule(self) -> str:
        return f"{self.name}-http"


class Step(list):
    """One gcloud argv (a plain list, so tests compare it as one), plus how the runner treats it.

    note:     printed as a comment before the command, in dry runs and real runs.
    probe:    a `describe`: if it succeeds the resource exists and the runner skips the next step (its create).
    may_fail: teardown deletes; a resource that was never created must not stop the others being deleted.
    """

    def __init__(self, argv: list[str], note: str = "", *, probe: bool = False, may_fail: bool = False):
        super().__init__(argv)
        self.note, self.probe, self.may_fail = note, probe, may_fail


def gcloud(cfg: Config, *args: str) -> list[str]:
    return ["gcloud", *args, f"--project={cfg.project}"]


def ensure(cfg: Config, describe: list[str], create: list[str], note: str) -> list[Step]:
    """describe, then create only if describe failed: reruns reuse what exists instead of failing on it."""
    return [Step(gcloud(cfg, *describe), note, probe=True), Step(gcloud(cfg, *create))]


# ---------------------------------------------------------------------------------------------- commands


def build_commands(cfg: Config) -> list[Step]:
    """APIs, the Artifact Registry repository, and the image (Cloud Build, from the repo root)."""
    steps = [
        Step(
            gcloud(cfg, "services", "enable", "compute.googleapis.com", "artifactregistry.googleapis.com",
                   "cloudbuild.googleapis.com"),
            "APIs used below (a no-op when already enabled)",
        ),
        *ensure(
            cfg,
            ["artifacts", "repositories", "describe", cfg.repo, f"--location={cfg.region}"],
            ["artifacts", "repositories", "create", cfg.repo, "--repository-format=docker",
             f"--location={cfg.region}", "--description=gtsrb-serve images"],
            f"Artifact Registry repository {cfg.repo}: created only if this describe fails",
        ),
    ]  # fmt: skip
    if cfg.build:
        steps.append(Step(
            gcloud(cfg, "builds", "submit", f"--config={CLOUDBUILD}",
                   f"--substitutions=_IMAGE={cfg.image},_TORCH_INDEX_URL={cfg.torch_index_url}", "."),
            "build the image from the repo root (.gcloudignore decides what is uploaded) and push it",
        ))  # fmt: skip
    return steps


def health_check_commands(cfg: Config) -> list[Step]:
    # /ping on 8080 is the only GET health endpoint TorchServe publishes there. It says Healthy even when the
    # model failed to load; the watchdog in cloud-init covers that case from Docker's READY-based HEALTHCHECK.
    return ensure(
        cfg,
        ["compute", "health-checks", "describe", cfg.health_check, "--global"],
        ["compute", "health-checks", "create", "http", cfg.health_check, "--global", f"--port={PORT}",
         "--request-path=/ping", "--check-interval=10s", "--timeout=5s", "--healthy-threshold=2",
         "--unhealthy-threshold=3"],
        f"HTTP health check: GET /ping on port {PORT} (used by the MIG's autohealing and the load balancer)",
    )  # fmt: skip


def vm_flags(cfg: Config, user_data: str) -> list[str]:
    """What the single VM and the instance template share: COS, the cloud-init, the tag, Shielded VM."""
    return [
        f"--machine-type={cfg.machine_type}",
        f"--network={cfg.network}",
        # Container-Optimized OS runs the container from cloud-init + systemd; the old create-with-container
        # agent (konlet) is deprecated.
        "--image-family=cos-stable",
        "--image-project=cos-cloud",
        "--boot-disk-size=20GB",  # the CPU torch image unpacks to a few GB; COS's 10 GB default is tight
        f"--tags={cfg.net_tag}",
        # The default service account's token must reach Artifact Registry (pull) and Cloud Logging (gcplogs).
        "--scopes=cloud-platform",
        f"--metadata-from-file=user-data={user_data}",
        "--shielded-secure-boot",
        "--shielded-vtpm",
        "--shielded-integrity-monitoring",
    ]


def deploy_commands(cfg: Config, user_data: str) -> list[Step]:
    """One VM serving :8080 to --source-ranges."""
    return [
        *build_commands(cfg),
        *ensure(
            cfg,
            ["compute", "firewall-rules", "describe", cfg.fw_public],
            ["compute", "firewall-rules", "create", cfg.fw_public, f"--network={cfg.network}", "--direction=INGRESS",
             "--action=ALLOW", f"--rules=tcp:{PORT}", f"--target-tags={cfg.net_tag}",
             f"--source-ranges={cfg.source_ranges}", "--description=gtsrb-serve inference API only"],
            f"firewall: tcp:{PORT} only, to instances tagged {cfg.net_tag} only, from {cfg.source_ranges}",
        ),
        *health_check_commands(cfg),
        Step(
            gcloud(cfg, "compute", "instances", "create", cfg.name, f"--zone={cfg.zone}", *vm_flags(cfg, user_data)),
            f"the VM: pulls {cfg.image} at boot and runs it under systemd",
        ),
    ]  # fmt: skip


def scale_out_commands(cfg: Config, user_data: str) -> list[Step]:
    """Instance template -> MIG with autohealing -> backend service -> URL map -> HTTP proxy -> :80 forwarding rule.

    Standalone: it builds the image too (unless --no-build) and creates the health check if `deploy` has not.
    """
    if cfg.autoscale_on == "rps":
        # RATE mode defines a backend's capacity as max-rate-per-instance; the autoscaler keeps the group at
        # target_lb_utilization of it, i.e. about max_rps * target_lb_utilization requests/s per VM.
        balancing = ["--balancing-mode=RATE", f"--max-rate-per-instance={cfg.max_rps:g}"]
        signal = [f"--target-load-balancing-utilization={cfg.target_lb_utilization:g}"]
    else:
        balancing = ["--balancing-mode=UTILIZATION", "--max-utilization=0.8"]
        signal = [f"--target-cpu-utilization={cfg.target_cpu:g}"]
    return [
        *build_commands(cfg),
        *health_check_commands(cfg),
        *ensure(
            cfg,
            ["compute", "firewall-rules", "describe", cfg.fw_lb],
            ["compute", "firewall-rules", "create", cfg.fw_lb, f"--network={cfg.network}", "--direction=INGRESS",
             "--action=ALLOW", f"--rules=tcp:{PORT}", f"--target-tags={cfg.net_tag}",
             f"--source-ranges={','.join(GOOGLE_LB_RANGES)}",
             "--description=Google health checkers and load balancer proxies to gtsrb-serve"],
            f"firewall: tcp:{PORT} from Google's health-check / load-balancer ranges only",
        ),
        Step(
            gcloud(cfg, "compute", "instance-templates", "create", cfg.template, *vm_flags(cfg, user_data)),
            "instance template: the same COS + cloud-init VM as `deploy`",
        ),
        Step(
            gcloud(cfg, "compute", "instance-groups", "managed", "create", cfg.mig, f"--zone={cfg.zone}",
                   f"--template={cfg.template}", f"--size={cfg.size}", f"--base-instance-name={cfg.name}",
                   f"--health-check={cfg.health_check}", f"--initial-delay={cfg.initial_delay}"),
            f"managed instance group; autohealing recreates a VM whose /ping fails, after a {cfg.initial_delay} s "
            "grace period for boot, image pull and model load",
        ),
        Step(
            gcloud(cfg, "compute", "instance-groups", "managed", "set-named-ports", cfg.mig, f"--zone={cfg.zone}",
                   f"--named-ports=http:{PORT}"),
            f"the backend service reaches the VMs through the named port http -> {PORT}",
        ),
        Step(
            gcloud(cfg, "compute", "backend-services", "create", cfg.backend, "--global",
                   "--load-balancing-scheme=EXTERNAL_MANAGED", "--protocol=HTTP", "--port-name=http",
                   f"--health-checks={cfg.health_check}", "--timeout=30s"),
            "backend service of a global external Application Load Balancer; sends traffic only to healthy VMs",
        ),
        Step(
            gcloud(cfg, "compute", "backend-services", "add-backend", cfg.backend, "--global",
                   f"--instance-group={cfg.mig}", f"--instance-group-zone={cfg.zone}", *balancing),
        ),
        # After add-backend: scaling on load-balancing utilization reads the capacity defined just above.
        Step(
            gcloud(cfg, "compute", "instance-groups", "managed", "set-autoscaling", cfg.mig, f"--zone={cfg.zone}",
                   f"--min-num-replicas={cfg.min_replicas}", f"--max-num-replicas={cfg.max_replicas}",
                   f"--cool-down-period={cfg.initial_delay}", *signal),
            f"autoscaling on {'requests per second' if cfg.autoscale_on == 'rps' else 'CPU utilization'}",
        ),
        Step(gcloud(cfg, "compute", "url-maps", "create", cfg.url_map, "--global", f"--default-service={cfg.backend}")),
        Step(gcloud(cfg, "compute", "target-http-proxies", "create", cfg.proxy, "--global", f"--url-map={cfg.url_map}")),
        Step(
            gcloud(cfg, "compute", "forwarding-rules", "create", cfg.forwarding_rule, "--global",
                   "--load-balancing-scheme=EXTERNAL_MANAGED", f"--target-http-proxy={cfg.proxy}", "--ports=80"),
            "public entry point: an ephemeral global IP, port 80",
        ),
    ]  # fmt: skip


def teardown_commands(cfg: Config) -> list[Step]:
    """Everything deploy and scale-out create, newest first, so nothing is deleted while something uses it."""

    def delete(*args: str, note: str = "") -> Step:
        return Step(gcloud(cfg, *args, "--quiet"), note, may_fail=True)

    on_failure = "a delete that fails (never created) is reported at the end; the others still run"

    steps = [
        delete("compute", "forwarding-rules", "delete", cfg.forwarding_rule, "--global", note=on_failure),
        delete("compute", "target-http-proxies", "delete", cfg.proxy, "--global"),
        delete("compute", "url-maps", "delete", cfg.url_map, "--global"),
        delete("compute", "backend-services", "delete", cfg.backend, "--global"),
        delete("compute", "instance-groups", "managed", "delete", cfg.mig, f"--zone={cfg.zone}"),  # + its autoscaler
        delete("compute", "instance-templates", "delete", cfg.template),
        delete("compute", "firewall-rules", "delete", cfg.fw_lb),
        delete("compute", "instances", "delete", cfg.name, f"--zone={cfg.zone}"),
        delete("compute", "health-checks", "delete", cfg.health_check, "--global"),
        delete("compute", "firewall-rules", "delete", cfg.fw_public),
    ]
    if not cfg.keep_images:
        steps.append(delete("artifacts", "repositories", "delete", cfg.repo, f"--location={cfg.region}"))
    return steps


# ------------------------------------------------------------------------------------------------ helpers


def render_cloud_init(cfg: Config) -> str:
    # string.Template ($image, $registry_host) leaves Docker's Go-template braces {{...}} alone.
    return Template(CLOUD_INIT.read_text()).substitute(image=cfg.image, registry_host=cfg.registry_host)


def write_cloud_init(cfg: Config) -> Path:
    fd, path = tempfile.mkstemp(prefix="gtsrb-cloud-init-", suffix=".yaml")
    with open(fd, "w") as f:
        f.write(render_cloud_init(cfg))
    return Path(path)


def default_tag() -> str:
    """The short commit of the checkout. It names the code, not model_store/gtsrb.mar (git-ignored): pass
    --tag when only the model changed, or the new image overwrites the old one under the same tag."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "latest"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "latest"


def vm_ip_command(cfg: Config) -> list[str]:
    return gcloud(cfg, "compute", "instances", "describe", cfg.name, f"--zone={cfg.zone}",
                  "--format=get(networkInterfaces[0].accessConfigs[0].natIP)")  # fmt: skip


def lb_ip_command(cfg: Config) -> list[str]:
    return gcloud(cfg, "compute", "forwarding-rules", "describe", cfg.forwarding_rule, "--global",
                  "--format=get(IPAddress)")  # fmt: skip


def run(steps: list[Step], dry_run: bool) -> list[Step]:
    """Print (dry run) or run the steps in order; returns the may_fail steps that failed."""
    failed: list[Step] = []
    skip_next = False
    for step in steps:
        if step.note:
            print(f"# {step.note}")
        if skip_next:
            print(f"# exists already, skipped: {shlex.join(step)}")
            skip_next = False
            continue
        if dry_run:
            print(shlex.join(step))
            continue
        print(f"+ {shlex.join(step)}", flush=True)
        if step.probe:
            found = subprocess.run(step, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            skip_next = found.returncode == 0
            continue
        try:
            subprocess.run(step, cwd=ROOT, check=True)
        except subprocess.CalledProcessError as e:
            if not step.may_fail:
                sys.exit(f"error: exit code {e.returncode} from: {shlex.join(step)}\nnothing after it was run.")
            failed.append(step)
    return failed


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", required=True, help="Google Cloud project id")
    common.add_argument("--zone", required=True, help="e.g. europe-west1-b; the registry uses its region")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    common.add_argument("--name", default="gtsrb-serve", help="VM name, network tag and prefix of every resource")
    common.add_argument("--repo", default="gtsrb", help="Artifact Registry repository (default: %(default)s)")
    common.add_argument("--tag", default=None, help="image tag (default: the short git commit, else 'latest')")

    build = argparse.ArgumentParser(add_help=False)
    build.add_argument("--machine-type", default="e2-standard-2", help="default: %(default)s")
    build.add_argument("--network", default="default", help="VPC network (default: %(default)s)")
    build.add_argument("--torch-index-url", default=CPU_INDEX, help="pip index for torch in the image")
    build.add_argument("--no-build", dest="build", action="store_false",
                       help="skip Cloud Build: use the image already pushed under --tag")  # fmt: skip

    p = argparse.ArgumentParser(prog="python -m deploy.gce", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", parents=[common, build], help="build, push, firewall, health check, one VM")
    d.add_argument("--source-ranges", default="0.0.0.0/0", help="who may reach :8080 (default: %(default)s)")
    s = sub.add_parser("scale-out", parents=[common, build], help="MIG + autoscaling + HTTP load balancer on :80")
    s.add_argument("--size", type=int, default=2, help="initial number of VMs (default: %(default)s)")
    s.add_argument("--min-replicas", type=int, default=None, help="autoscaler minimum (default: --size)")
    s.add_argument("--max-replicas", type=int, default=4, help="autoscaler maximum (default: %(default)s)")
    s.add_argument("--autoscale-on", choices=("cpu", "rps"), default="cpu", help="signal (default: %(default)s)")
    s.add_argument("--target-cpu", type=float, default=0.6, help="CPU utilization target (default: %(default)s)")
    s.add_argument("--max-rps", type=float, default=Config.max_rps,
                   help="rps: requests/s one VM is worth to the load balancer (default: %(default)s)")  # fmt: skip
    s.add_argument("--target-lb-utilization", type=float, default=0.8,
                   help="rps: fraction of --max-rps the autoscaler aims for (default: %(default)s)")  # fmt: skip
    s.add_argument("--initial-delay", type=int, default=180,
                   help="seconds a new VM gets to boot and load the model (default: %(default)s)")  # fmt: skip
    t = sub.add_parser("teardown", parents=[common], help="delete everything deploy and scale-out create")
    t.add_argument("--keep-images", action="store_true", help="keep the Artifact Registry repository")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    known = Config.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    values["tag"] = args.tag or default_tag()
    if getattr(args, "min_replicas", None) is None and "size" in values:
        values["min_replicas"] = values["size"]
    cfg = Config(**values)
    try:
        cfg.region  # noqa: B018 - validate the zone before anything is printed or run
    except ValueError as e:
        sys.exit(f"error: {e}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if not args.dry_run and shutil.which("gcloud") is None:
        sys.exit(
            "error: gcloud not found on PATH. Install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
            " and run `gcloud auth login`, or add --dry-run to only print the commands."
        )
    building = args.command != "teardown" and cfg.build
    if building and not MAR.is_file():
        if not args.dry_run:
            sys.exit(f"error: {MAR.relative_to(ROOT)} is missing; run `make archive` first (it goes into the image)")
        print(f"# warning: {MAR.relative_to(ROOT)} is missing; run `make archive` before a real run")

    mode = "dry run: nothing is executed" if args.dry_run else "running"
    print(f"# gtsrb-serve {args.command} ({mode}); project {cfg.project}, zone {cfg.zone}, image {cfg.image}")
    # Commands run from the repo root (the build context); a dry run's script says so itself.
    print(f"cd {shlex.quote(str(ROOT))}" if args.dry_run else f"# in {ROOT}")
    user_data = None
    try:
        if args.command == "teardown":
            steps = teardown_commands(cfg)
        else:
            user_data = write_cloud_init(cfg)
            print(f"# cloud-init rendered from deploy/cloud-init.yaml to {user_data}")
            make = deploy_commands if args.command == "deploy" else scale_out_commands
            steps = make(cfg, str(user_data))
        failed = run(steps, args.dry_run)
    finally:
        # A real run is done with the file once gcloud has read it; a dry run's commands still point at it.
        if user_data and not args.dry_run:
            user_data.unlink(missing_ok=True)

    if failed:
        print("# these deletes failed (harmless for resources that never existed; check the others):", file=sys.stderr)
        for step in failed:
            print(f"#   {shlex.join(step)}", file=sys.stderr)
        return 1
    if args.command == "deploy":
        wait = "the VM has booted, pulled the image and loaded the model (about 3 minutes)"
        print_next_steps(vm_ip_command(cfg), f"http://$IP:{PORT}", args.dry_run, wait)
    elif args.command == "scale-out":
        wait = "the VMs pass the health check and the load balancer is programmed (5-10 minutes)"
        print_next_steps(lb_ip_command(cfg), "http://$IP", args.dry_run, wait)
    return 0


def print_next_steps(ip_command: list[str], base_url: str, dry_run: bool, wait_for: str) -> None:
    ip = ""
    if not dry_run:
        out = subprocess.run(ip_command, capture_output=True, text=True)
        ip = out.stdout.strip() if out.returncode == 0 else ""
    print(f"# then, once {wait_for}:")
    if ip:
        print(f"curl -T sign.png {base_url.replace('$IP', ip)}/predictions/gtsrb")
    else:
        print(f"IP=$({shlex.join(ip_command)})")
        print(f"curl -T sign.png {base_url}/predictions/gtsrb")


if __name__ == "__main__":
    sys.exit(main())
