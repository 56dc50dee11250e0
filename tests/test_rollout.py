"""Rollouts against a fake gcloud that keeps state (what exists, which template the group runs, the canary, the
image digest in the registry: $FAKE_DIGEST stands for a new image pushed under the same tag, so the runs need no
model archive and use --no-build): a second deploy updates instead of failing, a new image goes through a canary, a failed canary check stops the
rollout and puts the group back, rollback restores the previous template. The canary's metrics come from a fake
Prometheus HTTP API in this test. No network, no Google Cloud account."""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tests.test_deploy import PROJECT, SECURE, TAG, ZONE, cli

# A Python gcloud: state in $FAKE_STATE (JSON), every call appended to $FAKE_LOG. Like the real one, `create`
# fails on what exists and `describe` fails on what does not; `builds submit` pushes a new digest.
FAKE_GCLOUD = r"""#!PYTHON
import json, os, sys
args = sys.argv[1:]
state_path = os.environ["FAKE_STATE"]
state = json.load(open(state_path)) if os.path.exists(state_path) else {
    "resources": [], "digest": 1, "templates": [], "mig": None, "canary": None, "backends": []}
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(args) + "\n")
words = [a for a in args if not a.startswith("-")]
flags = dict(a.split("=", 1) if "=" in a else (a, "") for a in args if a.startswith("--"))

def save():
    json.dump(state, open(state_path, "w"))

def fail(msg, code=1):
    print(msg, file=sys.stderr); save(); sys.exit(code)

if words[:2] == ["auth", "print-access-token"]:
    print("fake-token"); sys.exit(0)
if words[:2] == ["builds", "submit"]:
    state["digest"] += 1; save(); sys.exit(0)
if words[:4] == ["artifacts", "docker", "images", "describe"]:
    print("sha256:" + format(int(os.environ.get("FAKE_DIGEST", state["digest"])), "064x")); sys.exit(0)
if "managed" in words:
    verb = words[words.index("managed") + 1]
    if verb == "create":
        if state["mig"]: fail("ERROR: already exists")
        state["mig"] = flags["--template"]
    elif verb == "describe":
        if not state["mig"]: fail("ERROR: not found")
        print(state["mig"] if "--format" in flags else "name: mig")
    elif verb == "rolling-action":
        if "--canary-version" in flags:
            state["canary"] = flags["--canary-version"].split(",")[0].removeprefix("template=")
        else:
            state["mig"], state["canary"] = flags["--version"].removeprefix("template="), None
    elif verb == "list-instances":
        print(f"gtsrb-serve-aaaa {state['mig']} HEALTHY")
        if state["canary"]:
            print(f"gtsrb-serve-cnry {state['canary']} {os.environ.get('FAKE_CANARY_HEALTH', 'HEALTHY')}")
    save(); sys.exit(0)
if words[:2] == ["compute", "instance-templates"]:
    verb, name = words[2], (words[3] if len(words) > 3 else None)
    if verb == "create":
        if name in state["templates"]: fail("ERROR: already exists")
        state["templates"].append(name)
    elif verb == "describe" and name not in state["templates"]:
        fail("ERROR: not found")
    elif verb == "list":
        print("\n".join(state["templates"]))
    elif verb == "delete":
        state["templates"].remove(name)
    save(); sys.exit(0)
if "--format=get(address)" in args:
    print("203.0.113.7"); sys.exit(0)
if "add-backend" in words:
    if words[-1] in state["backends"] or flags["--instance-group"] in state["backends"]: fail("ERROR: Duplicate backend")
    state["backends"].append(flags["--instance-group"])
for verb in ("create", "describe", "delete"):
    if verb in words:
        i = words.index(verb)
        rest = words[i + 1:]
        if words[:i] == ["compute", "health-checks"] and verb == "create":
            rest = rest[1:]
        if words[:i] == ["iam", "service-accounts"] and verb == "create":
            rest = [rest[0] + "@" + flags["--project"] + ".iam.gserviceaccount.com"]
        if words[:i] == ["compute", "security-policies", "rules"]:
            rest = [flags["--security-policy"] + "/" + rest[0]]
        key = " ".join(words[:i] + rest[:1])
        if verb == "create":
            if key in state["resources"]: fail(f"ERROR: {key} already exists")
            state["resources"].append(key)
        elif verb == "describe" and key not in state["resources"]:
            fail(f"ERROR: {key} not found")
        break
save()
"""


class FakePrometheus(BaseHTTPRequestHandler):
    """/api/v1/query: `values` answers by the metric in the query (requests, errors, latency)."""

    values = {}
    seen: list[str] = []

    def do_GET(self):  # noqa: N802
        expr = parse_qs(urlparse(self.path).query)["query"][0]
        self.seen.append(expr)
        assert self.headers["Authorization"] == "Bearer fake-token"
        key = "errors" if "Requests5XX" in expr else "latency" if "latency" in expr else "requests"
        body = {
            "status": "success",
            "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, str(self.values[key])]}]},
        }
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def cloud(tmp_path):
    """deploy/rollback runs against the stateful fake: returns (result, the calls of that run, the state)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.replace("PYTHON", sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakePrometheus.values = {"requests": 500, "errors": 0.0, "latency": 20.0}
    FakePrometheus.seen = []
    metrics = f"http://127.0.0.1:{server.server_address[1]}"
    log, state = tmp_path / "gcloud.log", tmp_path / "state.json"
    from tests.test_deploy import path_without_gcloud

    def run(command: str, *args: str, **env: str):
        log.unlink(missing_ok=True)
        extra = ("--canary-soak", "0", "--metrics-url", metrics) if command == "deploy" else ()
        r = cli(command, "--project", PROJECT, "--zone", ZONE, "--tag", TAG, *args, *extra,
                path=f"{bin_dir}:{path_without_gcloud()}", FAKE_LOG=str(log), FAKE_STATE=str(state), **env)  # fmt: skip
        calls = log.read_text().splitlines() if log.exists() else []
        return r, calls, json.loads(state.read_text()) if state.exists() else {}

    yield run
    server.shutdown()


def creates(calls: list[str]) -> list[str]:
    return [c for c in calls if " create " in f" {c} " and "describe" not in c]


def deploy(cloud, *args, digest: int = 1, **env):
    return cloud("deploy", *SECURE, "--no-build", *args, FAKE_DIGEST=str(digest), **env)


def test_first_deploy_creates_everything_and_a_rerun_changes_nothing(cloud):
    r, calls, state = deploy(cloud)
    assert r.returncode == 0, r.stdout + r.stderr
    (template,) = state["templates"]
    assert state["mig"] == template and template.startswith("gtsrb-serve-tpl-")
    assert "the group runs" in r.stdout and not any("rolling-action" in c for c in calls)  # new group: no canary
    r, calls, again = deploy(cloud)
    assert r.returncode == 0, r.stdout + r.stderr
    assert creates(calls) == [] and again == state  # everything found and reused; same template, nothing rolled
    assert not any("rolling-action" in c or "add-backend" in c for c in calls)


def test_a_new_image_goes_through_a_canary_then_the_whole_group(cloud):
    r, _, first = deploy(cloud)
    assert r.returncode == 0, r.stdout + r.stderr
    r, calls, state = deploy(cloud, digest=2)  # a new image under the same tag
    assert r.returncode == 0, r.stdout + r.stderr
    old, new = state["templates"]
    assert first["mig"] == old and state["mig"] == new and state["canary"] is None
    assert [c.split()[:3] for c in creates(calls)] == [["compute", "instance-templates", "create"]]  # only that
    updates = [c for c in calls if "rolling-action start-update" in c]
    assert f"--version=template={old}" in updates[0] and f"--canary-version=template={new},target-size=1" in updates[0]
    assert f"--version=template={new}" in updates[1] and "--canary-version" not in updates[1]
    assert all("--max-unavailable=0" in u for u in updates)
    assert any('instance="gtsrb-serve-cnry"' in q for q in FakePrometheus.seen)  # the canary's own metrics
    assert "@sha256:" + format(2, "064x") in r.stdout  # the VMs pull the new image, by digest


@pytest.mark.parametrize(
    "values, health, why",
    [
        ({"requests": 500, "errors": 0.05, "latency": 20.0}, "HEALTHY", "5xx ratio 5.00% > 1.00%"),
        ({"requests": 500, "errors": 0.0, "latency": 450.0}, "HEALTHY", "mean latency 450 ms > 100 ms"),
        (
            {"requests": 500, "errors": 0.0, "latency": 20.0},
            "UNHEALTHY",
            "UNHEALTHY in the group's health check",
        ),
    ],
)
def test_a_failed_canary_check_stops_the_rollout_and_puts_the_canary_back(cloud, values, health, why):
    deploy(cloud)
    FakePrometheus.values = values
    r, calls, state = deploy(cloud, digest=2, FAKE_CANARY_HEALTH=health)
    assert r.returncode == 1 and why in r.stderr and "canary check FAILED" in r.stderr, r.stdout + r.stderr
    old, new = state["templates"]
    assert state["mig"] == old and state["canary"] is None  # back to the old template
    updates = [c for c in calls if "rolling-action start-update" in c]
    assert len(updates) == 2 and f"--version=template={new} " not in updates[1] + " "  # never the whole group


def test_rollback_restores_the_previous_template(cloud):
    deploy(cloud)
    deploy(cloud, digest=2)
    r, _, state = cloud("rollback")
    assert r.returncode == 0, r.stdout + r.stderr
    assert state["mig"] == state["templates"][0] and "rollback:" in r.stdout
    r, _, state = cloud("rollback")  # nothing older than the first
    assert r.returncode != 0 and "no template older" in r.stderr
    r, _, state = cloud("rollback", "--to", state["templates"][1])
    assert r.returncode == 0 and state["mig"] == state["templates"][1]


def test_a_regional_group_spreads_over_the_region(cloud):
    r, calls, _ = deploy(cloud, "--regional")
    assert r.returncode == 0, r.stdout + r.stderr
    group = [c for c in calls if " managed " in c]
    assert group and all("--region=europe-west1" in c and "--zone" not in c for c in group)
    (backend,) = [c for c in calls if "add-backend" in c]
    assert "--instance-group-region=europe-west1" in backend


def test_teardown_deletes_every_template_of_the_deployment(cloud):
    deploy(cloud)
    deploy(cloud, digest=2)
    r, calls, state = cloud("teardown")
    assert state["templates"] == []
    mig = next(i for i, c in enumerate(calls) if "managed delete" in c)
    deletes = [i for i, c in enumerate(calls) if c.startswith("compute instance-templates delete")]
    assert len(deletes) == 2 and min(deletes) > mig  # after the group that used them
