"""The PM2 target's canary rollout: the side effects of canary steps (the decisions are ../canary.py's).

1. Every new instance starts and must be healthy on its own port (the rolling deploy's `_surge_slot`, all at once);
   none is in the front proxy yet.
2. Each step: one nginx reload puts the new instances in beside the stable ones with integer weights giving the
   step's share (3 stable at 9 + 3 canary at 1 = 10%) and writes one JSON line per request to the access log; after
   the step's pause, the requests that ended since the reload are read back and judged. Inconclusive (too few
   requests) holds the step and widens its window until `max_inconclusive_s` past the pause.
3. A step that passed may be held (`on_hold`: an approval at that step), the canary keeping its share until someone
   promotes (next step) or aborts (as a failed analysis).
   A failed or still inconclusive step, or an abort, raises `CanaryFailed`: the rollout's own recovery (`Pm2Target.rollout`) then
   sends every request back to the stable instances in one reload and deletes the new ones once nginx's previous
   workers are done; the release fails with the step's figures.
4. After the last step: one reload gives the new version every request (access log off again) and each old instance
   is retired through the one retirement path of the rolling deploy (`Pm2Target._drain`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import httpx

from ops_pipeline.targets import canary as analysis
from ops_pipeline.targets.base import Instance, LogFn, RolloutError, RolloutReport

if TYPE_CHECKING:
    from ops_pipeline.targets.pm2.target import Pm2Target

POLL_S = 1.0  # how often an inconclusive step is looked at again


class CanaryFailed(RolloutError):
    """A canary step failed its analysis (or stayed inconclusive too long)."""


class CanaryRollout:
    def __init__(self, target: Pm2Target, version: str, deploy_id: str, app_env: dict[str, str], report: RolloutReport,
                 started: float, log: LogFn, on_step: Callable[[analysis.StepAnalysis], None] | None = None,
                 on_hold: Callable[[analysis.StepAnalysis], str] | None = None) -> None:
        self.t = target
        self.cfg = target.spec.config.canary
        self.version, self.deploy_id, self.app_env = version, deploy_id, app_env
        self.report, self.started, self.log = report, started, log
        self.on_step = on_step or (lambda _s: None)
        self.on_hold = on_hold or (lambda _s: "")
        self.offset = 0

    def run(self, old: list[Instance], members: dict[str, int]) -> list[str]:
        """Start, judge step by step, promote. `members` (name -> port, what nginx routes to) is kept current, so the
        caller's recovery withdraws exactly the new instances. Returns the new instances' names."""
        t, n = self.t, self.t.spec.target.instances
        stable = dict(members)
        self.log(f"canary: starting {n} instance(s) of {self.version} beside {len(stable)} stable one(s); steps "
                 + " -> ".join(f"{s.weight}% for {s.pause_s:g} s" for s in self.cfg.steps) + " -> 100%")
        with ThreadPoolExecutor(max_workers=n) as starter:
            futures = [starter.submit(t._surge_slot, slot, self.version, self.deploy_id, self.app_env, self.report,
                                      self.started, self.log) for slot in range(n)]
            fresh = dict(f.result() for f in futures)
        groups = {f"127.0.0.1:{p}": analysis.STABLE for p in stable.values()}
        groups |= {f"127.0.0.1:{p}": analysis.CANARY for p in fresh.values()}
        t.nginx.reset_access_log()
        for i, step in enumerate(self.cfg.steps, 1):
            ws, wc = analysis.weights(len(stable), len(fresh), step.weight)
            members.update(fresh)
            t._route(members, self.log, weights={**{name: ws for name in stable}, **{name: wc for name in fresh}},
                     access_log=True)
            self.log(f"canary step {i}: {step.weight}% of the requests to {self.version} (weights: stable {ws}, "
                     f"canary {wc}), judged after {step.pause_s:g} s")
            result = self._judge(i, step, groups, stable, fresh)
            self.report.canary.append(result.to_json())
            self.log(f"canary {result.summary()}")
            self.on_step(result)
            if result.verdict != analysis.PASS:
                word = "failed" if result.verdict == analysis.FAIL else "stayed inconclusive"
                raise CanaryFailed(f"canary analysis {word} at step {i} ({step.weight}% of the requests): "
                                   f"{result.summary()}; all requests went back to the stable version", self.report)
            # A hold (approval at this step): the canary keeps its share until someone decides; "" carries on.
            stopped = self.on_hold(result)
            if stopped:
                raise CanaryFailed(f"canary stopped at step {i} ({step.weight}% of the requests): {stopped}; all "
                                   "requests went back to the stable version", self.report)
        # Promotion: every request to the new version, then each old instance leaves as in the rolling deploy.
        for name in stable:
            members.pop(name, None)
        old_workers = t._route(members, self.log)
        self.log(f"canary passed every step: {self.version} gets 100% of the requests; retiring {len(old)} old instance(s)")
        for victim in old:
            t._drain(victim, old_workers, self.report, self.started, self.log, "drained and stopped (canary promoted)")
        return list(fresh)

    def _judge(self, i: int, step, groups: dict[str, str], stable: dict[str, int], fresh: dict[str, int]
               ) -> analysis.StepAnalysis:
        a = self.cfg.analysis
        since = time.time()
        ports = {analysis.STABLE: list(stable.values()), analysis.CANARY: list(fresh.values())}
        before = self._scrape(ports)
        pause_end = since + step.pause_s
        time.sleep(step.pause_s)
        attempts: list[analysis.Attempt] = []
        while True:
            lines, self.offset = self.t.nginx.read_access_log(self.offset)
            attempts += analysis.parse_lines(lines)
            now = time.time()
            app = self._app_metrics(before, self._scrape(ports) or {}, ports) if before is not None else None
            result = analysis.analyse(i, step.weight, now - since, attempts, groups, since, now, a, app)
            held = now - pause_end
            if result.verdict != analysis.INCONCLUSIVE:
                return result
            if held >= a.max_inconclusive_s:
                result.reasons.append(f"still inconclusive {held:.0f} s after the pause (max_inconclusive_s "
                                      f"{a.max_inconclusive_s:g})")
                return result
            if int(held) % 10 == 0:
                self.log(f"canary step {i} inconclusive, holding: {result.summary()}")
            time.sleep(POLL_S)

    # ---- the app's own metrics (optional) ---------------------------------------------------------------------------
    def _scrape(self, ports: dict[str, list[int]]) -> dict[int, analysis.Histogram] | None:
        """Every instance's request-duration histogram now (None when the app exposes no metrics; an instance that
        does not answer is left out)."""
        app, a = self.t.spec.app, self.cfg.analysis
        if not app.metrics_path:
            return None
        out: dict[int, analysis.Histogram] = {}
        with httpx.Client(timeout=2.0) as client:
            for port in (p for group in ports.values() for p in group):
                try:
                    r = client.get(f"http://127.0.0.1:{port}{app.metrics_path}")
                    r.raise_for_status()
                    out[port] = analysis.read_histogram(r.text, a.metrics_histogram, a.metrics_status_label,
                                                        frozenset({app.metrics_path}))
                except (httpx.HTTPError, ValueError) as exc:
                    self.log(f"canary: metrics of 127.0.0.1:{port}{app.metrics_path} not read ({type(exc).__name__})")
        return out

    @staticmethod
    def _app_metrics(before: dict[int, analysis.Histogram], after: dict[int, analysis.Histogram],
                     ports: dict[str, list[int]]) -> dict[str, analysis.Histogram]:
        """Each group's histogram increase over the window (instances read at both ends only)."""
        out = {}
        for group, group_ports in ports.items():
            total = analysis.Histogram()
            for port in group_ports:
                if port in before and port in after:
                    total = total.plus(after[port].minus(before[port]))
            out[group] = total
        return out
