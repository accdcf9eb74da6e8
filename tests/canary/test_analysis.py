"""The canary analysis on recorded access-log lines and metrics (pure, fast), and the canary section of the spec."""

import json

import pytest

from ops_pipeline.platform.spec import CanaryAnalysisConfig, ReleaseConfig, validate_release_config
from ops_pipeline.targets import canary as c

A = CanaryAnalysisConfig(min_requests=20, max_error_rate=0.01, max_error_rate_increase=0.005, max_p95_ratio=1.5,
                         p95_floor_ms=5.0, max_p95_ms=0.0)
GROUPS = {"127.0.0.1:4001": c.STABLE, "127.0.0.1:4002": c.STABLE, "127.0.0.1:4101": c.CANARY}


def line(t: float, addr: str, status: int | str = 200, secs: float | str = 0.004, client_status: int = 0) -> str:
    """An access-log line exactly as nginx writes it with LOG_FORMAT (numbers bare, upstream fields as strings)."""
    return (f'{{"time":{t:.3f},"status":{client_status or (status if isinstance(status, int) else 502)},'
            f'"upstream_addr":"{addr}","upstream_status":"{status}","request_time":0.005,'
            f'"upstream_response_time":"{secs}"}}')


def traffic(n_stable: int, n_canary: int, *, canary_500_every: int = 0, canary_secs: float = 0.004, t0: float = 1000.0):
    lines = []
    for i in range(n_stable):
        lines.append(line(t0 + i * 0.01, "127.0.0.1:4001" if i % 2 else "127.0.0.1:4002", 200, 0.004))
    for i in range(n_canary):
        status = 500 if canary_500_every and i % canary_500_every == 0 else 200
        lines.append(line(t0 + i * 0.01, "127.0.0.1:4101", status, canary_secs))
    return lines


def test_weights_give_the_share_in_smallest_integers():
    assert c.weights(3, 3, 10) == (9, 1)
    assert c.weights(2, 2, 50) == (1, 1)
    assert c.weights(2, 3, 10) == (27, 2)  # 3*2 / (3*2 + 2*27) = 6/60 = 10%
    for s, k, pct in [(1, 1, 1), (4, 2, 33), (64, 64, 99)]:
        ws, wc = c.weights(s, k, pct)
        assert k * wc / (k * wc + s * ws) == pytest.approx(pct / 100)
    with pytest.raises(ValueError):
        c.weights(0, 2, 10)
    with pytest.raises(ValueError):
        c.weights(2, 2, 100)


def test_log_format_is_json_once_nginx_fills_it_in():
    sample = (c.LOG_FORMAT.replace("$msec", "1733350000.123").replace("$status", "200")
              .replace("$upstream_addr", "127.0.0.1:1, 127.0.0.1:2").replace("$upstream_status", "502, 200")
              .replace("$request_time", "0.010").replace("$upstream_response_time", "0.001, 0.008"))
    assert json.loads(sample)["upstream_status"] == "502, 200"


def test_each_upstream_attempt_counts_for_the_server_that_answered_it():
    retried = line(1000.0, "127.0.0.1:4101, 127.0.0.1:4001", "502, 200", "0.001, 0.007", client_status=200)
    attempts = c.parse_line(retried)
    assert [(a.addr, a.status, a.seconds, a.error) for a in attempts] == [
        ("127.0.0.1:4101", 502, 0.001, True), ("127.0.0.1:4001", 200, 0.007, False)]
    # a failed connection has no upstream status ("-"): an error, no latency
    [gone] = c.parse_line(line(1000.0, "127.0.0.1:4101", "-", "-", client_status=502))
    assert gone.error and gone.status is None and gone.seconds is None
    # no upstream at all, garbage, a JSON array: nothing
    assert c.parse_line('{"time":1000.0,"status":404,"upstream_addr":"","upstream_status":"","request_time":0,'
                        '"upstream_response_time":""}') == []
    assert c.parse_line("not json") == [] and c.parse_line("[1, 2]") == [] and c.parse_line("") == []


def test_a_canary_with_5_percent_500s_fails_and_the_stable_passes_untouched():
    attempts = c.parse_lines(traffic(900, 100, canary_500_every=20))
    r = c.analyse(1, 10, 30.0, attempts, GROUPS, 999.0, 2000.0, A)
    assert r.verdict == c.FAIL
    assert (r.canary.requests, r.canary.errors, r.stable.requests, r.stable.errors) == (100, 5, 900, 0)
    assert r.canary.error_rate == pytest.approx(0.05)
    assert any("max_error_rate 1.00%" in x for x in r.reasons) and any("exceeds the stable's" in x for x in r.reasons)
    assert "canary 100 req, 5.00% 5xx" in r.summary()


def test_a_canary_3x_slower_at_p95_fails_on_the_ratio_and_the_absolute_limit():
    attempts = c.parse_lines(traffic(300, 100, canary_secs=0.030) + traffic(0, 0))
    r = c.analyse(1, 25, 30.0, [a for a in attempts], GROUPS, 999.0, 2000.0, A)
    assert r.verdict == c.FAIL and r.canary.p95_ms == pytest.approx(30.0) and r.stable.p95_ms == pytest.approx(4.0)
    assert any("6.00x" in x for x in r.reasons)  # 30 ms / max(4 ms, floor 5 ms)
    strict = A.model_copy(update={"max_p95_ratio": 100.0, "max_p95_ms": 20.0})
    r = c.analyse(1, 25, 30.0, attempts, GROUPS, 999.0, 2000.0, strict)
    assert r.verdict == c.FAIL and r.reasons == ["canary p95 30.0 ms > max_p95_ms 20"]


def test_a_good_canary_passes_and_the_latency_floor_ignores_millisecond_noise():
    attempts = c.parse_lines(traffic(300, 100, canary_secs=0.002))
    r = c.analyse(1, 25, 30.0, attempts, GROUPS, 999.0, 2000.0, A)
    assert (r.verdict, r.reasons) == (c.PASS, [])
    # stable at 1 ms, canary at 3 ms: 3x, but under the 5 ms floor it is 0.6x
    fast = [c.Attempt(1000, "127.0.0.1:4001", 200, 0.001)] * 50 + [c.Attempt(1000, "127.0.0.1:4101", 200, 0.003)] * 50
    assert c.analyse(1, 50, 5, fast, GROUPS, 999, 2000, A).verdict == c.PASS


def test_too_few_requests_is_inconclusive_however_bad_they_are():
    attempts = c.parse_lines(traffic(300, 19, canary_500_every=1))
    r = c.analyse(1, 10, 30.0, attempts, GROUPS, 999.0, 2000.0, A)
    assert r.verdict == c.INCONCLUSIVE and "canary 19, stable 300; 20 needed" in r.reasons[0]


def test_only_the_window_and_the_known_servers_count():
    lines = traffic(100, 100, canary_500_every=1, t0=900.0) + traffic(100, 100, t0=1000.0)
    lines.append(line(1000.5, "127.0.0.1:9999", 500))  # a server that is not in either group
    r = c.analyse(2, 50, 10.0, c.parse_lines(lines), GROUPS, 999.0, 1100.0, A)
    assert (r.canary.requests, r.canary.errors, r.stable.requests, r.verdict) == (100, 0, 100, c.PASS)


METRICS_T0 = """# HELP http_request_duration_seconds Duration of HTTP requests in seconds
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{le="0.005",method="GET",route="/items",status_code="200"} 10
http_request_duration_seconds_bucket{le="0.01",method="GET",route="/items",status_code="200"} 10
http_request_duration_seconds_bucket{le="0.05",method="GET",route="/items",status_code="200"} 10
http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/items",status_code="200"} 10
http_request_duration_seconds_sum{method="GET",route="/items",status_code="200"} 0.03
http_request_duration_seconds_count{method="GET",route="/items",status_code="200"} 10
http_request_duration_seconds_bucket{le="0.005",method="GET",route="/metrics",status_code="200"} 3
http_request_duration_seconds_bucket{le="0.01",method="GET",route="/metrics",status_code="200"} 3
http_request_duration_seconds_bucket{le="0.05",method="GET",route="/metrics",status_code="200"} 3
http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/metrics",status_code="200"} 3
http_request_duration_seconds_sum{method="GET",route="/metrics",status_code="200"} 0.003
http_request_duration_seconds_count{method="GET",route="/metrics",status_code="200"} 3
# HELP app_version_info Release version
# TYPE app_version_info gauge
app_version_info{version="v1"} 1
"""


def _later(t0: str) -> str:
    """The same instance later: 90 more /items answers (80 fast 200s, 10 slow 500s), 1 more scrape."""
    extra = {("200", "0.005"): 80, ("200", "0.01"): 80, ("200", "0.05"): 80, ("200", "+Inf"): 80,
             ("500", "0.005"): 0, ("500", "0.01"): 0, ("500", "0.05"): 10, ("500", "+Inf"): 10}
    out = t0.replace('route="/metrics",status_code="200"} 3', 'route="/metrics",status_code="200"} 4')
    errors = ""
    for le in ("0.005", "0.01", "0.05", "+Inf"):
        out = out.replace(f'{{le="{le}",method="GET",route="/items",status_code="200"}} 10',
                          f'{{le="{le}",method="GET",route="/items",status_code="200"}} {10 + extra[("200", le)]}')
        errors += f'http_request_duration_seconds_bucket{{le="{le}",method="GET",route="/items",status_code="500"}} {extra[("500", le)]}\n'
    errors += 'http_request_duration_seconds_count{method="GET",route="/items",status_code="500"} 10\n'
    out = out.replace('_count{method="GET",route="/items",status_code="200"} 10', '_count{method="GET",route="/items",status_code="200"} 90')
    return out.replace("# HELP app_version_info", errors + "# HELP app_version_info")


def test_the_apps_histogram_gives_the_same_figures_from_its_deltas():
    read = lambda text: c.read_histogram(text, "http_request_duration_seconds", "status_code", frozenset({"/metrics"}))
    before, after = read(METRICS_T0), read(_later(METRICS_T0))
    assert (before.count, after.count, after.errors) == (10, 100, 10)  # our own scrapes are left out
    delta = after.minus(before)
    figs = delta.to_figures()
    assert (figs.requests, figs.errors, figs.error_rate) == (90, 10, pytest.approx(10 / 90))
    assert figs.p50_ms <= 5.0 and 10.0 < figs.p95_ms <= 50.0  # linear within the bucket, like histogram_quantile
    # a restarted instance (counters went down) counts from zero, and groups add up
    assert before.minus(after).count == 10 and delta.plus(delta).count == 180
    assert c.read_histogram("", "http_request_duration_seconds", "status_code").to_figures().requests == 0


def test_table_rows_have_one_row_per_step_source_and_group():
    attempts = c.parse_lines(traffic(300, 100))
    r = c.analyse(1, 25, 30.0, attempts, GROUPS, 999.0, 2000.0, A,
                  app_metrics={c.CANARY: c.Histogram({0.01: 5.0, float("inf"): 5.0}, 5, 0), c.STABLE: c.Histogram()})
    rows = c.table_rows([r])
    assert [(x["source"], x["group"]) for x in rows] == [("nginx", "canary"), ("nginx", "stable"),
                                                       ("app metrics", "canary"), ("app metrics", "stable")]
    assert rows[0]["requests"] == 100 and rows[2]["requests"] == 5 and "app metrics: canary 5 req" in r.summary()
    assert c.StepAnalysis.from_json(r.to_json()).to_json() == r.to_json()


def _problems(**canary) -> list[str]:
    return validate_release_config(ReleaseConfig(canary=canary), check_paths=False)


def test_spec_canary_section_is_checked_with_clear_errors():
    assert _problems() == [] and _problems(steps=[{"weight": 10, "pause_s": 5}, {"weight": 50}]) == []
    assert _problems(steps=[{"weight": 50}, {"weight": 50}]) == [
        "canary.steps[1].weight: weights must increase strictly (50 after 50)"]
    assert "canary.steps[0].weight: must be between 1 and 99 (got 100; 100 is the promotion after the last step)" \
        in _problems(steps=[{"weight": 100}])
    assert _problems(steps=[{"weight": 10, "pause_s": float("nan")}]) == ["canary.steps[0].pause_s: must be > 0 (got nan)"]
    bad = _problems(steps=[{"weight": 10}], analysis={"min_requests": 0, "max_error_rate": 1.5, "max_p95_ratio": 0.9,
                                                     "max_inconclusive_s": -1, "metrics_status_label": "status code"})
    assert bad == ["canary.analysis.min_requests: must be >= 1 (got 0)",
                   "canary.analysis.max_error_rate: must be a share between 0 and 1 (got 1.5)",
                   "canary.analysis.max_p95_ratio: must be >= 1 (got 0.9)",
                   "canary.analysis.max_inconclusive_s: must be >= 0 (got -1.0)",
                   "canary.analysis.metrics_status_label: 'status code' is not a Prometheus name"]
    # analysis settings alone (no steps) are not a canary: nothing to check, nothing refused
    assert _problems(analysis={"min_requests": 0}) == []


def test_a_canary_on_a_target_without_one_is_refused_at_validation():
    for kind in ("docker", "kubernetes"):
        cfg = ReleaseConfig(target={"kind": kind, "kubernetes": {"image_repository": "r/x"}},
                            canary={"steps": [{"weight": 10}]})
        assert f"canary: not supported on the {kind} target yet (PM2 only); remove canary.steps to release with a " \
               "rolling deploy" in validate_release_config(cfg, check_paths=False)
