"""Deploy gtsrb-serve to Compute Engine: private VMs behind an HTTPS load balancer with IAP and Cloud Armor.

    make archive                                                  # model_store/gtsrb.mar goes into the image
    python -m deploy.gce deploy --project P --zone europe-west1-b --domain signs.example.com \\
        --iap-member serviceAccount:client@P.iam.gserviceaccount.com
    python -m deploy.gce scale-out  --project P --zone europe-west1-b    # autoscaling of the group
    python -m deploy.gce drift-logs --project P --zone europe-west1-b    # the VMs' input logs -> logs/deployed/
    python -m deploy.gce teardown   --project P --zone europe-west1-b    # delete all of it again
    python -m deploy.gce deploy --project P --zone Z --public-http-demo  # one public VM, plain HTTP on :8080
    python -m deploy.gce rollback   --project P --zone europe-west1-b    # the group back to its previous template

A rerun of deploy reuses what exists; a new image or model becomes a new instance template, rolled out through
a canary VM and its checks (deploy/rollout.py). The VMs pull the image by digest.

Add --dry-run to print every gcloud command (a copyable shell script) and run nothing; it needs no gcloud.
deploy/commands.py holds the commands, deploy/README.md explains what gets created and why.
"""

import argparse
import dataclasses
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from string import Template

from deploy import rollout, vm_monitoring
from deploy.commands import (
    Config,
    Step,
    address_command,
    build_commands,
    copy_log_command,
    deploy_commands,
    instances_command,
    scale_out_commands,
    teardown_commands,
    vm_flags,
)

ROOT = Path(__file__).resolve().parent.parent
CLOUD_INIT = Path(__file__).resolve().parent / "cloud-init.yaml"
MAR = ROOT / "model_store" / "gtsrb.mar"
DRIFT_LOGS = "logs/deployed"  # relative to ROOT: make deploy-drift-report reads it


def render_cloud_init(cfg: Config) -> str:
    # string.Template ($image, ...) leaves Docker's Go-template braces {{...}} alone.
    from deploy.commands import COLLECTOR_IMAGE

    return Template(CLOUD_INIT.read_text()).substitute(
        image=cfg.image_ref, registry_host=cfg.registry_host, memory=cfg.memory, cpus=cfg.cpus,
        collector_image=COLLECTOR_IMAGE, **vm_monitoring.substitutions(cfg),
    )  # fmt: skip


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


def run(steps: list[Step], dry_run: bool) -> list[Step]:
    """Print (dry run) or run the steps in order; returns the may_fail steps that failed."""
    failed: list[Step] = []
    skip_next = 0
    for step in steps:
        if step.note:
            print(f"# {step.note}")
        if skip_next:
            print(f"# exists already, skipped: {shlex.join(step)}")
            skip_next -= 1
            continue
        if dry_run:
            print(shlex.join(step))
            continue
        print(f"+ {shlex.join(step)}", flush=True)
        if step.probe:
            found = subprocess.run(step, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            skip_next = step.skip if found.returncode == 0 else 0
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
    common.add_argument("--regional", action="store_true",
                        help="the group spreads over the zone's region (regional managed instance group)")  # fmt: skip
    canary = argparse.ArgumentParser(add_help=False)
    canary.add_argument(
        "--canary-soak",
        dest="soak_s",
        type=int,
        default=rollout.Checks.soak_s,
        help="seconds the canary serves before its metrics are read (default: %(default)s)",
    )
    canary.add_argument(
        "--canary-window",
        dest="window",
        default=rollout.Checks.window,
        help="PromQL range of the canary's metrics (default: %(default)s)",
    )
    canary.add_argument(
        "--max-error-ratio",
        type=float,
        default=rollout.Checks.max_error_ratio,
        help="the canary's 5xx ratio limit (default: %(default)s, as GTSRBServerErrors)",
    )
    canary.add_argument(
        "--max-latency-ms",
        type=float,
        default=rollout.Checks.max_latency_ms,
        help="the canary's mean latency limit (default: %(default)s, as GTSRBMeanLatencyHigh)",
    )
    canary.add_argument(
        "--canary-min-requests",
        dest="min_requests",
        type=int,
        default=0,
        help="stop the rollout when the canary served fewer requests (default: %(default)s)",
    )
    canary.add_argument(
        "--metrics-url",
        default="",
        help="Prometheus HTTP API of the metrics (default: the project's Managed Service for Prometheus)",
    )
    canary.add_argument("--stable-timeout", dest="stable_timeout_s", type=int, default=rollout.Checks.stable_timeout_s,
                        help="seconds to wait for the group to be stable (default: %(default)s)")  # fmt: skip
    demo = argparse.ArgumentParser(add_help=False)
    demo.add_argument("--public-http-demo", action="store_true",
                      help="one VM with a public address, plain HTTP on :8080, no login (not for real traffic)")  # fmt: skip

    p = argparse.ArgumentParser(prog="python -m deploy.gce", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", parents=[common, demo, canary],
                       help="build, push, and serve it (secure by default); reruns roll out through a canary")  # fmt: skip
    d.add_argument("--alert-webhook", default="", help="URL of the Alertmanager's webhook receiver on the VMs")
    d.add_argument(
        "--model-alias",
        default="champion",
        help="the MLflow registered version the archive must be (default: %(default)s; '' skips the check)",
    )
    d.add_argument("--registered-model", default="gtsrb", help="MLflow registered model name (default: %(default)s)")
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
    r = sub.add_parser("rollback", parents=[common, canary], help="the group back to the template it ran before")
    r.add_argument("--to", default="", help="this instance template instead of the previous one")
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
        if args.regional and args.public_http_demo:
            p.error("--regional is for the managed instance group; the demo is one VM")
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
    checks = rollout.Checks(**{k: v for k, v in vars(args).items() if k in rollout.Checks.__dataclass_fields__})
    if args.command == "rollback":
        return rollout.rollback(cfg, checks, args.to, args.dry_run)
    if args.command == "deploy":
        return deploy(cfg, checks, args)
    steps = teardown_commands(cfg) if args.command == "teardown" else scale_out_commands(cfg)
    if args.command == "teardown":  # the group's templates go right after the group, before the health check
        i = next(i for i, s in enumerate(steps) if s[1:5] == ["compute", "instance-groups", "managed", "delete"]) + 1
        failed = run(steps[:i], args.dry_run)
        failed += [Step(f.split()) for f in rollout.delete_templates(cfg, args.dry_run)]
        failed += run(steps[i:], args.dry_run)
    else:
        failed = run(steps, args.dry_run)
    if failed:
        print("# these deletes failed (harmless for resources that never existed; check the others):", file=sys.stderr)
        for step in failed:
            print(f"#   {shlex.join(step)}", file=sys.stderr)
        return 1
    return 0


def model_version(cfg: Config, args: argparse.Namespace) -> str:
    """The archive's model version; with --model-alias, checked against that MLflow alias (training/tracking.py)."""
    if not MAR.is_file():
        return cfg.tag
    version = rollout.mar_version(MAR)
    if not (args.model_alias and cfg.build):
        return version
    print(
        f"# the archive is model {version}; the registry's {args.model_alias!r} of {args.registered_model} must be it"
    )
    if args.dry_run:
        print(f"# python -m training.tracking champion {args.registered_model} --alias {args.model_alias}")
        return version
    from training import tracking

    mv = tracking.champion(args.registered_model, args.model_alias)
    if mv is None:
        sys.exit(f"error: {args.registered_model} has no version with alias {args.model_alias!r}: promote one "
                 f"(python -m training.tracking promote {args.registered_model} VERSION), or --model-alias ''")  # fmt: skip
    if not version.startswith(f"v{mv['version']}-"):
        sys.exit(f"error: {MAR.name} is model {version}, but {args.model_alias!r} is version "
                 f"{mv['version']}: run `make archive-champion`")  # fmt: skip
    return version


def deploy(cfg: Config, checks: rollout.Checks, args: argparse.Namespace) -> int:
    """Build and push; the digest; the cloud-init and the template named after them; the rest only where missing;
    then, on an existing group, the canary rollout of the new template."""
    if not cfg.public_http_demo and not cfg.iap_members:
        print("# warning: no --iap-member: IAP will let nobody through until you grant roles/iap.httpsResourceAccessor")
    version = model_version(cfg, args)
    n_build = len(build_commands(cfg))
    run(build_commands(cfg), args.dry_run)
    cfg = dataclasses.replace(cfg, digest=rollout.resolve_digest(cfg, args.dry_run),
                              model_version=rollout.label_value(version))  # fmt: skip
    user_data = write_cloud_init(cfg)
    try:
        print(f"# cloud-init rendered from deploy/cloud-init.yaml to {user_data}")
        if not cfg.public_http_demo:
            flags = vm_flags(cfg, "user-data")
            cfg = dataclasses.replace(cfg, template=rollout.template_name(cfg, version, user_data.read_text(), flags))
            print(f"# instance template {cfg.template}: model {version}, image {cfg.image_ref}")
        run(deploy_commands(cfg, str(user_data))[n_build:], args.dry_run)
    finally:
        # A real run is done with the file once gcloud has read it; a dry run's commands still point at it.
        if not args.dry_run:
            user_data.unlink(missing_ok=True)
    if not cfg.public_http_demo and rollout.rollout(cfg, cfg.template, checks, args.dry_run) != 0:
        return 1
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
