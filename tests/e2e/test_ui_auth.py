"""The UI proxy of the compose stack (docker/proxy/), without the stack: the same template, rendered by the same
entrypoint.sh, run by the host's nginx in front of two real dagster-webservers on loopback (one `--read-only`), which
load ops_pipeline.definitions from one code server over gRPC, as in docker-compose.yml.

Users are written by docker/proxy/ui-user.sh (bcrypt). Checked with direct HTTP/GraphQL requests: nothing without
a valid user (401, every path, websockets too); a viewer reads but every mutation is refused by the read-only
webserver and changes nothing in the instance; an operator launches a run and stops a schedule, which the instance
shows; cross-site requests carrying an operator's credentials are refused; large bodies pass. Then in Debian's
Chromium (Playwright, http_credentials): the operator's Launchpad can launch, the viewer's cannot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROXY_DIR = ROOT / "docker" / "proxy"
BIN = Path(sys.executable).parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CHROMIUM = os.environ.get("OPS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

# one worker runs them all: they share one set of servers (module fixture)
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("ui_auth")]

LOCATION = "ops_pipeline"
REPOSITORY = "__repository__"
SCHEDULE = "nightly_backup"
BACKUP_CONFIG = {"ops": {"backup_target": {"config": {"environment": "ui-auth", "trigger": "manual"}}}}

LAUNCH_RUN = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId status } } ... on UnauthorizedError { message }
  ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }"""
SCHEDULE_STATE = """query($s: ScheduleSelector!) { scheduleOrError(scheduleSelector: $s) { __typename
  ... on Schedule { scheduleState { id status } } } }"""
STOP_SCHEDULE = """mutation($id: String!) { stopRunningSchedule(id: $id) { __typename
  ... on ScheduleStateResult { scheduleState { status } } ... on UnauthorizedError { message }
  ... on PythonError { message } } }"""
RESET_SCHEDULE = """mutation($s: ScheduleSelector!) { resetSchedule(scheduleSelector: $s) { __typename
  ... on ScheduleStateResult { scheduleState { status } } ... on UnauthorizedError { message } } }"""
JOBS = """{ repositoriesOrError { ... on RepositoryConnection { nodes { name jobs { name } } } } }"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_params(tags: dict[str, str]) -> dict:
    return {"p": {"selector": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": "backup"},
                  "runConfigData": BACKUP_CONFIG,
                  "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]}}}


SCHEDULE_SELECTOR = {"s": {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "scheduleName": SCHEDULE}}


class Proc:
    """A process in its own session; stop() kills the whole group (webservers start children)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path, cwd: Path = ROOT):
        self.name = name
        self.log = logdir / f"{name}.log"
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def stop(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            pass


def wait_until(what: str, predicate, procs: list[Proc], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for p in procs:
            p.check()
        try:
            if predicate():
                return
        except (httpx.HTTPError, ValueError) as exc:  # not up yet, or not JSON yet (a 502 page)
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} ({last!r})\n" + "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs))


def add_user(users_dir: Path, name: str, role: str, password: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PROXY_DIR / "ui-user.sh"), name, role], input=password + "\n", text=True,
                          capture_output=True, env={**os.environ, "OPS_UI_USERS_DIR": str(users_dir)}, timeout=60)


class UIStack:
    def __init__(self, base: Path):
        self.base = base
        self.home = base / "dagster_home"
        self.home.mkdir()
        shutil.copy(ROOT / "config" / "dagster.yaml", self.home / "dagster.yaml")
        self.users_dir = base / "users"
        self.passwords = {"olivia": "op-" + os.urandom(12).hex(), "victor.v": "vw-" + os.urandom(12).hex()}
        self.procs: list[Proc] = []
        self.grpc_port, self.operator_port, self.viewer_port = free_port(), free_port(), free_port()
        self.port, self.health_port = free_port(), free_port()
        # nginx's workers (www-data when the test runs as root) must reach the runtime folder: not under pytest's
        # 0700 tmp folders
        self.runtime = Path(tempfile.mkdtemp(prefix="ops-ui-proxy-"))
        self.runtime.chmod(0o755)
        self.env = {**os.environ, "DAGSTER_HOME": str(self.home), "DAGSTER_DISABLE_TELEMETRY": "1",
                    "OPS_PROJECT_ROOT": str(ROOT)}
        self.proxy_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
            "OPS_UI_OPERATORS_FILE": str(self.users_dir / "operators.htpasswd"),
            "OPS_UI_VIEWERS_FILE": str(self.users_dir / "viewers.htpasswd"),
            "OPS_UI_OPERATOR_UPSTREAM": f"127.0.0.1:{self.operator_port}",
            "OPS_UI_VIEWER_UPSTREAM": f"127.0.0.1:{self.viewer_port}",
            "OPS_UI_PROXY_LISTEN": f"127.0.0.1:{self.port}",
            "OPS_UI_PROXY_HEALTH_LISTEN": f"127.0.0.1:{self.health_port}",
            "OPS_UI_PROXY_RUNTIME": str(self.runtime),
            "NGINX": NGINX,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth(self, user: str) -> tuple[str, str]:
        return user, self.passwords[user]

    def start(self) -> UIStack:
        t0 = time.monotonic()
        for name, password in self.passwords.items():
            made = add_user(self.users_dir, name, "operator" if name == "olivia" else "viewer", password)
            assert made.returncode == 0, made.stderr
        import dagster as dg

        with dg.DagsterInstance.from_config(str(self.home)) as inst:  # storage created once, before three processes
            inst.get_runs(limit=1)
        # as docker-compose.yml: one code server, two webservers loading it over gRPC
        (self.base / "workspace.yaml").write_text(yaml.safe_dump({"load_from": [{"grpc_server": {
            "host": "127.0.0.1", "port": self.grpc_port, "location_name": LOCATION}}]}))
        self.procs.append(Proc("code_server", [str(BIN / "dagster"), "code-server", "start", "-m", "ops_pipeline.definitions",
                                               "--location-name", LOCATION, "-h", "127.0.0.1", "-p", str(self.grpc_port)],
                               self.env, self.base))
        for name, port, extra in (("webserver", self.operator_port, []),
                                  ("webserver_readonly", self.viewer_port, ["--read-only"])):
            self.procs.append(Proc(name, [str(BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port),
                                          "-w", str(self.base / "workspace.yaml"), *extra], self.env, self.base))
        self.procs.append(Proc("ui_proxy", ["sh", str(PROXY_DIR / "entrypoint.sh")], self.proxy_env, self.base))

        def healthy() -> bool:  # through the proxy's health listener: both webservers answer
            return all(httpx.get(f"http://127.0.0.1:{self.health_port}/health/{role}", timeout=5).status_code == 200
                       for role in ("operator", "viewer"))
        wait_until("both webservers through the proxy's health listener", healthy, self.procs, 240)

        def location_loaded(user: str) -> bool:
            data = self.graphql(user, JOBS, check=False).json().get("data") or {}
            nodes = (data.get("repositoriesOrError") or {}).get("nodes") or []
            return any(job["name"] == "backup" for node in nodes for job in node["jobs"])
        # each webserver loads the code location on its own: wait for both (the operator's was once still loading
        # when the viewer's had it, and a launch got PipelineNotFoundError)
        wait_until("code location loaded by both webservers",
                   lambda: all(location_loaded(user) for user in ("victor.v", "olivia")), self.procs, 180)
        self.startup_s = round(time.monotonic() - t0, 1)
        return self

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)

    def proxy_log(self) -> str:
        return next(p for p in self.procs if p.name == "ui_proxy").tail(80)

    def graphql(self, user: str | None, query: str, variables: dict | None = None, *, password: str | None = None,
                headers: dict | None = None, check: bool = True) -> httpx.Response:
        auth = None if user is None else (user, password if password is not None else self.passwords[user])
        r = httpx.post(self.url + "/graphql", json={"query": query, "variables": variables or {}}, auth=auth,
                       headers=headers or {}, timeout=60)
        if check:
            assert r.status_code == 200, f"{r.status_code} {r.text[:300]}\n{self.proxy_log()}"
        return r

    def data(self, user: str, query: str, variables: dict | None = None) -> dict:
        reply = self.graphql(user, query, variables).json()
        assert not reply.get("errors"), reply["errors"]
        return reply["data"]

    def instance(self):
        import dagster as dg

        return dg.DagsterInstance.from_config(str(self.home))

    def runs(self) -> list:
        with self.instance() as inst:
            return list(inst.get_runs())

    def schedule_status(self) -> str:
        """The schedule's status as the instance stores it (no stored state: its default, RUNNING)."""
        from dagster._core.scheduler.instigation import InstigatorType

        with self.instance() as inst:
            states = [s for s in inst.all_instigator_state(instigator_type=InstigatorType.SCHEDULE) if s.name == SCHEDULE]
        return states[0].status.value if states else "DEFAULT"


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory):
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    if shutil.which("htpasswd") is None:
        pytest.fail("htpasswd is not installed (apt-get install apache2-utils; .ci/run installs it)")
    stack = UIStack(tmp_path_factory.mktemp("ui_auth"))
    try:
        stack.start()
    except Exception:
        stack.stop()
        raise
    print(f"\nui-auth stack up in {stack.startup_s} s (code server, 2 webservers, nginx)")
    yield stack
    stack.stop()


# --------------------------------------------------------------------------- the users' files (no servers)

def render(tmp_path: Path, operators: str, viewers: str) -> subprocess.CompletedProcess:
    """entrypoint.sh render with these two files' contents."""
    (tmp_path / "ops").write_text(operators)
    (tmp_path / "vws").write_text(viewers)
    runtime = tmp_path / f"rt{os.urandom(3).hex()}"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin", "NGINX": NGINX,
           "OPS_UI_OPERATORS_FILE": str(tmp_path / "ops"), "OPS_UI_VIEWERS_FILE": str(tmp_path / "vws"),
           "OPS_UI_PROXY_RUNTIME": str(runtime), "OPS_UI_OPERATOR_UPSTREAM": "127.0.0.1:1",
           "OPS_UI_VIEWER_UPSTREAM": "127.0.0.1:2", "OPS_UI_PROXY_LISTEN": "127.0.0.1:3",
           "OPS_UI_PROXY_HEALTH_LISTEN": "127.0.0.1:4", "OPS_UI_PROXY_USER": "root"}
    return subprocess.run(["sh", str(PROXY_DIR / "entrypoint.sh"), "render"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_users_files_are_checked_before_nginx_starts(tmp_path):
    if not Path(NGINX).exists() or shutil.which("htpasswd") is None:
        pytest.fail("nginx and htpasswd are needed (apt-get install nginx apache2-utils; .ci/run installs them)")
    users = tmp_path / "users"
    for name, role in (("ann", "operator"), ("ben", "viewer"), ("cy.d", "viewer")):
        made = add_user(users, name, role, f"{name}-password-long")
        assert made.returncode == 0, made.stderr
    ops, vws = (users / "operators.htpasswd").read_text(), (users / "viewers.htpasswd").read_text()
    assert [line.split(":")[0] for line in ops.splitlines()] == ["ann"]
    assert all(line.split(":")[1].startswith("$2y$10$") for line in (ops + vws).splitlines())
    assert "ann-password-long" not in ops + vws
    ok = render(tmp_path, ops, vws)
    assert ok.returncode == 0, ok.stderr
    assert "1 operator(s), 2 viewer(s)" in ok.stderr

    # a role change moves the user; delete removes them; short passwords and odd names are refused
    assert add_user(users, "ben", "operator", "ben-new-password-long").returncode == 0
    assert "ben:" in (users / "operators.htpasswd").read_text()
    assert "ben:" not in (users / "viewers.htpasswd").read_text()
    assert add_user(users, "ben", "delete", "").returncode == 0
    assert "ben:" not in (users / "operators.htpasswd").read_text() + (users / "viewers.htpasswd").read_text()
    assert add_user(users, "dee", "viewer", "short").returncode != 0
    assert add_user(users, "e:f", "viewer", "long-enough-password").returncode != 0

    hash_line = ops.splitlines()[0]
    refused = {
        "plaintext password": (ops + "eve:secret-in-clear\n", vws),
        "MD5 (apr1) hash": (ops + "eve:$apr1$abcdefgh$0123456789abcdefghijkl\n", vws),
        "user in both roles": (ops, vws + hash_line + "\n"),
        "user twice": (ops + hash_line + "\n", vws),
        "no users at all": ("# nobody\n", "\n"),
        "name nginx's map could misread": (ops + hash_line.replace("ann:", "a(n)n:") + "\n", vws),
    }
    for case, (operators, viewers) in refused.items():
        proc = render(tmp_path, operators, viewers)
        assert proc.returncode != 0, f"{case}: accepted\n{proc.stderr}"
        assert "ui_proxy:" in proc.stderr, (case, proc.stderr)
        assert "secret-in-clear" not in proc.stderr and "$2y$" not in proc.stderr, (case, proc.stderr)


# ------------------------------------------------------------------------------------------- direct requests

UNAUTHENTICATED_PATHS = ["/", "/overview", "/runs", "/locations/ops_pipeline/jobs/backup/playground", "/server_info",
                         "/graphql", "/logs/x", "/download_debug/x", "/favicon.png", "/health/operator"]


@pytest.mark.timeout(600)
def test_nothing_without_a_valid_user(ui_stack):
    s = ui_stack
    for path in UNAUTHENTICATED_PATHS:
        for method in ("GET", "POST"):
            r = httpx.request(method, s.url + path, timeout=30)
            assert r.status_code == 401, f"{method} {path}: {r.status_code}"
            assert r.headers.get("www-authenticate", "").startswith("Basic"), r.headers
    # the launch mutation: unauthenticated, wrong password, unknown user, another user's password
    for user, password in ((None, None), ("olivia", "wrong-password"), ("mallory", s.passwords["olivia"]),
                           ("olivia", s.passwords["victor.v"]), ("Olivia", s.passwords["olivia"])):
        r = s.graphql(user, LAUNCH_RUN, launch_params({"test": "unauthenticated"}), password=password, check=False)
        assert r.status_code == 401, (user, r.status_code, r.text[:200])
    r = httpx.post(s.url + "/report_asset_materialization/deployments/ui-auth", timeout=30)
    assert r.status_code == 401
    # the websocket of GraphQL subscriptions too
    assert ws_handshake(s.port, None) == 401
    # and none of it reached Dagster
    assert s.runs() == []
    assert s.schedule_status() == "DEFAULT"


@pytest.mark.timeout(600)
def test_viewer_reads_and_every_mutation_is_refused(ui_stack):
    s = ui_stack
    jobs = {j["name"] for n in s.data("victor.v", JOBS)["repositoriesOrError"]["nodes"] for j in n["jobs"]}
    assert {"release", "rollback", "backup", "restore_drill"} <= jobs
    r = httpx.get(s.url + "/server_info", auth=s.auth("victor.v"), timeout=30)
    assert r.status_code == 200 and r.json()["dagster_webserver_version"]
    page = httpx.get(s.url + "/locations/ops_pipeline/jobs/backup/playground", auth=s.auth("victor.v"), timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()

    launched = s.data("victor.v", LAUNCH_RUN, launch_params({"test": "viewer"}))["launchRun"]
    assert launched == {"__typename": "UnauthorizedError", "message": "Authorization failed"}, launched
    # the one launching mutation without a permission check of its own delegates to launchRun's
    multiple = s.data("victor.v", """mutation($l: [ExecutionParams!]!) { launchMultipleRuns(executionParamsList: $l) {
        __typename ... on LaunchMultipleRunsResult { launchMultipleRunsResult { __typename } } } }""",
                      {"l": [launch_params({"test": "viewer"})["p"]] * 2})["launchMultipleRuns"]
    assert [r["__typename"] for r in multiple["launchMultipleRunsResult"]] == ["UnauthorizedError"] * 2, multiple
    schedule = s.data("victor.v", SCHEDULE_STATE, SCHEDULE_SELECTOR)["scheduleOrError"]["scheduleState"]
    assert schedule["status"] == "RUNNING"
    stopped = s.data("victor.v", STOP_SCHEDULE, {"id": schedule["id"]})["stopRunningSchedule"]
    assert stopped["__typename"] == "UnauthorizedError", stopped
    # a runless materialization of the release history is a write too
    r = httpx.post(s.url + "/report_asset_materialization/deployments/ui-auth", auth=s.auth("victor.v"),
                   json={"metadata": {"version": "forged"}}, timeout=30)
    assert r.status_code == 401 and "Not authorized" in r.text, (r.status_code, r.text)

    assert [run for run in s.runs() if run.tags.get("test") == "viewer"] == []
    assert s.schedule_status() == "DEFAULT"
    with s.instance() as inst:
        import dagster as dg

        assert inst.get_latest_materialization_event(dg.AssetKey(["deployments", "ui-auth"])) is None


@pytest.mark.timeout(600)
def test_operator_launches_a_run_and_stops_a_schedule(ui_stack):
    s = ui_stack
    launched = s.data("olivia", LAUNCH_RUN, launch_params({"test": "operator"}))["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    (run,) = [r for r in s.runs() if r.tags.get("test") == "operator"]
    assert run.run_id == run_id and run.job_name == "backup"
    assert run.status.value == "QUEUED"  # QueuedRunCoordinator; no daemon here to dequeue it
    assert run.run_config == BACKUP_CONFIG

    schedule = s.data("olivia", SCHEDULE_STATE, SCHEDULE_SELECTOR)["scheduleOrError"]["scheduleState"]
    stopped = s.data("olivia", STOP_SCHEDULE, {"id": schedule["id"]})["stopRunningSchedule"]
    assert stopped == {"__typename": "ScheduleStateResult", "scheduleState": {"status": "STOPPED"}}, stopped
    assert s.schedule_status() == "STOPPED"
    # the viewer's webserver sees the same instance
    assert s.data("victor.v", SCHEDULE_STATE, SCHEDULE_SELECTOR)["scheduleOrError"]["scheduleState"]["status"] == "STOPPED"
    reset = s.data("olivia", RESET_SCHEDULE, SCHEDULE_SELECTOR)["resetSchedule"]
    assert reset["__typename"] == "ScheduleStateResult" and reset["scheduleState"]["status"] == "RUNNING", reset


@pytest.mark.timeout(600)
def test_cross_site_requests_with_an_operators_credentials_are_refused(ui_stack):
    """What another site's page could make the operator's browser send (its Basic credentials go along)."""
    s = ui_stack
    evil = {"Origin": "http://evil.example"}
    r = s.graphql("olivia", LAUNCH_RUN, launch_params({"test": "csrf-json"}), headers=evil, check=False)
    assert r.status_code == 403, r.status_code
    # a form POST or an <img>: the query in the URL (Dagster reads it from there for non-JSON bodies and GETs)
    query = LAUNCH_RUN.replace("$p: ExecutionParams!", "").replace("executionParams: $p", "executionParams: " +
                                                                   gql_literal(launch_params({"test": "csrf-url"})["p"]))
    for method, kwargs in (("GET", {}), ("POST", {"data": {"x": "1"}})):
        r = httpx.request(method, s.url + "/graphql", params={"query": query}, auth=s.auth("olivia"), timeout=30, **kwargs)
        assert r.status_code == 403, (method, r.status_code, r.text[:200])
    r = httpx.post(s.url + "/report_asset_materialization/deployments/ui-auth", auth=s.auth("olivia"), headers=evil,
                   timeout=30)
    assert r.status_code == 403
    assert ws_handshake(s.port, s.auth("olivia"), origin="http://evil.example") == 403
    assert [r for r in s.runs() if r.tags.get("test", "").startswith("csrf")] == []
    # the same query in the URL does reach Dagster without the proxy: the refusal above is the proxy's
    direct = httpx.get(f"http://127.0.0.1:{s.operator_port}/graphql", params={"query": "{ version }"}, timeout=30)
    assert direct.status_code == 200 and direct.json()["data"]["version"]
    # same-origin requests (what the UI sends) pass
    same = {"Origin": s.url}
    assert s.graphql("victor.v", "{ version }", headers=same).json()["data"]["version"]


@pytest.mark.timeout(600)
def test_websocket_subscriptions_and_large_bodies_pass(ui_stack):
    s = ui_stack
    for user in ("olivia", "victor.v"):
        assert ws_handshake(s.port, s.auth(user), origin=s.url, init=True) == 101
    # 3 MB of JSON (nginx's default limit is 1 MB: 413)
    big = {"name": "x" * 3_000_000}
    r = s.graphql("victor.v", """query($name: String!) { pipelineOrError(params: {repositoryLocationName: "ops_pipeline",
        repositoryName: "__repository__", pipelineName: $name}) { __typename } }""", big)
    assert r.json()["data"]["pipelineOrError"]["__typename"] == "PipelineNotFoundError", r.text[:200]


def gql_literal(value) -> str:
    """A GraphQL input literal of a JSON value (object keys unquoted)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {gql_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(gql_literal(v) for v in value) + "]"
    return json.dumps(value)


def ws_handshake(port: int, auth: tuple[str, str] | None, *, origin: str | None = None, init: bool = False) -> int:
    """Status of a websocket handshake on /graphql (101 when upgraded); with init, also the graphql-ws ack."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = ["GET /graphql HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: graphql-ws"]
    if origin:
        lines.append(f"Origin: {origin}")
    if auth:
        lines.append("Authorization: Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status == 101 and init:
            send_ws_text(sock, json.dumps({"type": "connection_init", "payload": {}}))
            reply = recv_ws_text(sock, head.split(b"\r\n\r\n", 1)[1])
            assert json.loads(reply)["type"] == "connection_ack", reply
    return status


def send_ws_text(sock: socket.socket, text: str) -> None:
    payload = text.encode()
    mask = os.urandom(4)
    assert len(payload) < 126
    frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(frame)


def recv_ws_text(sock: socket.socket, buffered: bytes) -> str:
    data = buffered
    while len(data) < 2:
        data += sock.recv(4096)
    length = data[1] & 0x7F
    offset = 2
    if length == 126:
        while len(data) < 4:
            data += sock.recv(4096)
        length, offset = int.from_bytes(data[2:4], "big"), 4
    while len(data) < offset + length:
        data += sock.recv(4096)
    return data[offset:offset + length].decode()


# ---------------------------------------------------------------------------------------------------- browser

PLAYGROUND = "/locations/ops_pipeline/jobs/backup/playground"
BROWSER_CONFIG = {"ops": {"backup_target": {"config": {"environment": "ui-auth-browser", "trigger": "manual"}}}}


def set_editor(page, text: str) -> None:
    """Replace the content of the Launchpad's config editor (CodeMirror 5) through the editor's own API."""
    editor = page.locator(".CodeMirror").first
    editor.wait_for(state="visible")
    editor.click()
    page.evaluate("""(v) => { const cm = document.querySelector('.CodeMirror').CodeMirror;
                              cm.setValue(v); cm.focus(); cm.setCursor(cm.lineCount(), 0); }""", text)


class BrowserUser:
    """A browser context of one user (or of nobody), allowed to reach the proxy only; records what it saw."""

    def __init__(self, browser, stack: UIStack, user: str | None, password: str | None = None):
        credentials = None if user is None else {"username": user, "password": password or stack.passwords[user]}
        self.context = browser.new_context(http_credentials=credentials, viewport={"width": 1400, "height": 900},
                                           timezone_id="UTC", locale="en-US")
        self.context.set_default_timeout(60_000)
        self.context.add_init_script("try { window.localStorage.setItem('communityNux', 'true'); } catch (e) {}")
        self.context.route(lambda url: not url.startswith(stack.url), lambda route: route.abort())
        self.page = self.context.new_page()
        self.refused: list[tuple[int, str]] = []
        self.websockets: list[str] = []
        self.ws_frames = 0
        self.page.on("response", lambda r: self.refused.append((r.status, r.url)) if r.status in (401, 403) else None)
        self.page.on("websocket", self._on_ws)

    def _on_ws(self, ws) -> None:
        self.websockets.append(ws.url)
        ws.on("framereceived", lambda _payload: setattr(self, "ws_frames", self.ws_frames + 1))

    def close(self) -> None:
        self.context.close()


@pytest.mark.browser
@pytest.mark.timeout(900)
def test_browser_operator_launches_viewer_is_read_only(ui_stack, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set OPS_CHROMIUM)")
    import re

    expect = sync_api.expect
    expect.set_options(timeout=60_000)
    s = ui_stack
    timings: dict[str, float] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        current: BrowserUser | None = None
        try:
            # ---- nobody, and a wrong password: Chromium gets the 401 (and shows it, or, having no right
            # credentials to answer it with, fails the navigation); never the UI
            for user, password in ((None, None), ("olivia", "not-the-password")):
                current = BrowserUser(browser, s, user, password)
                try:
                    status = current.page.goto(s.url + PLAYGROUND).status
                    assert "401 Authorization Required" in current.page.content()
                except sync_api.Error as exc:
                    assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc), exc
                    status = 401
                assert status == 401, (user, status)
                expect(current.page.get_by_text("Launch Run")).to_have_count(0)
                current.close()

            # ---- the operator: the Launchpad launches (a backup run, queued: no daemon here)
            current = op = BrowserUser(browser, s, "olivia")
            t0 = time.monotonic()
            op.page.goto(s.url + PLAYGROUND)
            launch = op.page.get_by_role("button", name="Launch Run")
            expect(launch).to_be_enabled()
            timings["operator: Launchpad ready"] = time.monotonic() - t0
            set_editor(op.page, yaml.safe_dump(BROWSER_CONFIG, sort_keys=False))
            expect(op.page.get_by_text("No errors", exact=True)).to_be_visible()
            launch.click()
            op.page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
            run_id = re.search(r"/runs/([0-9a-f-]{36})", op.page.url).group(1)
            (run,) = [r for r in s.runs() if r.run_config == BROWSER_CONFIG]
            assert run.run_id == run_id and run.job_name == "backup" and run.status.value == "QUEUED"
            # the run page: its status comes over the GraphQL websocket, through the proxy
            expect(op.page.get_by_text("Queued", exact=True).first).to_be_visible()
            assert any(u.startswith(s.url.replace("http", "ws", 1) + "/graphql") for u in op.websockets), op.websockets
            op.page.wait_for_timeout(1_000)
            assert op.ws_frames > 0, "no websocket frame received through the proxy"
            assert op.refused == [], op.refused
            op.page.screenshot(path=str(tmp_path / "operator_run.png"))
            op.close()

            # ---- the viewer: the read-only UI, no Launchpad, no launch; the operator's run is visible
            current = viewer = BrowserUser(browser, s, "victor.v")
            t0 = time.monotonic()
            viewer.page.goto(s.url + PLAYGROUND)
            # the read-only UI sends the Launchpad back to the job's overview and disables its tab
            viewer.page.wait_for_url(re.compile(r"/locations/ops_pipeline/jobs/backup/?$"))
            expect(viewer.page.get_by_role("tab", name="Launchpad")).to_be_disabled()
            timings["viewer: job page ready"] = time.monotonic() - t0
            expect(viewer.page.get_by_role("button", name="Launch Run")).to_have_count(0)
            viewer.page.goto(s.url + f"/runs/{run_id}")
            expect(viewer.page.get_by_text("Queued", exact=True).first).to_be_visible()
            viewer.page.wait_for_timeout(1_000)
            assert viewer.websockets and viewer.ws_frames > 0, (viewer.websockets, viewer.ws_frames)
            assert viewer.refused == [], viewer.refused
            viewer.page.screenshot(path=str(tmp_path / "viewer_run.png"))
            viewer.close()
            current = None
        finally:
            if current is not None:
                try:
                    current.page.screenshot(path=str(tmp_path / "failure.png"))
                    print(f"\nfailed on {current.page.url}; screenshot {tmp_path / 'failure.png'}")
                except Exception:  # noqa: BLE001
                    pass
                current.close()
            browser.close()
    assert len([r for r in s.runs() if r.run_config == BROWSER_CONFIG]) == 1
    print("\n" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
