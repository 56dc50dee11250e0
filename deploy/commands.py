"""The gcloud commands of deploy/gce.py, as data: what gets created, in which order, and how it is deleted.

Default (`deploy`): the serving VMs have no public address and admit traffic from Google's load balancer only.
Clients reach an HTTPS load balancer (Google-managed certificate for --domain) that authenticates them with
Identity-Aware Proxy and rate-limits them with Cloud Armor; the VMs' health check asks for model READY.
`--public-http-demo` is the plain alternative: one VM with a public address, HTTP on :8080.
"""

import re
from dataclasses import dataclass

PORT = 8080  # HAProxy in the container: inference, and /ready for health checks
READY_PATH = "/ready"  # 200 only while the model's workers are READY (docker/haproxy.cfg)
LOG_DIR = "/var/lib/gtsrb/logs"  # on the VM (deploy/cloud-init.yaml): the server's logs, gtsrb_inputs.jsonl
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CLOUDBUILD = "deploy/cloudbuild.yaml"  # relative: gcloud runs from the repo root, the build context
# Where Google's health checkers and the global external Application Load Balancer's proxies connect from.
GOOGLE_LB_RANGES = ("130.211.0.0/22", "35.191.0.0/16")
IAP_TCP_RANGE = "35.235.240.0/20"  # IAP TCP forwarding: `gcloud compute ssh/scp --tunnel-through-iap`
SUBNET_RANGE = "10.80.0.0/24"  # the dedicated network's one subnet (the zone's region)
# Firewall priorities: the rules that admit traffic, then a deny of everything else for the VMs' tag, above the
# rules a default network brings (allow-internal, allow-ssh from anywhere: 65534).
ALLOW_PRIORITY, DENY_PRIORITY = 900, 1000
# Login to the VMs is by IAM identity (OS Login) only; SSH keys in the project's metadata are ignored.
VM_METADATA = "enable-oslogin=TRUE,block-project-ssh-keys=TRUE"
UNRESOLVED_DIGEST = "sha256:UNRESOLVED"  # in a dry run's cloud-init; a real run reads the pushed image's digest
# Google's build of the OpenTelemetry Collector: scrapes the metrics on the VM into Managed Prometheus.
COLLECTOR_IMAGE = (
    "us-docker.pkg.dev/cloud-ops-agents-artifacts/google-cloud-opentelemetry-collector/otelcol-google:0.160.0"
)
# What the VM's own service account may do: write logs and metrics, pull the image. Nothing else.
VM_PROJECT_ROLES = ("roles/logging.logWriter", "roles/monitoring.metricWriter")
VM_REPO_ROLE = "roles/artifactregistry.reader"  # on the one repository, not the project
VM_SCOPES = "logging-write,monitoring-write,storage-ro"  # storage-ro: Artifact Registry pulls
ZONE_RE = re.compile(r"^([a-z]+-[a-z]+[0-9]+)-[a-z]$")  # europe-west1-b -> europe-west1


@dataclass(frozen=True)
class Config:
    project: str
    zone: str
    name: str = "gtsrb-serve"
    repo: str = "gtsrb"
    tag: str = "latest"
    machine_type: str = "e2-standard-2"
    memory: str = "4g"  # the container's limit; e2-standard-2 has 8 GB (docker/README.md, "Memory")
    cpus: str = "1.8"  # the container's CPU limit: e2-standard-2's 2 vCPUs less room for Docker and the collector
    network: str = ""  # an existing VPC network; empty: a dedicated one, {name}-net
    torch_index_url: str = CPU_INDEX
    base_image: str = ""  # the Dockerfile's base for Cloud Build, ideally pinned by digest (default: its tag)
    build: bool = True
    # the secure default
    domain: str = ""  # the load balancer's certificate is issued for it; point its DNS A record at the address
    iap_members: tuple[str, ...] = ()  # who may call, e.g. serviceAccount:client@p.iam.gserviceaccount.com
    rate_limit: int = 600  # requests per minute and client IP (Cloud Armor); more get 429
    size: int = 1
    initial_delay: int = 180
    # --public-http-demo
    public_http_demo: bool = False
    source_ranges: str = "0.0.0.0/0"
    # scale-out
    min_replicas: int = 1
    max_replicas: int = 4
    autoscale_on: str = "cpu"  # or "rps"
    target_cpu: float = 0.6
    max_rps: float = 500.0  # ~half of what one 2-core server does at concurrency 32 (BENCHMARKS.md)
    target_lb_utilization: float = 0.8
    keep_images: bool = False
    # rollouts (deploy/rollout.py)
    regional: bool = False  # the group spreads its VMs over the region's zones
    digest: str = ""  # sha256:... of the pushed image (rollout.resolve_digest): the VMs run the image by it
    template: str = ""  # the instance template of this image, model and configuration (rollout.template_name)
    model_version: str = ""  # the archive's model version (v<registered>-<sha12>), a label of the VMs
    alert_webhook: str = ""  # the Alertmanager's webhook receiver on the VMs (monitoring/alertmanager.yml)

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

    @property
    def image_ref(self) -> str:
        """What the VMs run: the image by its digest, which (unlike a tag) cannot be moved to another image. The
        digest is read from the registry right after the build (rollout.resolve_digest); never the tag."""
        return f"{self.image.rsplit(':', 1)[0]}@{self.digest or UNRESOLVED_DIGEST}"

    @property
    def mig_scope(self) -> str:
        return f"--region={self.region}" if self.regional else f"--zone={self.zone}"

    @property
    def vpc(self) -> str:
        return self.network or self.res("net")

    @property
    def service_account(self) -> str:
        return f"{self.name}-vm@{self.project}.iam.gserviceaccount.com"

    def res(self, suffix: str) -> str:
        """Resource names all derive from --name, so two deployments can live in one project."""
        return f"{self.name}-{suffix}"


class Step(list):
    """One gcloud argv (a plain list, so tests compare it as one), plus how the runner treats it.

    note:     printed as a comment before the command, in dry runs and real runs.
    probe:    a `describe`: if it succeeds the resource exists and the runner skips the next `skip` steps (its
              create, and what is done once after it).
    may_fail: teardown deletes; a resource that was never created must not stop the others being deleted.
    """

    def __init__(self, argv: list[str], note: str = "", *, probe: bool = False, may_fail: bool = False, skip: int = 1):
        super().__init__(argv)
        self.note, self.probe, self.may_fail, self.skip = note, probe, may_fail, skip


def gcloud(cfg: Config, *args: str) -> list[str]:
    return ["gcloud", *args, f"--project={cfg.project}"]


def ensure(cfg: Config, describe: list[str], create: list[str], note: str, then: tuple[Step, ...] = ()) -> list[Step]:
    """describe, then create (and `then`) only if describe failed: reruns reuse what exists instead of failing."""
    return [Step(gcloud(cfg, *describe), note, probe=True, skip=1 + len(then)), Step(gcloud(cfg, *create)), *then]


# ------------------------------------------------------------------------------------- shared by both modes


def repository_commands(cfg, services: tuple[str, ...] | list[str]) -> list[Step]:
    """The APIs, then the Artifact Registry repository (created only if it does not exist yet)."""
    return [
        Step(gcloud(cfg, "services", "enable", *services), "APIs used below (a no-op when already enabled)"),
        *ensure(
            cfg,
            ["artifacts", "repositories", "describe", cfg.repo, f"--location={cfg.region}"],
            ["artifacts", "repositories", "create", cfg.repo, "--repository-format=docker",
             f"--location={cfg.region}", "--description=gtsrb-serve images"],
            f"Artifact Registry repository {cfg.repo}: created only if this describe fails",
        ),
    ]  # fmt: skip


def build_commands(cfg: Config) -> list[Step]:
    """APIs, the Artifact Registry repository, and the image (Cloud Build, from the repo root)."""
    apis = ["compute.googleapis.com", "artifactregistry.googleapis.com", "cloudbuild.googleapis.com",
            "iam.googleapis.com", "logging.googleapis.com", "monitoring.googleapis.com"]  # fmt: skip
    if not cfg.public_http_demo:
        apis.append("iap.googleapis.com")
    steps = repository_commands(cfg, apis)
    if cfg.build:
        subs = f"_IMAGE={cfg.image},_TORCH_INDEX_URL={cfg.torch_index_url}"
        subs += f",_BASE_IMAGE={cfg.base_image}" if cfg.base_image else ""
        steps.append(Step(
            gcloud(cfg, "builds", "submit", f"--config={CLOUDBUILD}", f"--substitutions={subs}", "."),
            "build the image from the repo root (.gcloudignore decides what is uploaded) and push it",
        ))  # fmt: skip
    return steps


def digest_command(cfg: Config) -> list[str]:
    """The pushed image's digest (deploy/rollout.py resolve_digest runs it right after the build)."""
    return gcloud(cfg, "artifacts", "docker", "images", "describe", cfg.image, "--format=value(image_summary.digest)")


def network_commands(cfg: Config) -> list[Step]:
    """A network of the VMs' own (unless --network names one): no default rules that admit anything."""
    if cfg.network:
        return []
    return [
        *ensure(
            cfg,
            ["compute", "networks", "describe", cfg.vpc],
            ["compute", "networks", "create", cfg.vpc, "--subnet-mode=custom"],
            f"a dedicated VPC network {cfg.vpc}: none of the default network's allow-internal/allow-ssh rules",
        ),
        *ensure(
            cfg,
            ["compute", "networks", "subnets", "describe", cfg.res("subnet"), f"--region={cfg.region}"],
            ["compute", "networks", "subnets", "create", cfg.res("subnet"), f"--network={cfg.vpc}",
             f"--region={cfg.region}", f"--range={SUBNET_RANGE}", "--enable-private-ip-google-access"],
            "",
        ),
    ]  # fmt: skip


def service_account_commands(cfg: Config) -> list[Step]:
    """The VMs' own identity: logs, metrics and image pulls, and nothing else (not the default account)."""
    member = f"--member=serviceAccount:{cfg.service_account}"
    return [
        *ensure(
            cfg,
            ["iam", "service-accounts", "describe", cfg.service_account],
            ["iam", "service-accounts", "create", cfg.res("vm"), "--display-name=gtsrb-serve VMs"],
            f"service account {cfg.service_account}: the VMs run as it",
        ),
        *[
            Step(gcloud(cfg, "projects", "add-iam-policy-binding", cfg.project, member, f"--role={role}",
                        "--condition=None"), f"{role} for the VMs" if i == 0 else "")
            for i, role in enumerate(VM_PROJECT_ROLES)
        ],
        Step(
            gcloud(cfg, "artifacts", "repositories", "add-iam-policy-binding", cfg.repo, f"--location={cfg.region}",
                   member, f"--role={VM_REPO_ROLE}"),
            f"{VM_REPO_ROLE} on the repository {cfg.repo} only",
        ),
    ]  # fmt: skip


def vm_flags(cfg: Config, user_data: str) -> list[str]:
    """What the instance template and the demo VM share: COS, the cloud-init, the tag, the identity."""
    return [
        f"--machine-type={cfg.machine_type}",
        f"--network={cfg.vpc}",
        *([] if cfg.network else [f"--subnet={cfg.res('subnet')}"]),
        # Container-Optimized OS runs the containers from cloud-init + systemd; the old create-with-container
        # agent (konlet) is deprecated.
        "--image-family=cos-stable",
        "--image-project=cos-cloud",
        "--boot-disk-size=20GB",  # the CPU torch image unpacks to a few GB; COS's 10 GB default is tight
        f"--tags={cfg.name}",
        f"--service-account={cfg.service_account}",
        f"--scopes={VM_SCOPES}",
        f"--metadata-from-file=user-data={user_data}",
        f"--metadata={VM_METADATA}",
        "--shielded-secure-boot",
        "--shielded-vtpm",
        "--shielded-integrity-monitoring",
    ]


def firewall(cfg: Config, rule: str, ports: str, ranges: str, description: str, note: str, *,
             action: str = "ALLOW", priority: int = ALLOW_PRIORITY) -> list[Step]:  # fmt: skip
    return ensure(
        cfg,
        ["compute", "firewall-rules", "describe", rule],
        ["compute", "firewall-rules", "create", rule, f"--network={cfg.vpc}", "--direction=INGRESS",
         f"--action={action}", f"--rules={ports}", f"--target-tags={cfg.name}", f"--source-ranges={ranges}",
         f"--priority={priority}", f"--description={description}"],
        note,
    )  # fmt: skip


def ssh_and_deny_rules(cfg: Config) -> list[Step]:
    """SSH through IAP only, then a deny of all else for the VMs: what the rules above do not admit stays out,
    whatever else the network allows (a default network's allow-internal and allow-ssh)."""
    return [
        *firewall(cfg, cfg.res("allow-iap-ssh"), "tcp:22", IAP_TCP_RANGE, "SSH through IAP TCP forwarding",
                  "firewall: SSH only through IAP (gcloud compute ssh/scp --tunnel-through-iap), e.g. for the drift log"),
        *firewall(cfg, cfg.res("deny-all"), "all", "0.0.0.0/0", "everything the rules above do not admit",
                  f"firewall: deny all other ingress to the VMs, at priority {DENY_PRIORITY}, above any rule of the "
                  "network that would admit more", action="DENY", priority=DENY_PRIORITY),
    ]  # fmt: skip


# -------------------------------------------------------------------------------------------- deploy


def deploy_commands(cfg: Config, user_data: str) -> list[Step]:
    return demo_commands(cfg, user_data) if cfg.public_http_demo else secure_commands(cfg, user_data)


def secure_commands(cfg: Config, user_data: str) -> list[Step]:
    """Private VMs in a managed instance group behind an HTTPS load balancer with IAP and Cloud Armor."""
    lb_ranges = ",".join(GOOGLE_LB_RANGES)
    return [
        *build_commands(cfg),
        *service_account_commands(cfg),
        # ---- network: its own, no public addresses; outbound through Cloud NAT (image pulls, Google APIs)
        *network_commands(cfg),
        *ensure(
            cfg,
            ["compute", "routers", "describe", cfg.res("router"), f"--region={cfg.region}"],
            ["compute", "routers", "create", cfg.res("router"), f"--network={cfg.vpc}", f"--region={cfg.region}"],
            "Cloud Router + Cloud NAT: outbound access for VMs that have no public address",
        ),
        *ensure(
            cfg,
            ["compute", "routers", "nats", "describe", cfg.res("nat"), f"--router={cfg.res('router')}",
             f"--region={cfg.region}"],
            ["compute", "routers", "nats", "create", cfg.res("nat"), f"--router={cfg.res('router')}",
             f"--region={cfg.region}", "--auto-allocate-nat-external-ips", "--nat-all-subnet-ip-ranges"],
            "",
        ),
        *firewall(cfg, cfg.res("allow-lb"), f"tcp:{PORT}", lb_ranges,
                  "Google load balancer proxies and health checkers to gtsrb-serve",
                  f"firewall: tcp:{PORT} from Google's load-balancer and health-check ranges only"),
        *ssh_and_deny_rules(cfg),
        # ---- the VMs
        *ensure(
            cfg,
            ["compute", "health-checks", "describe", cfg.res("hc"), "--global"],
            ["compute", "health-checks", "create", "http", cfg.res("hc"), "--global", f"--port={PORT}",
             f"--request-path={READY_PATH}", "--check-interval=10s", "--timeout=5s", "--healthy-threshold=2",
             "--unhealthy-threshold=3"],
            f"health check for routing: GET {READY_PATH} on {PORT}, 200 while a worker of the model is READY (not "
            "/ping, which stays Healthy when the workers are gone)",
        ),
        *ensure(
            cfg,
            ["compute", "health-checks", "describe", cfg.res("hc-autoheal"), "--global"],
            ["compute", "health-checks", "create", "http", cfg.res("hc-autoheal"), "--global", f"--port={PORT}",
             f"--request-path={READY_PATH}", "--check-interval=30s", "--timeout=10s", "--healthy-threshold=1",
             "--unhealthy-threshold=10"],
            "health check for autohealing, more lenient: a VM is recreated after 5 minutes without a READY worker, "
            "not after a worker restart (seconds) or a container restart (a minute)",
        ),
        # The template names its image digest, model and configuration (deploy/rollout.py): a new one is a new
        # template, rolled out by the canary steps after these; the same one is found and reused.
        *ensure(
            cfg,
            ["compute", "instance-templates", "describe", cfg.template or cfg.res("template")],
            ["compute", "instance-templates", "create", cfg.template or cfg.res("template"), *vm_flags(cfg, user_data),
             "--no-address", *([f"--labels=model-version={cfg.model_version}"] if cfg.model_version else [])],
            "instance template: COS, the cloud-init, the dedicated service account, no public address",
        ),
        *ensure(
            cfg,
            ["compute", "instance-groups", "managed", "describe", cfg.res("mig"), cfg.mig_scope],
            ["compute", "instance-groups", "managed", "create", cfg.res("mig"), cfg.mig_scope,
             f"--template={cfg.template or cfg.res('template')}", f"--size={cfg.size}", f"--base-instance-name={cfg.name}",
             f"--health-check={cfg.res('hc-autoheal')}", f"--initial-delay={cfg.initial_delay}"],
            f"managed instance group ({'regional' if cfg.regional else 'zonal'}); autohealing recreates a VM with no "
            f"READY worker for 5 minutes, after a {cfg.initial_delay} s grace period for boot, image pull and model "
            "load. An existing group keeps its template here: the canary steps at the end move it",
        ),
        Step(
            gcloud(cfg, "compute", "instance-groups", "managed", "set-named-ports", cfg.res("mig"), cfg.mig_scope,
                   f"--named-ports=http:{PORT}"),
            f"the backend service reaches the VMs through the named port http -> {PORT}",
        ),
        # ---- the load balancer: Cloud Armor, IAP, certificate, HTTPS only
        *ensure(
            cfg,
            ["compute", "security-policies", "describe", cfg.res("armor")],
            ["compute", "security-policies", "create", cfg.res("armor"), "--description=gtsrb-serve: per-client rate limit"],
            "Cloud Armor policy",
            then=(Step(
                gcloud(cfg, "compute", "security-policies", "rules", "create", "1000",
                       f"--security-policy={cfg.res('armor')}", "--src-ip-ranges=*", "--action=throttle",
                       f"--rate-limit-threshold-count={cfg.rate_limit}", "--rate-limit-threshold-interval-sec=60",
                       "--conform-action=allow", "--exceed-action=deny-429", "--enforce-on-key=IP"),
                f"rate limit: {cfg.rate_limit} requests a minute per client IP, 429 beyond",
            ),),
        ),
        *ensure(
            cfg,
            ["compute", "backend-services", "describe", cfg.res("backend"), "--global"],
            ["compute", "backend-services", "create", cfg.res("backend"), "--global",
             "--load-balancing-scheme=EXTERNAL_MANAGED", "--protocol=HTTP", "--port-name=http",
             f"--health-checks={cfg.res('hc')}", "--timeout=30s", "--connection-draining-timeout=60"],
            "backend service: only to healthy VMs; a VM leaving the group gets 60 s to finish its requests",
            then=(Step(
                gcloud(cfg, "compute", "backend-services", "add-backend", cfg.res("backend"), "--global",
                       f"--instance-group={cfg.res('mig')}",
                       f"--instance-group-{'region' if cfg.regional else 'zone'}={cfg.region if cfg.regional else cfg.zone}",
                       "--balancing-mode=UTILIZATION", "--max-utilization=0.8"),
            ),),
        ),
        Step(
            gcloud(cfg, "compute", "backend-services", "update", cfg.res("backend"), "--global",
                   f"--security-policy={cfg.res('armor')}"),
            "Cloud Armor in front of the backend service",
        ),
        Step(
            gcloud(cfg, "compute", "backend-services", "update", cfg.res("backend"), "--global", "--iap=enabled"),
            "Identity-Aware Proxy: every request needs a Google identity allowed below (a user, or a service "
            "account's ID token / signed JWT); the rest get 401/403 at Google's edge",
        ),
        *[
            Step(gcloud(cfg, "iap", "web", "add-iam-policy-binding", "--resource-type=backend-services",
                        f"--service={cfg.res('backend')}", f"--member={m}", "--role=roles/iap.httpsResourceAccessor"),
                 "who may call (--iap-member)" if i == 0 else "")
            for i, m in enumerate(cfg.iap_members)
        ],
        *ensure(cfg, ["compute", "url-maps", "describe", cfg.res("urlmap"), "--global"],
                ["compute", "url-maps", "create", cfg.res("urlmap"), "--global", f"--default-service={cfg.res('backend')}"],
                ""),
        *ensure(
            cfg,
            ["compute", "addresses", "describe", cfg.res("ip"), "--global"],
            ["compute", "addresses", "create", cfg.res("ip"), "--global", "--ip-version=IPV4"],
            f"a static address: point the DNS A record of {cfg.domain} at it",
        ),
        *ensure(
            cfg,
            ["compute", "ssl-certificates", "describe", cfg.res("cert"), "--global"],
            ["compute", "ssl-certificates", "create", cfg.res("cert"), "--global", f"--domains={cfg.domain}"],
            "Google-managed certificate: issued once DNS points at the address (up to an hour)",
        ),
        *ensure(cfg, ["compute", "ssl-policies", "describe", cfg.res("tls"), "--global"],
                ["compute", "ssl-policies", "create", cfg.res("tls"), "--global", "--profile=MODERN",
                 "--min-tls-version=1.2"], ""),
        *ensure(cfg, ["compute", "target-https-proxies", "describe", cfg.res("https-proxy"), "--global"],
                ["compute", "target-https-proxies", "create", cfg.res("https-proxy"), "--global",
                 f"--url-map={cfg.res('urlmap')}", f"--ssl-certificates={cfg.res('cert')}",
                 f"--ssl-policy={cfg.res('tls')}"], ""),
        *ensure(
            cfg,
            ["compute", "forwarding-rules", "describe", cfg.res("https"), "--global"],
            ["compute", "forwarding-rules", "create", cfg.res("https"), "--global",
             "--load-balancing-scheme=EXTERNAL_MANAGED", f"--address={cfg.res('ip')}",
             f"--target-https-proxy={cfg.res('https-proxy')}", "--ports=443"],
            "the only public entry point: HTTPS on 443 (no plain HTTP listener)",
        ),
    ]  # fmt: skip


def demo_commands(cfg: Config, user_data: str) -> list[Step]:
    """--public-http-demo: one VM with a public address, :8080 open to --source-ranges, no TLS, no login."""
    return [
        *build_commands(cfg),
        *service_account_commands(cfg),
        *network_commands(cfg),
        *firewall(cfg, cfg.res("demo-allow-8080"), f"tcp:{PORT}", cfg.source_ranges,
                  "gtsrb-serve public HTTP demo: inference API only",
                  f"PUBLIC DEMO firewall: plain HTTP on tcp:{PORT} from {cfg.source_ranges}, no authentication"),
        *ssh_and_deny_rules(cfg),
        *ensure(
            cfg,
            ["compute", "instances", "describe", cfg.res("demo"), f"--zone={cfg.zone}"],
            ["compute", "instances", "create", cfg.res("demo"), f"--zone={cfg.zone}", *vm_flags(cfg, user_data)],
            f"the demo VM (public address): pulls {cfg.image_ref} at boot and runs it under systemd (an existing "
            "one is kept: teardown and deploy again to change it)",
        ),
    ]  # fmt: skip


def scale_out_commands(cfg: Config) -> list[Step]:
    """Autoscaling of the group `deploy` made, on CPU or on requests per second."""
    steps = []
    if cfg.autoscale_on == "rps":
        # RATE mode defines a backend's capacity as max-rate-per-instance; the autoscaler keeps the group at
        # target_lb_utilization of it, i.e. about max_rps * target_lb_utilization requests/s per VM.
        steps.append(Step(
            gcloud(cfg, "compute", "backend-services", "update-backend", cfg.res("backend"), "--global",
                   f"--instance-group={cfg.res('mig')}",
                   f"--instance-group-{'region' if cfg.regional else 'zone'}={cfg.region if cfg.regional else cfg.zone}",
                   "--balancing-mode=RATE",
                   f"--max-rate-per-instance={cfg.max_rps:g}"),
            f"each VM is worth {cfg.max_rps:g} requests/s to the load balancer",
        ))  # fmt: skip
        signal = [f"--target-load-balancing-utilization={cfg.target_lb_utilization:g}"]
    else:
        signal = [f"--target-cpu-utilization={cfg.target_cpu:g}"]
    steps.append(Step(
        gcloud(cfg, "compute", "instance-groups", "managed", "set-autoscaling", cfg.res("mig"), cfg.mig_scope,
               f"--min-num-replicas={cfg.min_replicas}", f"--max-num-replicas={cfg.max_replicas}",
               f"--cool-down-period={cfg.initial_delay}", *signal),
        f"autoscaling on {'requests per second' if cfg.autoscale_on == 'rps' else 'CPU utilization'}",
    ))  # fmt: skip
    return steps


def teardown_commands(cfg: Config) -> list[Step]:
    """Everything deploy (both modes) creates, newest first, so nothing is deleted while something uses it."""

    def delete(*args: str, note: str = "") -> Step:
        return Step(gcloud(cfg, *args, "--quiet"), note, may_fail=True)

    region, zone = f"--region={cfg.region}", f"--zone={cfg.zone}"
    member = f"--member=serviceAccount:{cfg.service_account}"
    steps = [
        delete("compute", "forwarding-rules", "delete", cfg.res("https"), "--global",
               note="a delete that fails (never created) is reported at the end; the others still run"),
        delete("compute", "target-https-proxies", "delete", cfg.res("https-proxy"), "--global"),
        delete("compute", "ssl-policies", "delete", cfg.res("tls"), "--global"),
        delete("compute", "ssl-certificates", "delete", cfg.res("cert"), "--global"),
        delete("compute", "addresses", "delete", cfg.res("ip"), "--global"),
        delete("compute", "url-maps", "delete", cfg.res("urlmap"), "--global"),
        delete("compute", "backend-services", "delete", cfg.res("backend"), "--global"),  # + its IAP settings
        delete("compute", "security-policies", "delete", cfg.res("armor")),
        delete("compute", "instance-groups", "managed", "delete", cfg.res("mig"), cfg.mig_scope),  # + its autoscaler
        # the group's templates, one per rollout: deploy/rollout.py lists and deletes them after these steps
        delete("compute", "health-checks", "delete", cfg.res("hc-autoheal"), "--global"),
        delete("compute", "health-checks", "delete", cfg.res("hc"), "--global"),
        delete("compute", "instances", "delete", cfg.res("demo"), zone),
        delete("compute", "firewall-rules", "delete", cfg.res("deny-all")),
        delete("compute", "firewall-rules", "delete", cfg.res("allow-iap-ssh")),
        delete("compute", "firewall-rules", "delete", cfg.res("allow-lb")),
        delete("compute", "firewall-rules", "delete", cfg.res("demo-allow-8080")),
        delete("compute", "routers", "nats", "delete", cfg.res("nat"), f"--router={cfg.res('router')}", region),
        delete("compute", "routers", "delete", cfg.res("router"), region),
        *([] if cfg.network else [
            delete("compute", "networks", "subnets", "delete", cfg.res("subnet"), region),
            delete("compute", "networks", "delete", cfg.vpc),
        ]),
        delete("artifacts", "repositories", "remove-iam-policy-binding", cfg.repo, f"--location={cfg.region}",
               member, f"--role={VM_REPO_ROLE}"),
        *[delete("projects", "remove-iam-policy-binding", cfg.project, member, f"--role={role}", "--condition=None")
          for role in reversed(VM_PROJECT_ROLES)],
        delete("iam", "service-accounts", "delete", cfg.service_account),
    ]  # fmt: skip
    if not cfg.keep_images:
        steps.append(delete("artifacts", "repositories", "delete", cfg.repo, f"--location={cfg.region}"))
    return steps


# --------------------------------------------------------------------------------------- monitoring


def instances_command(cfg: Config) -> list[str]:
    """The serving VMs' names, one a line."""
    if cfg.public_http_demo:
        return gcloud(cfg, "compute", "instances", "list", f"--filter=name={cfg.res('demo')}", "--format=value(name)")
    return gcloud(cfg, "compute", "instance-groups", "managed", "list-instances", cfg.res("mig"), cfg.mig_scope,
                  "--format=value(name)")  # fmt: skip


def copy_log_command(cfg: Config, instance: str, dest: str) -> Step:
    """The input-statistics logs of one VM (rotated ones too) into dest/INSTANCE/, over SSH through IAP."""
    return Step(gcloud(cfg, "compute", "scp", f"--zone={cfg.zone}", "--tunnel-through-iap",
                       f"{instance}:{LOG_DIR}/gtsrb_inputs.jsonl*", f"{dest}/{instance}/"))  # fmt: skip


def address_command(cfg: Config) -> list[str]:
    if cfg.public_http_demo:
        return gcloud(cfg, "compute", "instances", "describe", cfg.res("demo"), f"--zone={cfg.zone}",
                      "--format=get(networkInterfaces[0].accessConfigs[0].natIP)")  # fmt: skip
    return gcloud(cfg, "compute", "addresses", "describe", cfg.res("ip"), "--global", "--format=get(address)")
