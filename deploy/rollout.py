"""Rollouts of the managed instance group: a new template per image digest and model, a canary, checks, then all.

    python -m deploy.gce deploy ...      # ... then, when the group runs another template: canary -> checks -> complete
    python -m deploy.gce rollback ...    # the group back to the template it ran before

The template's name says what it runs: `<name>-tpl-<model version>-<hash>`, the hash over the rendered cloud-init
(which holds the image digest) and the VM flags, so the same image, model and settings make the same template
(a rerun changes nothing) and anything new makes a new one. The canary is one VM of the new template
(`rolling-action start-update --canary-version=template=NEW,target-size=1`); it must be HEALTHY in the group's
health check (`-hc-autoheal`: GET /ready, a worker of the model READY) and, after a soak, its error ratio and
mean latency in Managed Service for Prometheus must stay under the thresholds of monitoring/alerts.yml
(GTSRBServerErrors, GTSRBMeanLatencyHigh).
A failed check puts the canary back on the previous template and stops; otherwise the whole group moves.
"""

import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from deploy.commands import UNRESOLVED_DIGEST, Config, digest_command, gcloud

TEMPLATE_INFIX = "tpl"
GMP_API = "https://monitoring.googleapis.com/v1/projects/{project}/location/global/prometheus"


@dataclass(frozen=True)
class Checks:
    soak_s: int = 600  # the canary serves this long before its metrics are read
    window: str = "10m"  # PromQL range of the metric checks
    max_error_ratio: float = 0.01  # GTSRBServerErrors fires above this
    max_latency_ms: float = 100.0  # GTSRBMeanLatencyHigh fires above this
    min_requests: int = 0  # fewer requests than this in the window: the canary is not judged, the rollout stops
    metrics_url: str = ""  # a Prometheus HTTP API; default Managed Service for Prometheus of the project
    stable_timeout_s: int = 1200  # wait-until --stable: boot, image pull, model load


# ------------------------------------------------------------------------------------------------------ names


def mar_version(mar: Path) -> str:
    """The archive's model version (tools/archive.py): `v<registered>-<sha12>`, or `<sha12>` unregistered."""
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def label_value(text: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", text.lower())[:40].strip("-") or "unknown"


def template_name(cfg: Config, model_version: str, user_data: str, flags: list[str]) -> str:
    digest = hashlib.sha256("\n".join([user_data, *flags]).encode()).hexdigest()[:8]
    return f"{cfg.name}-{TEMPLATE_INFIX}-{label_value(model_version)}-{digest}"[:63].rstrip("-")


# ----------------------------------------------------------------------------------------------- gcloud calls


def call(argv: list[str], check: bool = True) -> str:
    print(f"+ {shlex.join(argv)}", flush=True)
    r = subprocess.run(argv, capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"error: exit code {r.returncode} from: {shlex.join(argv)}\n{r.stderr.strip()}")
    return r.stdout.strip() if r.returncode == 0 else ""


def resolve_digest(cfg: Config, dry_run: bool) -> str:
    """sha256:... of the image just pushed under its tag: the VMs pull by digest, so a tag moved later changes
    nothing that runs."""
    print("# the pushed image's digest: the VMs run exactly that image, whatever the tag points at later")
    if dry_run:
        print(shlex.join(digest_command(cfg)))
        return UNRESOLVED_DIGEST  # a dry run cannot know it: the cloud-init shows @sha256:UNRESOLVED
    digest = call(digest_command(cfg))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        sys.exit(f"error: no digest for {cfg.image} (got {digest!r}): was it pushed?")
    return digest


def mig(cfg: Config, verb: str, *flags: str) -> list[str]:
    """`gcloud compute instance-groups managed VERB... MIG FLAGS... --zone|--region`; verb may be two words."""
    return gcloud(cfg, "compute", "instance-groups", "managed", *verb.split(), cfg.res("mig"), *flags, cfg.mig_scope)


def update_command(cfg: Config, template: str, canary: str = "") -> list[str]:
    versions = [f"--version=template={template}"]
    if canary:
        versions.append(f"--canary-version=template={canary},target-size=1")
    # max-unavailable 0: a VM goes only once its replacement is up (surge), so capacity never drops.
    return mig(cfg, "rolling-action start-update", *versions, "--max-surge=1", "--max-unavailable=0")


def wait_command(cfg: Config, checks: Checks) -> list[str]:
    return mig(cfg, "wait-until", "--stable", f"--timeout={checks.stable_timeout_s}")


def current_template_command(cfg: Config) -> list[str]:
    return mig(cfg, "describe", "--format=value(instanceTemplate.basename())")


def instances_command(cfg: Config) -> list[str]:
    return mig(cfg, "list-instances",
               "--format=value(name,version.instanceTemplate.basename(),instanceHealth[0].detailedHealthState)")  # fmt: skip


def templates_command(cfg: Config) -> list[str]:
    return gcloud(cfg, "compute", "instance-templates", "list", f"--filter=name~^{cfg.name}-{TEMPLATE_INFIX}-",
                  "--sort-by=creationTimestamp", "--format=value(name)")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the checks


def queries(instance: str, window: str) -> dict[str, str]:
    sel = f'{{instance="{instance}"}}'
    requests = f"sum(rate(ts_inference_requests_total{sel}[{window}]))"
    return {
        "requests": f"sum(increase(ts_inference_requests_total{sel}[{window}]))",
        "error_ratio": f"sum(rate(Requests5XX{sel}[{window}])) / {requests}",
        "latency_ms": f"sum(rate(ts_inference_latency_microseconds{sel}[{window}])) / {requests} / 1000",
    }


def metrics_url(cfg: Config, checks: Checks) -> str:
    return (checks.metrics_url or GMP_API.format(project=cfg.project)).rstrip("/")


def query(url: str, expr: str, token: str) -> float | None:
    req = urllib.request.Request(
        f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        result = json.load(r)["data"]["result"]
    value = float(result[0]["value"][1]) if result else None
    return None if value is None or value != value else value  # NaN: 0/0, no traffic


def canary_problems(cfg: Config, checks: Checks, canary: str, health: str) -> list[str]:
    """What is wrong with the canary VM: not HEALTHY, too many errors, too slow, too little traffic to tell."""
    if health != "HEALTHY":
        return [f"{canary} is {health or 'not health-checked'} in the group's health check (no READY worker)"]
    print(f"# {canary} is HEALTHY; it serves for {checks.soak_s} s before its metrics are read", flush=True)
    time.sleep(checks.soak_s)
    token = call(gcloud(cfg, "auth", "print-access-token")[:-1])  # no --project for auth
    url = metrics_url(cfg, checks)
    got = {k: query(url, q, token) for k, q in queries(canary, checks.window).items()}
    print(f"# canary {canary} over {checks.window}: {json.dumps(got)}")
    problems = []
    if (got["requests"] or 0) < checks.min_requests:
        problems.append(f"{got['requests'] or 0:.0f} requests in {checks.window}, fewer than --canary-min-requests "
                        f"{checks.min_requests}: too little traffic to judge it")  # fmt: skip
    if got["error_ratio"] is not None and got["error_ratio"] > checks.max_error_ratio:
        problems.append(f"5xx ratio {got['error_ratio']:.2%} > {checks.max_error_ratio:.2%}")
    if got["latency_ms"] is not None and got["latency_ms"] > checks.max_latency_ms:
        problems.append(f"mean latency {got['latency_ms']:.0f} ms > {checks.max_latency_ms:g} ms")
    return problems


# ----------------------------------------------------------------------------------------------- the rollout


def print_plan(cfg: Config, template: str, checks: Checks) -> None:
    print("# rollout: when the group already runs another template (CURRENT), one canary VM of the new one first")
    print(shlex.join(current_template_command(cfg)))
    print(shlex.join(update_command(cfg, "CURRENT", canary=template)))
    print(shlex.join(wait_command(cfg, checks)))
    print("# the canary (the VM on the new template) must be HEALTHY in the group's health check: model READY")
    print(shlex.join(instances_command(cfg)))
    url = metrics_url(cfg, checks)
    print(f"# after {checks.soak_s} s, its 5xx ratio (<= {checks.max_error_ratio:g}) and mean latency "
          f"(<= {checks.max_latency_ms:g} ms) in Managed Service for Prometheus, CANARY its name:")  # fmt: skip
    for expr in queries("CANARY", checks.window).values():
        print(f'curl -sG -H "Authorization: Bearer $(gcloud auth print-access-token)" {url}/api/v1/query '
              f"--data-urlencode {shlex.quote('query=' + expr)}")  # fmt: skip
    print("# all good: the whole group moves to the new template (one VM at a time, capacity kept)")
    print(shlex.join(update_command(cfg, template)))
    print(shlex.join(wait_command(cfg, checks)))
    print("# a failed check: the canary goes back to CURRENT and the rollout stops (exit 1)")
    print(shlex.join(update_command(cfg, "CURRENT")))


def rollout(cfg: Config, template: str, checks: Checks, dry_run: bool) -> int:
    if dry_run:
        print_plan(cfg, template, checks)
        return 0
    current = call(current_template_command(cfg))
    if current == template:
        print(f"# the group runs {template} already: nothing to roll out")
        call(wait_command(cfg, checks))
        return 0
    print(f"# canary: one VM of {template}, the others stay on {current}")
    call(update_command(cfg, current, canary=template))
    call(wait_command(cfg, checks))
    rows = [line.split() for line in call(instances_command(cfg)).splitlines() if line.strip()]
    canaries = [r for r in rows if len(r) >= 2 and r[1] == template]
    if not canaries:
        problems = [f"no VM of {template} in the group"]
    else:
        name, health = canaries[0][0], (canaries[0][2] if len(canaries[0]) > 2 else "")
        problems = canary_problems(cfg, checks, name, health)
    if problems:
        print(f"# canary check FAILED: {'; '.join(problems)}", file=sys.stderr)
        print(f"# back to {current}; the rollout stops", file=sys.stderr)
        call(update_command(cfg, current))
        call(wait_command(cfg, checks))
        return 1
    print(f"# canary passed: the whole group moves to {template}")
    call(update_command(cfg, template))
    call(wait_command(cfg, checks))
    return 0


def rollback(cfg: Config, checks: Checks, to: str, dry_run: bool) -> int:
    """The group back to `to`, or to the newest template older than the one it runs."""
    if dry_run:
        print("# the template the group runs, and the deployment's templates, oldest first")
        print(shlex.join(current_template_command(cfg)))
        print(shlex.join(templates_command(cfg)))
        print("# PREVIOUS: the one listed just before the current one (or --to)")
        print(shlex.join(update_command(cfg, to or "PREVIOUS")))
        print(shlex.join(wait_command(cfg, checks)))
        return 0
    current = call(current_template_command(cfg))
    if not to:
        names = call(templates_command(cfg)).split()
        older = names[: names.index(current)] if current in names else []
        if not older:
            sys.exit(f"error: no template older than {current!r} to roll back to (templates: {names})")
        to = older[-1]
    print(f"# rollback: {current} -> {to}")
    call(update_command(cfg, to))
    call(wait_command(cfg, checks))
    return 0


def delete_templates(cfg: Config, dry_run: bool) -> list[str]:
    """Teardown: every template of the deployment (after the group is gone). Returns the failed deletes."""
    print("# the deployment's instance templates, one per rollout")
    if dry_run:
        print(shlex.join(templates_command(cfg)))
        print(shlex.join(gcloud(cfg, "compute", "instance-templates", "delete", "TEMPLATE", "--quiet")))
        return []
    failed = []
    for name in call(templates_command(cfg), check=False).split():
        argv = gcloud(cfg, "compute", "instance-templates", "delete", name, "--quiet")
        print(f"+ {shlex.join(argv)}", flush=True)
        if subprocess.run(argv).returncode != 0:
            failed.append(shlex.join(argv))
    return failed
