"""Deploy gtsrb-serve to Compute Engine: private VMs behind an HTTPS load balancer with IAP and Cloud Armor.

    make archive                                                  # model_store/gtsrb.mar goes into the image
    python -m deploy.gce deploy --project P --zone europe-west1-b --domain signs.example.com \\
        --iap-member serviceAccount:client@P.iam.gserviceaccount.com
    python -m deploy.gce scale-out  --project P --zone europe-west1-b    # autoscaling of the group
    python -m deploy.gce drift-logs --project P --zone europe-west1-b    # the VMs' input logs -> logs/deployed/
    python -m deploy.gce teardown   --project P --zone europe-west1-b    # delete all of it again
    python -m deploy.gce deploy --project P --zone Z --public-http-demo  # one public VM, plain HTTP on :8080

Add --dry-run to print every gcloud command (a copyable shell script) and run nothing; it needs no gcloud.
deploy/commands.py holds the commands, deploy/README.md explains what gets created and why.
"""

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from string import Template

from deploy.commands import (
    Config,
    Step,
    address_command,
    copy_log_command,
    deploy_commands,
    instances_command,
    scale_out_commands,
    teardown_commands,
)

ROOT = Path(__file__).resolve().parent.parent
CLOUD_INIT = Path(__file__).resolve().parent / "cloud-init.yaml"
MAR = ROOT / "model_store" / "gtsrb.mar"
DRIFT_LOGS = "logs/deployed"  # relative to ROOT: make deploy-drift-report reads it


def render_cloud_init(cfg: Config) -> str:
    # string.Template ($image, ...) leaves Docker's Go-template braces {{...}} alone.
    from deploy.commands import COLLECTOR_IMAGE

    return Template(CLOUD_INIT.read_text()).substitute(
        image=cfg.image_by_digest, registry_host=cfg.registry_host, memory=cfg.memory, cpus=cfg.cpus,
        collector_image=COLLECTOR_IMAGE,
    )  # fmt: skip


def write_cloud_init(cfg: Config) -> Path:
    fd, path = tempfile.mkstemp(prefix="gtsrb-cloud-init-", suffix=".yaml")
    with open(fd, "w") as f:
        f.write(render_cloud_init(cfg))
    return Path(path)


def pin_digest(cfg: Config, digest: str, user_data: Path | None) -> None:
    """Rewrite the cloud-init (before any VM or template reads it) with the image by ``digest``."""
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        sys.exit(f"error: not an image digest: {digest!r}")
    if user_data:
        user_data.write_text(render_cloud_init(dataclasses.replace(cfg, digest=digest)))
        print(f"# the VMs run {dataclasses.replace(cfg, digest=digest).image_by_digest}")


def default_tag() -> str:
    """The short commit of the checkout. It names the code, not model_store/gtsrb.mar (git-ignored): pass
    --tag when only the model changed, or the new image overwrites the old one under the same tag."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "latest"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "latest"


def run(steps: list[Step], dry_run: bool, on_capture=None) -> list[Step]:
    """Print (dry run) or run the steps in order; returns the may_fail steps that failed. A capture step's
    output goes to ``on_capture``."""
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
        if step.capture:
            out = subprocess.run(step, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                sys.exit(f"error: exit code {out.returncode} from: {shlex.join(step)}\nnothing after it was run.")
            if on_capture:
                on_capture(out.stdout.strip())
            continue
        try:
            subprocess.run(step, cwd=ROOT, check=True)
        except subprocess.CalledProcessError as e:
            if not step.may_fail:
                sys.exit(f"error: exit code {e.returncode} from: {shlex.join(step)}\nnothing after it was run.")
            failed.append(step)
    return failed


def drift_logs(cfg: Config, dest: str, dry_run: bool) -> int:
    """Copy every serving VM's input-statistics logs to DEST/<VM>/ (make deploy-drift-report)."""
    listing = instances_command(cfg)
    print("# the serving VMs")
    if dry_run:
        print(shlex.join(listing))
        print(f"# then, for each INSTANCE listed (the folder must exist: mkdir -p {dest}/INSTANCE):")
        print(shlex.join(copy_log_command(cfg, "INSTANCE", dest)))
        return 0
    out = subprocess.run(listing, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: could not list the VMs: {out.stderr.strip()}")
    instances = out.stdout.split()
    if not instances:
        sys.exit("error: no serving VM found (deployed with --public-http-demo? pass it here too)")
    for instance in instances:
        (ROOT / dest / instance).mkdir(parents=True, exist_ok=True)
    run([copy_log_command(cfg, i, dest) for i in instances], dry_run=False)
    print(f"# {len(instances)} VM(s): {dest}/*/gtsrb_inputs.jsonl*")
    return 0


# --------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", required=True, help="Google Cloud project id")
    common.add_argument("--zone", required=True, help="e.g. europe-west1-b; the registry uses its region")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    common.add_argument("--name", default="gtsrb-serve", help="network tag and prefix of every resource")
    common.add_argument("--repo", default="gtsrb", help="Artifact Registry repository (default: %(default)s)")
    common.add_argument("--tag", default=None, help="image tag (default: the short git commit, else 'latest')")
    demo = argparse.ArgumentParser(add_help=False)
    demo.add_argument("--public-http-demo", action="store_true",
                      help="one VM with a public address, plain HTTP on :8080, no login (not for real traffic)")  # fmt: skip

    p = argparse.ArgumentParser(prog="python -m deploy.gce", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", parents=[common, demo], help="build, push, and serve it (secure by default)")
    d.add_argument("--domain", default="", help="DNS name for the HTTPS certificate (required unless demo)")
    d.add_argument("--iap-member", dest="iap_members", action="append", default=[],
                   help="who may call through IAP, e.g. user:me@example.com or serviceAccount:SA; repeatable")  # fmt: skip
    d.add_argument("--rate-limit", type=int, default=600, help="requests/minute per client IP (default: %(default)s)")
    d.add_argument("--size", type=int, default=1, help="VMs in the group (default: %(default)s)")
    d.add_argument("--initial-delay", type=int, default=180,
                   help="seconds a new VM gets to boot and load the model (default: %(default)s)")  # fmt: skip
    d.add_argument("--machine-type", default="e2-standard-2", help="default: %(default)s")
    d.add_argument("--memory", default="4g", help="the container's memory limit (default: %(default)s)")
    d.add_argument("--cpus", default="1.8", help="the container's CPU limit (default: %(default)s)")
    d.add_argument("--network", default="", help="an existing VPC network (default: a dedicated one, NAME-net)")
    d.add_argument("--torch-index-url", default=Config.torch_index_url, help="pip index for torch in the image")
    d.add_argument("--base-image", default="", help="the image's base for Cloud Build, e.g. debian:TAG@sha256:DIGEST")
    d.add_argument("--no-build", dest="build", action="store_false",
                   help="skip Cloud Build: use the image already pushed under --tag")  # fmt: skip
    d.add_argument("--source-ranges", default=None, help="demo only: who may reach :8080 (default: 0.0.0.0/0)")
    s = sub.add_parser("scale-out", parents=[common], help="autoscaling of the group that deploy made")
    s.add_argument("--min-replicas", type=int, default=1, help="autoscaler minimum (default: %(default)s)")
    s.add_argument("--max-replicas", type=int, default=4, help="autoscaler maximum (default: %(default)s)")
    s.add_argument("--autoscale-on", choices=("cpu", "rps"), default="cpu", help="signal (default: %(default)s)")
    s.add_argument("--target-cpu", type=float, default=0.6, help="CPU utilization target (default: %(default)s)")
    s.add_argument("--max-rps", type=float, default=Config.max_rps,
                   help="rps: requests/s one VM is worth to the load balancer (default: %(default)s)")  # fmt: skip
    s.add_argument("--target-lb-utilization", type=float, default=0.8,
                   help="rps: fraction of --max-rps the autoscaler aims for (default: %(default)s)")  # fmt: skip
    s.add_argument("--initial-delay", type=int, default=180, help="cool-down period (default: %(default)s)")
    g = sub.add_parser("drift-logs", parents=[common, demo], help="copy the VMs' input logs to logs/deployed/")
    g.add_argument("--dest", default=DRIFT_LOGS, help="local folder, relative to the repo (default: %(default)s)")
    t = sub.add_parser("teardown", parents=[common], help="delete everything deploy created (both modes)")
    t.add_argument("--keep-images", action="store_true", help="keep the Artifact Registry repository")
    args = p.parse_args(argv)
    if args.command == "deploy":
        if args.public_http_demo and args.domain:
            p.error("--domain is for the HTTPS load balancer; the --public-http-demo VM serves plain HTTP")
        if not args.public_http_demo and not args.domain:
            p.error("deploy needs --domain (its HTTPS certificate), or --public-http-demo for a plain HTTP demo VM")
        if args.source_ranges and not args.public_http_demo:
            p.error("--source-ranges opens the demo VM; the default deployment admits the load balancer only")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    known = Config.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in known and v is not None}
    values["tag"] = args.tag or default_tag()
    values["iap_members"] = tuple(values.get("iap_members", ()))
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
    if args.command == "deploy" and cfg.build and not MAR.is_file():
        if not args.dry_run:
            sys.exit(f"error: {MAR.relative_to(ROOT)} is missing; run `make archive` first (it goes into the image)")
        print(f"# warning: {MAR.relative_to(ROOT)} is missing; run `make archive` before a real run")

    mode = "dry run: nothing is executed" if args.dry_run else "running"
    print(f"# gtsrb-serve {args.command} ({mode}); project {cfg.project}, zone {cfg.zone}, image {cfg.image}")
    # Commands run from the repo root (the build context); a dry run's script says so itself.
    print(f"cd {shlex.quote(str(ROOT))}" if args.dry_run else f"# in {ROOT}")
    if args.command == "drift-logs":
        return drift_logs(cfg, args.dest, args.dry_run)
    user_data = None
    try:
        if args.command == "teardown":
            steps = teardown_commands(cfg)
        elif args.command == "scale-out":
            steps = scale_out_commands(cfg)
        else:
            if not cfg.public_http_demo and not cfg.iap_members:
                print(
                    "# warning: no --iap-member: IAP will let nobody through until you grant roles/iap.httpsResourceAccessor"
                )
            user_data = write_cloud_init(cfg)
            print(f"# cloud-init rendered from deploy/cloud-init.yaml to {user_data}")
            steps = deploy_commands(cfg, str(user_data))
        failed = run(steps, args.dry_run, on_capture=lambda digest: pin_digest(cfg, digest, user_data))
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
        print_next_steps(cfg, args.dry_run)
    return 0


def print_next_steps(cfg: Config, dry_run: bool) -> None:
    ip = ""
    if not dry_run:
        out = subprocess.run(address_command(cfg), capture_output=True, text=True)
        ip = out.stdout.strip() if out.returncode == 0 else ""
    if not ip:
        print(f"IP=$({shlex.join(address_command(cfg))})")
        ip = "$IP"
    if cfg.public_http_demo:
        print("# then, once the VM has booted, pulled the image and loaded the model (about 3 minutes):")
        print(f"curl -T sign.png http://{ip}:8080/predictions/gtsrb")
        return
    print(f"# then: point the DNS A record of {cfg.domain} at {ip}; the certificate becomes ACTIVE within the hour,")
    print("# and a caller allowed by IAP sends its Google ID token (deploy/README.md, 'Calling the API'):")
    print(f'curl -H "Authorization: Bearer $TOKEN" -T sign.png https://{cfg.domain}/predictions/gtsrb')


if __name__ == "__main__":
    sys.exit(main())
