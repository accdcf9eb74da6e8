"""Canary analysis: decisions as data, no side effect (the PM2 target reloads nginx, reads the log, scrapes and waits).

What a step is judged on:

* the front proxy's own records: nginx writes one JSON line per request (`LOG_FORMAT`, `escape=json`), each read with
  `json.loads`; every upstream attempt of a request (nginx lists them comma-separated when it retried another
  server) counts for the server that answered it, grouped by address into canary or stable. An attempt whose
  upstream status is 5xx (or none: the connection failed) is an error; its latency is the upstream's response time.
* when the app exposes Prometheus metrics, its request-duration histogram, scraped from every instance at the start
  and the end of the window and read with `prometheus_client.parser`: the same figures from the bucket deltas, as an
  extra line of the analysis (the verdict is the front proxy's, which works for any app).

Verdict: `inconclusive` when either group has fewer than `min_requests` requests in the window, else `fail` when any
threshold is crossed (absolute 5xx share, increase over the stable's, p95 ratio, absolute p95), else `pass`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

CANARY, STABLE = "canary", "stable"
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"

# One JSON object per request. $msec, $status and $request_time are always numbers; the upstream variables can be
# empty or lists ("127.0.0.1:4001, 127.0.0.1:4002"), so they are strings.
LOG_FORMAT = ('{"time":$msec,"status":$status,"upstream_addr":"$upstream_addr",'
              '"upstream_status":"$upstream_status","request_time":$request_time,'
              '"upstream_response_time":"$upstream_response_time"}')


def weights(stable: int, canary: int, percent: int) -> tuple[int, int]:
    """Integer nginx weights (per stable server, per canary server) giving the canary `percent` of the requests:
    canary*c / (canary*c + stable*s) = percent/100, reduced (3 stable + 3 canary at 10% -> 9 and 1)."""
    if stable < 1 or canary < 1 or not (1 <= percent <= 99):
        raise ValueError(f"weights: need stable >= 1, canary >= 1, 1 <= percent <= 99 (got {stable}, {canary}, {percent})")
    s, c = (100 - percent) * canary, percent * stable
    g = math.gcd(s, c)
    return s // g, c // g


@dataclass(frozen=True)
class Attempt:
    """One upstream attempt of one request, as nginx recorded it."""

    time: float  # when the request ended (epoch seconds, ms resolution)
    addr: str  # "127.0.0.1:4001"
    status: int | None  # upstream status; None when the upstream gave none
    seconds: float | None  # upstream response time

    @property
    def error(self) -> bool:
        return self.status is None or self.status >= 500


def _split(value) -> list[str]:
    # nginx separates attempts with ", " and internal redirects with " : ".
    return [p.strip() for p in str(value or "").replace(" : ", ", ").split(",") if p.strip()]


def _number(text: str, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


def parse_line(line: str | bytes) -> list[Attempt]:
    """The upstream attempts of one access-log line (none for a line that is not a record, or has no upstream)."""
    try:
        rec = json.loads(line)
        when = float(rec["time"])
    except (ValueError, TypeError, KeyError):
        return []
    if not isinstance(rec, dict):
        return []
    addrs = _split(rec.get("upstream_addr"))
    statuses = _split(rec.get("upstream_status"))
    times = _split(rec.get("upstream_response_time"))
    out = []
    for i, addr in enumerate(addrs):
        status = _number(statuses[i], int) if i < len(statuses) else None
        secs = _number(times[i], float) if i < len(times) else None
        out.append(Attempt(when, addr, status, secs))
    return out


def parse_lines(lines: Iterable[str | bytes]) -> list[Attempt]:
    return [a for line in lines if line.strip() for a in parse_line(line)]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass
class Figures:
    """One group's requests in one window."""

    requests: int = 0
    errors: int = 0
    p50_ms: float = 0.0
    p95_ms: float = 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 5),
                "p50_ms": round(self.p50_ms, 2), "p95_ms": round(self.p95_ms, 2)}


def figures(attempts: Iterable[Attempt], groups: dict[str, str], since: float, until: float | None = None
            ) -> dict[str, Figures]:
    """Canary and stable figures from the attempts that ended in [since, until]; `groups` maps "host:port" to
    canary or stable (attempts to any other address, e.g. a server already gone, are not counted)."""
    lat: dict[str, list[float]] = {CANARY: [], STABLE: []}
    out = {CANARY: Figures(), STABLE: Figures()}
    for a in attempts:
        group = groups.get(a.addr)
        if group is None or a.time < since or (until is not None and a.time > until):
            continue
        f = out[group]
        f.requests += 1
        f.errors += a.error
        if a.seconds is not None:
            lat[group].append(a.seconds * 1000)
    for group, f in out.items():
        f.p50_ms, f.p95_ms = percentile(lat[group], 50), percentile(lat[group], 95)
    return out


# ---- the app's Prometheus histogram --------------------------------------------------------------------------------
@dataclass
class Histogram:
    """Cumulative bucket counts (le -> count) of a request-duration histogram, summed over its series, and how many
    of its observations had a 5xx status."""

    buckets: dict[float, float] = field(default_factory=dict)
    count: float = 0.0
    errors: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        """The increase since `earlier`; a counter that went down (the instance restarted) counts from zero."""
        if self.count < earlier.count:
            return self
        return Histogram({le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
                         self.count - earlier.count, self.errors - earlier.errors)

    def plus(self, other: Histogram) -> Histogram:
        les = set(self.buckets) | set(other.buckets)
        return Histogram({le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les},
                         self.count + other.count, self.errors + other.errors)

    def quantile(self, q: float) -> float:
        """Like PromQL's histogram_quantile: linear within the bucket the rank falls in (seconds)."""
        if self.count <= 0 or not self.buckets:
            return 0.0
        rank = q * self.count
        lower_le, lower_n = 0.0, 0.0
        for le in sorted(self.buckets):
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return lower_le
                width = n - lower_n
                return lower_le + (le - lower_le) * ((rank - lower_n) / width if width else 1.0)
            lower_le, lower_n = le, n
        return lower_le

    def to_figures(self) -> Figures:
        return Figures(round(self.count), round(self.errors), self.quantile(0.5) * 1000,
                       self.quantile(0.95) * 1000)


def read_histogram(text: str, name: str, status_label: str, skip_label_values: frozenset[str] = frozenset()) -> Histogram:
    """The histogram `name` in Prometheus text exposition, summed over its series. Series with a label value in
    `skip_label_values` (e.g. the metrics path itself: our own scrapes) are left out."""
    h = Histogram()
    for family in text_string_to_metric_families(text):
        if family.name != name or family.type != "histogram":
            continue
        for s in family.samples:
            if skip_label_values & set(s.labels.values()):
                continue
            if s.name == f"{name}_bucket":
                le = float(s.labels["le"])
                h.buckets[le] = h.buckets.get(le, 0.0) + s.value
            elif s.name == f"{name}_count":
                h.count += s.value
                if str(s.labels.get(status_label, "")).startswith("5"):
                    h.errors += s.value
    return h


# ---- the verdict ---------------------------------------------------------------------------------------------------
@dataclass
class StepAnalysis:
    """One canary step's judgement over one window."""

    step: int  # 1-based
    weight: int  # percent of the requests the canary was given
    window_s: float
    canary: Figures
    stable: Figures
    verdict: str
    reasons: list[str] = field(default_factory=list)
    app_metrics: dict[str, Figures] | None = None  # from the app's histogram, when it exposes one

    def summary(self) -> str:
        c, s = self.canary, self.stable
        line = (f"step {self.step} ({self.weight}%) {self.verdict} over {self.window_s:.1f} s: canary {c.requests} req, "
                f"{c.error_rate:.2%} 5xx, p50 {c.p50_ms:.1f} ms, p95 {c.p95_ms:.1f} ms; stable {s.requests} req, "
                f"{s.error_rate:.2%} 5xx, p50 {s.p50_ms:.1f} ms, p95 {s.p95_ms:.1f} ms")
        if self.app_metrics:
            ac, ast = self.app_metrics[CANARY], self.app_metrics[STABLE]
            line += (f" [app metrics: canary {ac.requests} req, {ac.error_rate:.2%} 5xx, p95 {ac.p95_ms:.1f} ms; "
                     f"stable {ast.requests} req, {ast.error_rate:.2%} 5xx, p95 {ast.p95_ms:.1f} ms]")
        return line + (f" — {'; '.join(self.reasons)}" if self.reasons else "")

    @classmethod
    def from_json(cls, data: dict) -> StepAnalysis:
        def figs(d: dict) -> Figures:
            return Figures(d["requests"], d["errors"], d["p50_ms"], d["p95_ms"])

        app = {g: figs(f) for g, f in data["app_metrics"].items()} if data.get("app_metrics") else None
        return cls(data["step"], data["weight"], data["window_s"], figs(data["canary"]), figs(data["stable"]),
                   data["verdict"], list(data.get("reasons", [])), app)

    def to_json(self) -> dict:
        out = {"step": self.step, "weight": self.weight, "window_s": round(self.window_s, 2), "verdict": self.verdict,
               "reasons": self.reasons, "canary": self.canary.to_json(), "stable": self.stable.to_json()}
        if self.app_metrics:
            out["app_metrics"] = {g: f.to_json() for g, f in self.app_metrics.items()}
        return out


def judge(canary: Figures, stable: Figures, analysis) -> tuple[str, list[str]]:
    """pass / fail / inconclusive and why, by `analysis` (a CanaryAnalysisConfig)."""
    a = analysis
    if canary.requests < a.min_requests or stable.requests < a.min_requests:
        why = f"too few requests (canary {canary.requests}, stable {stable.requests}; {a.min_requests} needed in each)"
        return INCONCLUSIVE, [why]
    reasons = []
    if canary.error_rate > a.max_error_rate:
        reasons.append(f"canary 5xx share {canary.error_rate:.2%} > max_error_rate {a.max_error_rate:.2%}")
    if canary.error_rate - stable.error_rate > a.max_error_rate_increase:
        reasons.append(f"canary 5xx share {canary.error_rate:.2%} exceeds the stable's {stable.error_rate:.2%} by more "
                       f"than max_error_rate_increase {a.max_error_rate_increase:.2%}")
    ratio = canary.p95_ms / max(stable.p95_ms, a.p95_floor_ms, 1e-9)
    if ratio > a.max_p95_ratio:
        reasons.append(f"canary p95 {canary.p95_ms:.1f} ms is {ratio:.2f}x the stable's {stable.p95_ms:.1f} ms "
                       f"(floor {a.p95_floor_ms:g} ms) > max_p95_ratio {a.max_p95_ratio:g}")
    if a.max_p95_ms > 0 and canary.p95_ms > a.max_p95_ms:
        reasons.append(f"canary p95 {canary.p95_ms:.1f} ms > max_p95_ms {a.max_p95_ms:g}")
    return (FAIL, reasons) if reasons else (PASS, [])


def analyse(step: int, weight: int, window_s: float, attempts: Iterable[Attempt], groups: dict[str, str], since: float,
            until: float, analysis, app_metrics: dict[str, Histogram] | None = None) -> StepAnalysis:
    """One step's analysis from the front proxy's attempts in [since, until] (and the app's histogram deltas)."""
    figs = figures(attempts, groups, since, until)
    verdict, reasons = judge(figs[CANARY], figs[STABLE], analysis)
    app = {g: h.to_figures() for g, h in app_metrics.items()} if app_metrics else None
    return StepAnalysis(step, weight, window_s, figs[CANARY], figs[STABLE], verdict, reasons, app)


def table_rows(steps: list[StepAnalysis]) -> list[dict]:
    """One row per step and group (and per app-metrics group): what the run's metadata table shows."""
    rows = []
    for s in steps:
        sources = [("nginx", {CANARY: s.canary, STABLE: s.stable})]
        if s.app_metrics:
            sources.append(("app metrics", s.app_metrics))
        for source, figs in sources:
            for group in (CANARY, STABLE):
                f = figs[group]
                rows.append({"step": s.step, "weight_pct": s.weight, "source": source, "group": group,
                             "requests": f.requests, "errors": f.errors, "error_rate": round(f.error_rate, 5),
                             "p50_ms": round(f.p50_ms, 2), "p95_ms": round(f.p95_ms, 2), "verdict": s.verdict})
    return rows
