"""Bad input, exhaustively: property-based tests (hypothesis) of the release spec and every job's config.

Whatever is refused is refused before any side effect, with one error naming each bad field:
  1. valid specs (built from the config classes' fields) are accepted;
  2. one bad field (or several) gives exactly one problem each, starting with that field's dotted path;
  3. no input crashes validation (weird strings, NaN, inf, huge numbers): problems, never an exception;
  4. the first op of the release, rollback, backup and restore jobs refuses bad config with a dg.Failure naming the
     fields, before any state folder, PM2 daemon, database or backup exists.

Derandomized (the same examples every run, so a failure reproduces); `print_blob` prints the failing example.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import dagster as dg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ops_pipeline.platform import paths
from ops_pipeline.platform.spec import ENV_NAME, ReleaseConfig, validate_release_config

FAST = settings(max_examples=60, derandomize=True, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
# Ops with real resources and a per-test Dagster instance: few examples, the fixture is shared on purpose
# (nothing may be written, which is what is checked after each example).
OPS = settings(max_examples=8, derandomize=True, deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- strategies of valid values, field by field -------------------------------------------------------------------

env_name = st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True)
version = st.one_of(st.just(""), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,20}", fullmatch=True))
suffix = st.from_regex(r"[A-Z0-9_]{1,6}", fullmatch=True)
k8s_name = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
pg_name = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
hostname = st.one_of(st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
                     st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))))
port = st.integers(1, 65535)
url_path = st.from_regex(r"(/[a-z0-9._-]{0,8}){0,3}", fullmatch=True)
http_url = st.builds(lambda s, h, p, path: f"{s}://{h}{'' if p is None else f':{p}'}{path}",
                     st.sampled_from(["http", "https"]), hostname, st.none() | port, url_path)
positive = st.floats(0.01, 1e4, allow_nan=False, allow_infinity=False)
non_negative = st.floats(0, 1e4, allow_nan=False, allow_infinity=False)
secret_ref = st.one_of(st.builds(lambda s: f"env:SRC_{s}", suffix),
                       st.from_regex(r"file:/[a-z0-9/._-]{1,20}", fullmatch=True), st.just("generate"))
health_version = st.one_of(st.just("off"), st.from_regex(r"json:[A-Za-z0-9_$-]{1,8}(\.[A-Za-z0-9_$-]{1,8}){0,2}", fullmatch=True),
                           st.from_regex(r"header:[A-Za-z0-9-]{1,12}", fullmatch=True))
instance_value = st.lists(st.sampled_from(["{slot}", "{port}", "{instance_dir}", "x", "/", "-", "{{", "}}"]),
                          max_size=5).map("".join)
step_name = st.from_regex(r"[a-z][a-z0-9_:-]{0,10}", fullmatch=True)


def names(prefix: str, max_size: int = 3):
    """Unique variable names of one group; each group has its own prefix, so groups never collide."""
    return st.lists(suffix, unique=True, max_size=max_size).map(lambda xs: [f"{prefix}{x}" for x in xs])


@st.composite
def app_vars(draw, prefix: str) -> dict:
    parts = ("url", "host", "port", "database", "user", "password", "tls")
    chosen = draw(st.sets(st.sampled_from(parts), min_size=1))
    if not chosen & {"url", "host"}:
        chosen.add("url")
    return {p: (f"{prefix}{p.upper()}" if p in chosen else "") for p in parts}


@st.composite
def valid_specs(draw) -> dict:
    production = draw(st.booleans())
    required = draw(names("R_"))
    shutdown = draw(st.floats(0, 60))
    kind = draw(st.sampled_from(["pm2", "docker", "kubernetes"]))
    k = draw(st.integers(1, 10))
    interval = draw(st.floats(0.01, 5))
    refs = secret_ref.filter(lambda r: not (production and r == "generate"))
    steps = draw(st.lists(step_name, unique=True, max_size=4))
    return {
        "environment": draw(env_name),
        "production": production,
        "embedded_services": False if production else draw(st.booleans()),
        "version": draw(version),
        "lock_wait_s": draw(non_negative),
        "dependency_timeout_s": draw(positive),
        "app": {
            "name": draw(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)),
            "required_env": required + ["JWT_SECRET", "NODE_ENV"],
            "secret_env": draw(st.sampled_from([[], ["JWT_SECRET"]])) + required[:1],
            "env": {n: draw(st.text(max_size=10)) for n in draw(names("E_"))},
            "secrets": {n: draw(refs) for n in draw(names("S_"))},
            "instance_env": {n: draw(instance_value) for n in draw(names("I_"))},
            "database": {"url_from": draw(st.sampled_from(["env:DATABASE_URL", "file:/run/secrets/db"])),
                         "embedded_database": draw(pg_name), "embedded_role": draw(pg_name),
                         "app_vars": draw(app_vars("DB_"))},
            "redis": {"enabled": draw(st.booleans()), "url_from": "env:REDIS_URL", "embedded_db": draw(st.integers(0, 15)),
                      "app_vars": draw(app_vars("RD_"))},
            "health_path": draw(url_path.map(lambda p: p or "/")),
            "health_version": draw(health_version),
            "port_env": draw(st.sampled_from(["PORT", "HTTP_PORT"])),
            "instance_port_env": draw(st.sampled_from(["", "INSTANCE_PORT"])),
            "start_dir": draw(st.sampled_from(["", "server", "packages/api"])),
            "min_secret_length": draw(st.integers(1, 128)),
            "shutdown_timeout_s": shutdown,
            "migration_lock_timeout_s": draw(positive),
            "migration_statement_timeout_s": draw(positive),
            "bundle_paths": draw(st.lists(st.sampled_from(["dist", "migrations", "public/assets"]), unique=True)),
            "commands": {"timeout_s": draw(positive), "migrate": draw(st.sampled_from(["npm run migrate", "true"])),
                         "package_manager": draw(st.sampled_from(["", "npm"])),
                         "steps": [{"name": s} for s in steps]},
        },
        "target": {
            "kind": kind,
            "instances": draw(st.integers(1, 64)),
            "host": draw(hostname),
            "port": draw(port),
            "public_url": draw(st.one_of(st.just(""), http_url)),
            "pm2": {"keep_releases": draw(st.integers(2, 50)), "listen_timeout_s": draw(positive),
                    "drain_s": draw(non_negative), "kill_timeout_s": shutdown + draw(st.floats(0.5, 60))},
            "docker": {"container_port": draw(port), "drain_s": draw(non_negative), "start_timeout_s": draw(non_negative)},
            "kubernetes": {"namespace": draw(k8s_name), "deployment": draw(k8s_name), "container": draw(k8s_name),
                           "image_repository": "registry.example:5000/app",
                           "api_server": draw(st.one_of(st.just(""), http_url)),
                           "progress_deadline_s": draw(positive)},
        },
        "gate": {"interval_s": interval, "request_timeout_s": draw(positive), "required_successes": k,
                 "deadline_s": (k - 1) * interval + draw(st.floats(0.5, 300))},
    }


def problems_of(data: dict, **kw) -> list[str]:
    kw.setdefault("check_paths", False)
    return validate_release_config(ReleaseConfig(**data), **kw)


@settings(FAST, max_examples=80)
@given(valid_specs())
def test_valid_specs_are_accepted(data):
    assert problems_of(data) == []


# --- mutations: one bad field at a time -----------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
bad_env_name = st.sampled_from(["", "Prod", "1abc", "a" * 41, "local\n", "lo cal", "é", "a_b", "-a"])
bad_var = st.sampled_from(["1X", "A-B", "A B", "X\n", "é", "$X", "A.B"])
bad_ref = st.sampled_from(["plain-value", "env:", "env:1X", "env:A-B", "file:relative", "file:", "env:A\n", "generated", ""])
bad_placeholder = st.sampled_from(["{nope}", "{0}", "{}", "{slot.x}", "{port[0]}", "{instance_dir[9]}", "{", "}", "{port!z}",
                                   "{port:zz}", "{slot.__class__.x}", "x{PORT}"])
bad_url = st.sampled_from(["http//no-scheme", "ftp://host/", "http://h:notaport/", "http://h:70000/", "http://", "http://[::1", "http://h x/",
                           "host:80", "http://h\n/"])
bad_k8s = st.sampled_from(["Api", "-a", "a-", "a_b", "", "a\n", "a" * 70 + "\n", "é"])
bad_pg = st.sampled_from(["App", "1a", "a-b", "", "a" * 64, "a\n", "é"])
neg_or_nan = st.sampled_from([-1.0, -1e-9, NAN, -INF, INF])
non_pos = st.sampled_from([0.0, -1.0, NAN, -INF, INF])


@dataclass(frozen=True)
class Mutation:
    path: str  # the field; the problem must start with it (or one of `also`)
    bad: st.SearchStrategy
    apply: Callable[[dict, object], None]
    kind: str | None = None  # the target kind the field is checked for
    touches: tuple[str, ...] = ()  # other fields it changes (never combined with a mutation of those)
    also: tuple[str, ...] = ()  # other paths a problem may start with (a relation between two fields)

    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.also)


def setter(path: str):
    keys = path.split(".")

    def apply(cfg: dict, value) -> None:
        d = cfg
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    return apply


def number(path: str, bad, **kw) -> Mutation:
    return Mutation(path, bad, setter(path), **kw)


def _add_to(group: str, name: str, cfg: dict, value) -> None:
    app = cfg["app"]
    if group == "required_env":
        app["required_env"].append(name)
    elif group in ("port_env", "version_env", "instance_port_env"):
        app[group] = name
    elif group in ("env", "secrets", "instance_env"):
        app[group][name] = value
    else:  # database / redis app_vars: the name goes into its `tls` part
        app[group]["app_vars"]["tls"] = name
        app["redis"]["enabled"] = True


def duplicate(first: str, second: str) -> Mutation:
    """The same variable name in two places: one problem, naming the second (or the first)."""
    valid_value = {"env": "v", "secrets": "env:SRC_DUP", "instance_env": "{slot}"}
    path = {"database": "app.database.app_vars.tls", "redis": "app.redis.app_vars.tls", "required_env": "app.required_env",
            "port_env": "app.port_env", "version_env": "app.version_env", "instance_port_env": "app.instance_port_env"}

    def where(group: str, name: str) -> str:
        return path.get(group, f"app.{group}.{name}")

    def apply(cfg: dict, name: str) -> None:
        _add_to(first, name, cfg, valid_value.get(first))
        _add_to(second, name, cfg, valid_value.get(second))

    name = f"DUP_{first.upper()}_{second.upper()}"
    return Mutation(where(second, name), st.just(name), apply, touches=(f"dup:{first}", f"dup:{second}", where(first, name)),
                    also=(where(first, name),))


def add_key(group: str, value: str) -> Mutation:
    """A new entry with a bad variable name in app.<group>."""
    def apply(cfg: dict, name: str) -> None:
        cfg["app"][group][name] = value
    return Mutation(f"app.{group}.*", bad_var, apply, touches=(f"key:{group}",))


def add_value(group: str, bad) -> Mutation:
    def apply(cfg: dict, value: str) -> None:
        cfg["app"][group][f"BAD_{group.upper()}"] = value
    return Mutation(f"app.{group}.BAD_{group.upper()}", bad, apply)


def _production(cfg: dict, _value) -> None:
    cfg["production"], cfg["embedded_services"] = True, True
    cfg["app"]["secrets"] = {k: ("env:SRC_X" if v == "generate" else v) for k, v in cfg["app"]["secrets"].items()}


def _generate_in_production(cfg: dict, _value) -> None:
    cfg["production"], cfg["embedded_services"] = True, False
    cfg["app"]["secrets"] = {k: ("env:SRC_X" if v == "generate" else v) for k, v in cfg["app"]["secrets"].items()}
    cfg["app"]["secrets"]["BAD_GEN"] = "generate"


def _gate_arithmetic(cfg: dict, k: int) -> None:
    g = cfg["gate"]
    g["required_successes"] = k
    g["deadline_s"] = (k - 1) * g["interval_s"] * 0.99


def _append(path: str):
    keys = path.split(".")

    def apply(cfg: dict, value) -> None:
        d = cfg
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = [*d[keys[-1]], value]
    return apply


def _no_url_nor_host(block: str):
    def apply(cfg: dict, _value) -> None:
        cfg["app"][block]["app_vars"]["url"] = cfg["app"][block]["app_vars"]["host"] = ""
        cfg["app"]["redis"]["enabled"] = True
    return apply


def _redis_url_from(cfg: dict, value: str) -> None:
    cfg["app"]["redis"]["enabled"] = True
    cfg["app"]["redis"]["url_from"] = value


def _bad_step(cfg: dict, value: str) -> None:
    cfg["app"]["commands"]["steps"] = [{"name": value}]


MUTATIONS: list[Mutation] = [
    Mutation("environment", bad_env_name, setter("environment")),
    Mutation("version", st.sampled_from(["v 1", "-v", "v1\n", "a" * 101, "v/1", "é"]), setter("version")),
    Mutation("embedded_services", st.just(True), _production, touches=("production", "app.secrets")),
    Mutation("app.secrets.BAD_GEN", st.just(None), _generate_in_production, touches=("production", "app.secrets")),
    number("lock_wait_s", neg_or_nan),
    number("dependency_timeout_s", non_pos),
    Mutation("app.name", st.sampled_from(["", "Node", "-x", "a" * 41, "x\n", "a_b"]), setter("app.name")),
    Mutation("app.required_env", bad_var, _append("app.required_env")),
    Mutation("app.secret_env", bad_var, _append("app.secret_env")),
    *[Mutation(f"app.{f}", bad_var, setter(f"app.{f}"))
      for f in ("jwt_secret_env", "node_env_var", "version_env", "port_env", "instance_port_env")],
    Mutation("app.port_env", st.just(""), setter("app.port_env"), touches=("app.port_env",)),
    add_key("env", "v"), add_key("secrets", "env:SRC_K"), add_key("instance_env", "{slot}"),
    add_value("secrets", bad_ref),
    add_value("instance_env", bad_placeholder),
    *[duplicate(a, b) for a, b in [("env", "secrets"), ("env", "instance_env"), ("secrets", "instance_env"),
                                   ("env", "database"), ("secrets", "redis"), ("database", "redis"),
                                   ("env", "required_env"), ("instance_env", "required_env"), ("database", "required_env"),
                                   ("instance_env", "port_env"), ("env", "version_env"), ("secrets", "instance_port_env"),
                                   ("port_env", "version_env")]],
    *[Mutation(f"app.database.app_vars.{p}", bad_var, setter(f"app.database.app_vars.{p}"))
      for p in ("url", "host", "port", "database", "user", "password", "tls")],
    Mutation("app.database.app_vars", st.just(None), _no_url_nor_host("database"), touches=("app.database.app_vars.url",
                                                                                             "app.database.app_vars.host")),
    Mutation("app.redis.app_vars", st.just(None), _no_url_nor_host("redis"), touches=("app.redis.app_vars.url",
                                                                                       "app.redis.app_vars.host")),
    Mutation("app.database.url_from", st.one_of(bad_ref, st.just("generate")), setter("app.database.url_from")),
    Mutation("app.redis.url_from", st.one_of(bad_ref, st.just("generate")), _redis_url_from),
    Mutation("app.database.embedded_database", bad_pg, setter("app.database.embedded_database")),
    Mutation("app.database.embedded_role", bad_pg, setter("app.database.embedded_role")),
    number("app.redis.embedded_db", st.sampled_from([-1, 16, 10**12, -(10**12)])),
    Mutation("app.health_version", st.sampled_from(["json:", "jsn:x", "header:", "header:a b", "on", "json:a..b", "off\n", ""]),
             setter("app.health_version")),
    Mutation("app.health_path", st.sampled_from(["health", "", "http://x/health", "/he alth", "/h\n"]), setter("app.health_path")),
    Mutation("app.start_dir", st.sampled_from(["/abs", "../up", "a/../../b"]), setter("app.start_dir")),
    number("app.min_secret_length", st.sampled_from([0, -5, -(10**12)])),
    number("app.commands.timeout_s", non_pos),
    number("app.migration_lock_timeout_s", non_pos),
    number("app.migration_statement_timeout_s", non_pos),
    number("app.shutdown_timeout_s", st.sampled_from([-1.0, NAN, INF, -INF]), touches=("target.pm2.kill_timeout_s",)),
    Mutation("app.commands.migrate", st.sampled_from(["", "  ", "\n"]), setter("app.commands.migrate")),
    Mutation("app.bundle_paths", st.sampled_from(["/abs", "../x", "", "a/../../x"]), _append("app.bundle_paths")),
    Mutation("app.commands.steps[0].name", st.sampled_from(["", "Build", "1x", "a b"]), _bad_step, touches=("app.commands.steps",)),
    number("target.instances", st.sampled_from([0, -1, 65, 10**12, -(10**12)])),
    number("target.port", st.sampled_from([0, -1, 65536, 10**12])),
    Mutation("target.host", st.sampled_from(["", "a/b", "a b", "user@h", "h:1", "h\n", "a;b", "h{x}"]), setter("target.host")),
    Mutation("target.public_url", bad_url, setter("target.public_url")),
    number("target.pm2.keep_releases", st.sampled_from([1, 0, -1, -(10**12)]), kind="pm2"),
    number("target.pm2.kill_timeout_s", st.sampled_from([0.0, -1.0, NAN, -INF, INF]), kind="pm2",
           touches=("app.shutdown_timeout_s",)),
    number("target.pm2.drain_s", neg_or_nan, kind="pm2"),
    number("target.pm2.listen_timeout_s", non_pos, kind="pm2"),
    number("target.docker.drain_s", neg_or_nan, kind="docker"),
    number("target.docker.start_timeout_s", neg_or_nan, kind="docker"),
    number("target.docker.container_port", st.sampled_from([0, -1, 65536, 10**12]), kind="docker"),
    Mutation("target.kubernetes.api_server", bad_url, setter("target.kubernetes.api_server"), kind="kubernetes"),
    *[Mutation(f"target.kubernetes.{f}", bad_k8s, setter(f"target.kubernetes.{f}"), kind="kubernetes")
      for f in ("namespace", "deployment", "container")],
    Mutation("target.kubernetes.image_repository", st.just(""), setter("target.kubernetes.image_repository"), kind="kubernetes"),
    number("target.kubernetes.progress_deadline_s", non_pos, kind="kubernetes"),
    number("gate.interval_s", non_pos, touches=("gate",)),
    number("gate.request_timeout_s", non_pos),
    number("gate.required_successes", st.sampled_from([0, -1, -(10**12)]), touches=("gate",)),
    number("gate.deadline_s", non_pos, touches=("gate",)),
    Mutation("gate.required_successes", st.integers(200, 10**6), _gate_arithmetic, touches=("gate",),
             also=("gate.deadline_s",)),
]


def apply_mutation(cfg: dict, m: Mutation, value) -> None:
    if m.kind:
        cfg["target"]["kind"] = m.kind
    m.apply(cfg, value)


def prefix(problem: str) -> str:
    return problem.split(":", 1)[0]


def matches(problem: str, m: Mutation, value) -> bool:
    p = prefix(problem)
    if m.path.endswith(".*"):  # a bad key: the problem names the key's own path
        return p == m.path[:-1] + str(value)
    return p in m.paths()


def check_each_named_once(found: list[str], applied: list[tuple[Mutation, object]]) -> None:
    assert found, "refused nothing"
    for m, value in applied:
        mine = [p for p in found if matches(p, m, value)]
        assert len(mine) == 1, f"{m.path} ({value!r}): expected one problem naming it, got {mine} of {found}"
    assert len(found) == len(applied), f"{len(found)} problems for {len(applied)} bad fields: {found}"


@settings(FAST, max_examples=250)
@given(valid_specs(), st.sampled_from(MUTATIONS), st.data())
def test_one_bad_field_gives_one_problem_naming_it(data, mutation, draw):
    value = draw.draw(mutation.bad, label=mutation.path)
    apply_mutation(data, mutation, value)
    check_each_named_once(problems_of(data), [(mutation, value)])


def listed_bad_values() -> list:
    """Every (mutation, bad value) whose strategy is a finite list: each one is checked, not only those drawn."""
    cases = []
    for m in MUTATIONS:
        strategy = m.bad.wrapped_strategy if hasattr(m.bad, "wrapped_strategy") else m.bad
        options = getattr(strategy, "elements", None)
        if options is None and hasattr(strategy, "original_strategies"):  # one_of(...)
            options = [e for sub in strategy.original_strategies for e in getattr(sub, "elements", [])
                       or [getattr(sub, "value", None)]]
        if options is None and hasattr(strategy, "value"):  # just(...)
            options = [strategy.value]
        for value in options or []:
            cases.append(pytest.param(m, value, id=f"{m.path}={value!r}"[:80]))
    return cases


BASE = json.loads(ReleaseConfig(target={"kubernetes": {"image_repository": "r/a"}}).model_dump_json())


@pytest.mark.parametrize("mutation, value", listed_bad_values())
def test_every_listed_bad_value_of_the_default_spec_is_named_once(mutation, value):
    data = json.loads(json.dumps(BASE))
    apply_mutation(data, mutation, value)
    check_each_named_once(problems_of(data), [(mutation, value)])


def compatible(ms: list[Mutation]) -> bool:
    kinds = {m.kind for m in ms if m.kind}
    keys = [m.path for m in ms] + [t for m in ms for t in m.touches]
    gate = [m for m in ms if m.path.startswith("gate.") and "gate" in m.touches]
    return len(kinds) <= 1 and len(keys) == len(set(keys)) and len(gate) <= 1


@settings(FAST, max_examples=120)
@given(valid_specs(), st.lists(st.sampled_from(MUTATIONS), min_size=2, max_size=8, unique_by=lambda m: m.path)
       .filter(compatible), st.data())
def test_several_bad_fields_are_each_named(data, mutations, draw):
    applied = []
    for m in mutations:
        value = draw.draw(m.bad, label=m.path)
        apply_mutation(data, m, value)
        applied.append((m, value))
    check_each_named_once(problems_of(data), applied)


# --- regressions: the examples that exposed each bug -----------------------------------------------------------------

@pytest.mark.parametrize("field, data", [
    ("environment", {"environment": "local\n"}),
    ("version", {"version": "v1\n"}),
    ("app.name", {"app": {"name": "api\n"}}),
    ("app.env.X\n", {"app": {"env": {"X\n": "v"}}}),
    ("app.secrets.S", {"app": {"secrets": {"S": "env:A\n"}}}),
    ("app.health_version", {"app": {"health_version": "off\n"}}),
    ("app.database.embedded_database", {"app": {"database": {"embedded_database": "app\n"}}}),
    ("target.kubernetes.namespace", {"target": {"kind": "kubernetes", "kubernetes": {"namespace": "ns\n",
                                                                                     "image_repository": "r/a"}}}),
])
def test_a_trailing_newline_is_refused(field, data):
    """Bug: patterns anchored with `$` accepted a trailing newline ('local\\n' became a state folder name)."""
    found = problems_of(data)
    assert len(found) == 1 and found[0].startswith(field + ":"), found


@pytest.mark.parametrize("value", ["{slot.x}", "{port[0]}", "{slot.__class__.x}"])
def test_an_attribute_or_index_placeholder_is_a_problem_not_a_crash(value):
    """Bug: app.instance_env {'X': '{slot.x}'} raised AttributeError ('{port[0]}': TypeError) out of validation."""
    found = problems_of({"app": {"instance_env": {"X": value}}})
    assert len(found) == 1 and found[0].startswith("app.instance_env.X:"), found


@pytest.mark.parametrize("field, data", [
    ("lock_wait_s", {"lock_wait_s": math.nan}),
    ("dependency_timeout_s", {"dependency_timeout_s": math.nan}),
    ("dependency_timeout_s", {"dependency_timeout_s": math.inf}),
    ("gate.interval_s", {"gate": {"interval_s": math.nan}}),
    ("gate.interval_s", {"gate": {"interval_s": math.inf}}),  # was also blamed on gate.required_successes
    ("gate.deadline_s", {"gate": {"deadline_s": math.nan}}),
    ("target.pm2.kill_timeout_s", {"target": {"pm2": {"kill_timeout_s": math.nan}}}),
    ("target.pm2.drain_s", {"target": {"pm2": {"drain_s": math.nan}}}),
    ("app.commands.timeout_s", {"app": {"commands": {"timeout_s": math.nan}}}),
    ("app.migration_statement_timeout_s", {"app": {"migration_statement_timeout_s": 0}}),  # was named after the lock one
    ("app.shutdown_timeout_s", {"app": {"shutdown_timeout_s": -1}}),  # was never checked
    ("app.shutdown_timeout_s", {"app": {"shutdown_timeout_s": math.nan}}),
    ("target.kubernetes.progress_deadline_s", {"target": {"kind": "kubernetes", "kubernetes": {
        "image_repository": "r/a", "progress_deadline_s": -5}}}),  # was never checked
])
def test_nan_inf_and_unchecked_numbers_are_refused_naming_their_field(field, data):
    """Bugs: NaN passed every range check (comparisons with NaN are false); inf passed timeouts; an infinite
    gate.interval_s was also reported as gate.required_successes; a bad migration_statement_timeout_s was reported
    as 'app.migration_lock_timeout_s / ...'; app.shutdown_timeout_s and kubernetes.progress_deadline_s were never checked."""
    found = problems_of(data)
    assert len(found) == 1 and found[0].startswith(field + ":"), found


def test_a_bad_secret_env_name_is_named_as_secret_env():
    """Bug: app.secret_env ['BAD-X'] was reported as 'app.required_env: ...'."""
    assert problems_of({"app": {"secret_env": ["BAD-X"]}}) == [
        "app.secret_env: 'BAD-X' is not a valid environment variable name"]


@pytest.mark.parametrize("path", ["a\x00b", "app\udc80"])
def test_an_unusable_app_path_is_a_problem_not_a_crash(path):
    """Bug: app.path 'a\\x00b' raised ValueError (embedded null byte) out of validate_release_config."""
    found = validate_release_config(ReleaseConfig(app={"path": path}))
    assert len(found) == 1 and found[0].startswith("app.path:"), found


@pytest.mark.parametrize("field, data", [
    ("target.host", {"target": {"host": "h\n"}}),
    ("target.host", {"target": {"host": "a;b"}}),  # went into nginx's `listen` directive as is
    ("target.public_url", {"target": {"public_url": "http://h\n/"}}),
    ("target.public_url", {"target": {"public_url": "http://h x/"}}),
    ("app.health_path", {"app": {"health_path": "/he alth"}}),
])
def test_whitespace_and_metacharacters_in_addresses_are_refused(field, data):
    """Bug (missing checks): target.host 'h\n' or 'a;b', public_url 'http://h x/' and health_path '/he alth' were
    accepted, and broke only at deploy or gate time."""
    found = problems_of(data)
    assert len(found) == 1 and found[0].startswith(field + ":"), found


# --- no input crashes validation -------------------------------------------------------------------------------------

weird_text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.sampled_from(["", " ", "\x00", "\n", "a\n", "\udc80", "é", "ｅｎｖ:X", "{", "}", "{slot.x}", "{port[0]}", "{0}",
                     "env:", "file:/", "generate", "../", "/", "http://[::1", "http://h:99999", "json:", "header:",
                     "x" * 5000]),
)
weird_float = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324]))
weird_int = st.one_of(st.integers(), st.sampled_from([0, -1, 2**63, -(2**63), 10**40]))


def fuzz(annotation) -> st.SearchStrategy:
    """Any value of a config field's type, from the weird end of it."""
    import enum
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        return st.one_of(*[st.none() if a is type(None) else fuzz(a) for a in args])
    if origin is list:
        return st.lists(fuzz(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(fuzz(args[0]), fuzz(args[1]), max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, dg.Config):
        return st.fixed_dictionaries({}, optional={n: fuzz(f.annotation) for n, f in annotation.model_fields.items()})
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return st.sampled_from([e.value for e in annotation])
    return {bool: st.booleans(), int: weird_int, float: weird_float, str: weird_text}[annotation]


def field_paths(model, base: str = "") -> set[str]:
    out = set()
    for name, f in model.model_fields.items():
        path = f"{base}{name}"
        out.add(path)
        if isinstance(f.annotation, type) and issubclass(f.annotation, dg.Config):
            out |= field_paths(f.annotation, path + ".")
    return out


KNOWN_PATHS = field_paths(ReleaseConfig)


def names_a_field(problem: str) -> bool:
    head = prefix(problem)
    return any(head == p or head.startswith(p + ".") or head.startswith(p + "[") for p in KNOWN_PATHS)


@settings(FAST, max_examples=150)
@given(fuzz(ReleaseConfig), st.booleans())
@example({"app": {"instance_env": {"X": "{slot.x}"}}}, False)
@example({"app": {"path": "a\x00b"}}, True)
@example({"gate": {"interval_s": math.inf}}, False)
def test_weird_input_gives_problems_naming_fields_never_a_crash(data, check_paths):
    import pydantic

    try:
        cfg = ReleaseConfig(**data)
    except pydantic.ValidationError:  # the schema's own refusal, naming the field (as Dagster's config check does)
        return
    found = validate_release_config(cfg, check_paths=check_paths)
    assert isinstance(found, list) and all(isinstance(p, str) for p in found)
    assert all(names_a_field(p) for p in found), [p for p in found if not names_a_field(p)]


@settings(FAST, max_examples=60)
@given(fuzz(ReleaseConfig))
def test_the_config_schema_of_the_release_job_accepts_or_names_the_field(data):
    """Dagster's own config check comes first in a launched run: it refuses or accepts, it never crashes."""
    from ops_pipeline.release.jobs import release

    try:
        json.dumps(data, allow_nan=True)
    except (TypeError, ValueError):
        return
    try:  # the public check the Launchpad and `dagster job launch` go through
        dg.validate_run_config(release, {"ops": {"verify_env": {"config": data}}})
    except dg.DagsterInvalidConfigError:
        pass


# --- refused before any side effect: the first op of each job, with real resources ------------------------------------

def _pm2_processes() -> list[int]:
    import psutil

    prefix_ = str(paths.state_dir()) + "/"
    out = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("PM2_HOME", "").startswith(prefix_):
                out.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return out


def _world(services) -> dict:
    """What a side effect would change: the state folder's entries, the embedded PostgreSQL's databases, PM2 daemons."""
    import psycopg

    state = paths.state_dir()
    with psycopg.connect(services.admin_database_url, autocommit=True) as conn:
        databases = sorted(r[0] for r in conn.execute("SELECT datname FROM pg_database"))
    return {"state": sorted(str(p.relative_to(state)) for p in state.glob("*/*")) if state.exists() else [],
            "databases": databases, "pm2": _pm2_processes()}


@pytest.fixture(scope="module")
def tiny_app(tmp_path_factory):
    app = tmp_path_factory.mktemp("app")
    (app / "package.json").write_text(json.dumps({"name": "tiny", "version": "1.0.0", "scripts": {"test": "true"}}))
    (app / "package-lock.json").write_text(json.dumps({"name": "tiny", "lockfileVersion": 3, "packages": {}}))
    return app


def op_resources() -> dict:
    from ops_pipeline.platform.local_stack import LocalStack
    from ops_pipeline.platform.postgres import PostgresResource
    from ops_pipeline.platform.redis import RedisResource

    return {"local_stack": LocalStack(), "postgres": PostgresResource(), "redis": RedisResource()}


RELEASE_MUTATIONS = [m for m in MUTATIONS if m.path != "app.commands.steps[0].name"]


@settings(OPS)
@given(st.lists(st.sampled_from(RELEASE_MUTATIONS), min_size=1, max_size=4, unique_by=lambda m: m.path).filter(compatible),
       st.data())
def test_verify_env_refuses_bad_specs_before_any_side_effect(services, tiny_app, mutations, draw):
    from ops_pipeline.release.ops.preflight import verify_env

    data = json.loads(json.dumps(BASE))
    data["environment"] = "prop-never-created"
    data["app"]["path"] = str(tiny_app)
    assert validate_release_config(ReleaseConfig(**data)) == []
    applied = []
    for m in mutations:
        value = draw.draw(m.bad, label=m.path)
        apply_mutation(data, m, value)
        applied.append((m, value))
    before = _world(services)
    with dg.build_op_context(resources=op_resources()) as ctx, pytest.raises(dg.Failure) as err:
        verify_env(ctx, ReleaseConfig(**data))
    found = err.value.metadata["problems"].data
    check_each_named_once(found, applied)
    assert all(f"  - {p}" in err.value.description for p in found)
    assert _world(services) == before
    if ENV_NAME.fullmatch(data["environment"] or ""):  # an invalid name ('' -> <state>/envs itself) names no folder
        assert not paths.environment_dir(data["environment"]).exists()


@settings(OPS)
@given(fuzz(__import__("ops_pipeline.release.ops.rollback", fromlist=["RollbackConfig"]).RollbackConfig))
@example({"environment": "local\n"})
@example({"environment": "Prod"})
def test_plan_rollback_refuses_bad_or_unknown_environments_before_any_side_effect(services, instance, data):
    from ops_pipeline.platform.notify import Notifier
    from ops_pipeline.release.ops.rollback import RollbackConfig, plan_rollback
    from ops_pipeline.targets.resource import DeployTargets

    data.setdefault("environment", "prop-unknown")
    before = _world(services)
    with dg.build_op_context(resources={"deploy_targets": DeployTargets.with_defaults(), "notifier": Notifier()},
                             instance=instance) as ctx, pytest.raises(dg.Failure) as err:
        plan_rollback(ctx, RollbackConfig(**data))
    assert err.value.description.startswith("environment:"), err.value.description
    assert _world(services) == before


def only_first_step_failed_naming(result, step: str, fields: list[str]) -> None:
    failures = result.get_step_failure_events()
    assert [e.step_key for e in failures] == [step]
    message = failures[0].step_failure_data.error.message
    listed = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    assert len(listed) == len(fields) and all(any(p.startswith(f + ":") for p in listed) for f in fields), listed


BAD_BACKUP_FIELDS = {
    "environment": bad_env_name,
    "trigger": st.sampled_from(["", "hourly", "nightly\n", "Manual"]),
    "database_url_env": bad_var,
    # the retention settings of the same run: refused before the backup, not after it in prune_backups
    "prune_backups.floor": st.sampled_from([0, -1]),
    "prune_backups.daily": st.sampled_from([-1, -(10**12)]),
    "prune_backups.keep_pre_release": st.just(-3),
}


@settings(OPS)
@given(st.lists(st.sampled_from(sorted(BAD_BACKUP_FIELDS)), min_size=1, max_size=3, unique=True), st.data())
def test_backup_job_refuses_bad_targets_before_any_side_effect(services, instance, tmp_path_factory, fields, draw):
    from ops_pipeline.backup.store import BackupStore
    from tests.conftest import make_defs

    store_dir = tmp_path_factory.mktemp("store")
    values = {f: draw.draw(BAD_BACKUP_FIELDS[f], label=f) for f in fields}
    ops: dict = {"backup_target": {"config": {f: v for f, v in values.items() if "." not in f}}}
    retention = {f.split(".")[1]: v for f, v in values.items() if "." in f}
    if retention:
        ops["prune_backups"] = {"config": retention}
    before = _world(services)
    job = make_defs(backup_store=BackupStore(local_dir=str(store_dir))).get_job_def("backup")
    r = job.execute_in_process(run_config={"ops": ops}, instance=instance, raise_on_error=False)
    assert not r.success
    only_first_step_failed_naming(r, "backup_target", fields)
    assert _world(services) == before and not any(store_dir.iterdir())


def test_a_bad_database_url_env_of_a_backup_is_named_as_such():
    """Bug: BackupTargetConfig(database_url_env='1X') was reported as "app.database.url_from: 'env:1X' ..."."""
    from ops_pipeline.backup.ops import BackupTargetConfig, target_spec

    with pytest.raises(dg.Failure) as err:
        target_spec(BackupTargetConfig(database_url_env="1X"))
    assert "  - database_url_env: '1X' is not a valid environment variable name" in err.value.description
    assert "app.database" not in err.value.description


def test_bad_retention_is_refused_before_the_backup_is_taken(services, instance, tmp_path):
    """Bug: the backup job with prune_backups floor: 0 took (and kept) a backup, then failed at prune_backups."""
    from ops_pipeline.backup.store import BackupStore
    from tests.conftest import make_defs

    job = make_defs(backup_store=BackupStore(local_dir=str(tmp_path / "store"))).get_job_def("backup")
    r = job.execute_in_process(run_config={"ops": {"backup_target": {"config": {"environment": "prop-retention"}},
                                                   "prune_backups": {"config": {"floor": 0}}}},
                               instance=instance, raise_on_error=False)
    failures = r.get_step_failure_events()
    assert [e.step_key for e in failures] == ["backup_target"]
    assert "prune_backups.floor: must be >= 1 (got 0)" in failures[0].step_failure_data.error.message
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))


BAD_RESTORE_FIELDS = {"environment": bad_env_name, "database_url_env": bad_var,
                      "jobs": st.sampled_from([0, -1, 17])}


@settings(OPS, max_examples=4)
@given(st.lists(st.sampled_from(sorted(BAD_RESTORE_FIELDS)), min_size=1, max_size=2, unique=True), st.booleans(), st.data())
def test_restore_database_job_refuses_bad_targets_before_any_side_effect(services, instance, tmp_path_factory, fields,
                                                                         switch_over, draw):
    from ops_pipeline.backup.store import BackupStore
    from tests.conftest import make_defs

    store_dir = tmp_path_factory.mktemp("store")
    config = {f: draw.draw(BAD_RESTORE_FIELDS[f], label=f) for f in fields}
    config.update(switch_over=switch_over, confirm_database="app" if switch_over else "")
    before = _world(services)
    job = make_defs(backup_store=BackupStore(local_dir=str(store_dir))).get_job_def("restore_database")
    r = job.execute_in_process(run_config={"ops": {"restore_into_new_database": {"config": config}}}, instance=instance,
                               raise_on_error=False)
    only_first_step_failed_naming(r, "restore_into_new_database", fields)
    assert _world(services) == before and not any(store_dir.iterdir())


@pytest.mark.parametrize("field, data", [
    ("app.port_env", {"app": {"instance_env": {"PORT": "{slot}"}}}),
    ("app.version_env", {"app": {"env": {"APP_VERSION": "1"}}}),
    ("app.instance_port_env", {"app": {"instance_port_env": "PORT"}}),
])
def test_a_variable_the_target_sets_per_instance_is_not_set_twice(field, data):
    """Bug (missing check): app.instance_env {'PORT': '{slot}'} silently replaced the instance's port (and app.env
    APP_VERSION the release version) in the process definition; the instances never answered on their port."""
    found = problems_of(data)
    assert len(found) == 1 and found[0].startswith(field + ":") and "already set" in found[0], found


@pytest.mark.parametrize("jobs", [0, -2, 17])
def test_a_drill_with_a_bad_connection_count_is_refused_before_any_side_effect(services, instance, tmp_path, jobs):
    """Bug (missing check): restore_drill accepted jobs 0 and negatives; refused now with the run's other problems."""
    from ops_pipeline.backup.store import BackupStore
    from tests.conftest import make_defs

    before = _world(services)
    job = make_defs(backup_store=BackupStore(local_dir=str(tmp_path / "store"))).get_job_def("restore_drill")
    r = job.execute_in_process(run_config={"ops": {"backup_target": {"config": {"environment": "prop-drill"}},
                                                   "drill_newest_backup": {"config": {"jobs": jobs}}}},
                               instance=instance, raise_on_error=False)
    only_first_step_failed_naming(r, "backup_target", ["drill_newest_backup.jobs"])
    assert _world(services) == before
