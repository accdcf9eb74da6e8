"""The Dagster UI, driven by headless Chromium against a real dagster-webserver + dagster-daemon.

Navigates Overview -> Jobs -> release, types a release config into the Launchpad, launches it, and waits
until the run page itself says the run succeeded; checks that both schedules and both sensors are listed
and running; opens the release history and backup assets in the catalog. Screenshots go to
docs/screenshots/ and are overwritten on every run (they are the ones docs/ui.md shows).

Chromium is Debian's (`chromium` on PATH, /usr/bin/chromium, or OPS_CHROMIUM); Playwright never downloads
a browser, and every request that is not for the test webserver is refused.

Only one release is made: with a second, known-good version in the history, the health watch (still running
for the rest of the session) would roll the environment back as soon as `pm2_cleanup` stops its app.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml

from ops_pipeline.platform import history
from ops_pipeline.platform.local_stack import free_port
from tests.conftest import ROOT, release_run_config

pytestmark = [pytest.mark.e2e, pytest.mark.browser, pytest.mark.xdist_group("daemon")]

SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("OPS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1400, "height": 900}
RELEASE_STEPS = ["verify_env", "run_tests", "build_image", "backup_database", "migrate_database", "rolling_deploy",
                 "health_gate"]
AUTOMATION = [("schedules", "nightly_backup"), ("schedules", "weekly_restore_drill"), ("sensors", "health_watch"),
              ("sensors", "rollback_on_release_failure"), ("sensors", "run_liveness")]
RUN_TIMEOUT_S = 240  # a release takes 50-100 s here (npm ci in run_tests dominates), more on a loaded machine
TERMINAL = re.compile(r"\[(SUCCESS|FAILURE|CANCELED|CANCELING)\]")  # the run page's title ends with its status

# Before the app starts: no "Join the Dagster community" dialog, and a run page whose step chart is tall enough
# to list all seven steps above the logs (both are the UI's own localStorage keys).
INIT_SCRIPT = """
try {
  window.localStorage.setItem('communityNux', 'true');
  window.localStorage.setItem('dagster.panel-width.run-gantt', '62');
} catch (e) {}
"""


@pytest.fixture
def ui(dagster_stack, request, tmp_path):
    """A Playwright page on Debian's Chromium (1400x900, UTC), allowed to reach the test webserver only."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (set OPS_CHROMIUM)")
    sync_api.expect.set_options(timeout=30_000)  # every row and panel of the UI loads by its own query
    failed_before = request.session.testsfailed
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT, timezone_id="UTC", locale="en-US")
        context.set_default_timeout(30_000)
        context.set_default_navigation_timeout(60_000)
        context.add_init_script(INIT_SCRIPT)
        local = dagster_stack.url
        context.route(lambda url: not url.startswith(local), lambda route: route.abort())
        page = context.new_page()
        # Backstop, should a first-visit dialog appear anyway: dismiss it whenever it covers what we click.
        page.add_locator_handler(page.get_by_text("Join the Dagster community"),
                                 lambda: page.get_by_role("button", name="Skip").click())
        try:
            yield page
        finally:
            if request.session.testsfailed > failed_before:
                try:
                    page.screenshot(path=str(tmp_path / "failure.png"))
                    print(f"\nfailed on {page.url}; screenshot: {tmp_path / 'failure.png'}")
                except Exception:  # noqa: BLE001
                    pass
            context.close()
            browser.close()


def save_shot(page, name: str, *, full_page: bool = False, image: bytes | None = None) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    if image is None:
        image = page.screenshot(full_page=full_page, animations="disabled", caret="hide")
    path.write_bytes(image)
    return path


def link_to(page, path: str):
    """Links to a UI path (their accessible names include icon names; hrefs are stable)."""
    return page.locator(f'a[href="{path}"]')


def nav(page, path: str) -> None:
    """Click an entry of the left navigation and wait for its page."""
    page.get_by_role("navigation").locator(f'a[href="{path}"]').first.click()
    page.wait_for_url(re.compile(re.escape(path) + r"([/?#]|$)"))


def set_editor(page, text: str) -> None:
    """Replace the content of the Launchpad's config editor (CodeMirror 5) with `text`."""
    editor = page.locator(".CodeMirror").first
    editor.wait_for(state="visible")
    editor.click()
    page.keyboard.press("ControlOrMeta+a")
    if page.evaluate("() => !!(document.querySelector('.CodeMirror') || {}).CodeMirror"):
        # Through the editor's own API: no auto-indent or bracket-closing can mangle the YAML.
        page.evaluate("""(v) => { const cm = document.querySelector('.CodeMirror').CodeMirror;
                                  cm.setValue(v); cm.focus(); cm.setCursor(cm.lineCount(), 0); }""", text)
    else:  # another editor build: paste-like input into the focused editor, over the selection
        page.keyboard.press("Delete")
        page.keyboard.insert_text(text)


def editor_text(page) -> str:
    return page.evaluate("() => { const e = document.querySelector('.CodeMirror');"
                         " return e && e.CodeMirror ? e.CodeMirror.getValue() : (e ? e.innerText : ''); }")


def succeeded_steps(page) -> int:
    label = page.get_by_text(re.compile(r"^Succeeded \(\d+\)$"))
    if not label.count():
        return 0
    return int(re.search(r"\d+", label.first.inner_text()).group())


def automation_path(kind: str, name: str) -> str:
    return f"/locations/ops_pipeline/{kind}/{name}"


def row_switch(page, path: str):
    """The on/off switch of an Automation list row (the row's last checkbox; the first one selects the row)."""
    return page.locator("[data-index]").filter(has=link_to(page, path)).locator("input[type=checkbox]").last


def running_switch(page):
    """The switch in the 'Running' row of a schedule's or sensor's page."""
    return page.locator("tr").filter(has=page.get_by_text("Running", exact=True)).locator("input[type=checkbox]").first


def metadata_row(page, key: str, value: str):
    return page.get_by_role("row", name=f"{key} {value}", exact=True)


def automation_status_api(url: str) -> dict[str, str]:
    query = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
      schedules { name scheduleState { status } } sensors { name sensorState { status } } } } } }"""
    data = httpx.post(url + "/graphql", json={"query": query}, timeout=30).json()["data"]
    out: dict[str, str] = {}
    for repo in data["repositoriesOrError"]["nodes"]:
        out |= {s["name"]: s["scheduleState"]["status"] for s in repo["schedules"]}
        out |= {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    return out


@pytest.mark.timeout(900)
def test_release_from_the_launchpad_and_automation_running(dagster_stack, ui, node_app, environment_name, pm2_cleanup):
    from playwright.sync_api import expect

    page = ui
    env = "ui-" + "-".join(environment_name.rsplit("-", 2)[-2:])  # short: it is shown in breadcrumbs and lists
    pm2_cleanup(env)
    port = free_port()
    base = dagster_stack.url
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    # ---- Overview -> Jobs -> release: the job's graph ------------------------------------------------------
    page.goto(base + "/overview")
    nav(page, "/jobs")
    link_to(page, "/locations/ops_pipeline/jobs/release").first.click()
    page.wait_for_url(re.compile(r"/locations/ops_pipeline/jobs/release/?([?#].*)?$"))
    for step in RELEASE_STEPS:
        expect(page.get_by_text(step, exact=True).first).to_be_visible()
    expect(page.get_by_text("Releases the service to one environment").first).to_be_visible()
    page.wait_for_timeout(500)  # the graph's zoom-to-fit
    save_shot(page, "job_release_graph")

    # ---- Launchpad: the release config in its editor, then Launch Run ------------------------------------------
    page.get_by_role("tab", name="Launchpad", exact=True).click()
    page.wait_for_url(re.compile(r"/jobs/release/playground"))
    config = release_run_config(node_app, env, version="ui-v1", port=port, fast=True)
    set_editor(page, yaml.safe_dump(config, sort_keys=False))
    assert yaml.safe_load(editor_text(page)) == config
    expect(page.get_by_text(f"environment: {env}").first).to_be_visible()
    # The Launchpad validates the config against the job's schema (asynchronously).
    expect(page.get_by_text("No errors", exact=True)).to_be_visible()
    launch = page.get_by_role("button", name="Launch Run")
    expect(launch).to_be_enabled()
    save_shot(page, "launchpad_release_config")
    launch.click()
    t_launch = time.monotonic()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"), timeout=60_000)
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    print(f"\nrun {run_id} launched from the Launchpad")

    # ---- the run page while it runs: keep the picture of the furthest progress seen -----------------------------
    deadline = t_launch + RUN_TIMEOUT_S
    executing = page.get_by_text("Executing (1)", exact=True)
    running_png, running_done = None, -1
    while time.monotonic() < deadline and not TERMINAL.search(page.title()):
        if "[STARTED]" in page.title() and executing.count():
            done = succeeded_steps(page)
            if done > running_done:
                page.wait_for_timeout(800)  # the chart and the logs catch up with the new step
                image = page.screenshot(animations="disabled", caret="hide")
                if not TERMINAL.search(page.title()) and executing.count():
                    running_png, running_done = image, done
            if running_done >= 5:  # rolling_deploy under way: five steps done, one running
                break
        page.wait_for_timeout(250)
    if running_png:
        save_shot(page, "run_release_running", image=running_png)
    else:
        print("the run finished before it was seen executing a step: run_release_running.png not updated")

    # ---- ... and once it has finished: the page itself says it succeeded ----------------------------------------
    expect(page).to_have_title(TERMINAL, timeout=max(1_000, int((deadline - time.monotonic()) * 1000)))
    timings["Launch Run -> success on the page"] = time.monotonic() - t_launch
    if "[SUCCESS]" not in page.title():
        pytest.fail(f"run {run_id}: {page.title()}\n{dagster_stack.log_tail('daemon')}")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()  # the status tag in the run's header
    expect(page.get_by_text("Succeeded (7)", exact=True)).to_be_visible()
    expect(page.get_by_text("RUN_SUCCESS", exact=True).first).to_be_visible()
    # Fold the empty step groups and open the succeeded one: all seven steps beside the chart.
    for group in ("Preparing (0)", "Executing (0)", "Errored (0)"):
        page.get_by_text(group, exact=True).click()
    page.get_by_text("Succeeded (7)", exact=True).click()
    for step in RELEASE_STEPS:
        expect(page.get_by_text(step, exact=True).last).to_be_visible()
    page.wait_for_timeout(500)
    save_shot(page, "run_release_success")

    # The same verdict from the instance, and from the app itself.
    with dagster_stack.instance() as inst:
        run = inst.get_run_by_id(run_id)
        hist = history.load(inst, env)
    assert run.status.value == "SUCCESS" and run.job_name == "release"
    assert run.tags.get("ops/environment") == env and run.tags.get("ops/version") == "ui-v1"
    assert [(e.event, e.version) for e in hist.events] == [("released", "ui-v1")]
    health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5, headers={"Connection": "close"})
    assert health.status_code == 200 and health.json()["version"] == "ui-v1"

    # ---- Automation: both schedules and the three sensors listed and running ---------------------------------
    nav(page, "/automation")
    for kind, name in AUTOMATION:
        expect(link_to(page, automation_path(kind, name))).to_be_visible()
        expect(row_switch(page, automation_path(kind, name))).to_be_checked()
    for description, count in (("Scheduled At 02:00 AM UTC", 1), ("Scheduled At 04:00 AM UTC, only on Sunday", 1),
                               ("Standard sensor", 2), ("Run status sensor", 1)):  # health_watch and run_liveness
        expect(page.get_by_text(description, exact=True)).to_have_count(count)
        expect(page.get_by_text(description, exact=True).first).to_be_visible()
    save_shot(page, "automation_running")

    pictures = {"nightly_backup": "schedule_nightly_backup", "health_watch": "sensor_health_watch"}
    for kind, name in AUTOMATION:
        link_to(page, automation_path(kind, name)).click()
        page.wait_for_url(re.compile(re.escape(automation_path(kind, name))))
        expect(page.get_by_text("Running", exact=True)).to_be_visible()
        expect(running_switch(page)).to_be_checked()
        if kind == "schedules":
            expect(page.get_by_text("Next tick", exact=True)).to_be_visible()
        else:
            expect(page.get_by_text("View logs").first).to_be_visible(timeout=60_000)  # its evaluations (ticks)
            expect(page.get_by_text(re.compile(r"^Loading ticks"))).to_have_count(0)
        if name == "health_watch":  # its cursor (the page refreshes it every 15 s) tracks the environment just released
            cursor_row = page.locator("tr").filter(has=page.get_by_text("Cursor", exact=True)).first
            expect(cursor_row).to_contain_text(f'"{env}": {{"serving": "ui-v1"', timeout=60_000)
        if name in pictures:
            page.wait_for_timeout(500)
            save_shot(page, pictures[name])
        nav(page, "/automation")
    assert automation_status_api(base) == {name: "RUNNING" for _, name in AUTOMATION}

    # ---- Catalog: this environment's release history and backups ---------------------------------------------
    nav(page, "/assets")
    page.locator(".CodeMirror", has=page.get_by_text("Search and filter assets")).click()
    page.keyboard.type(env)
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"asset-selection="))
    page.keyboard.press("Escape")
    deployments = link_to(page, f"/assets/deployments/{env}").first
    backups = page.locator(f'a[href^="/assets/backups/{env}/"]').first
    expect(deployments).to_be_visible()
    expect(backups).to_be_visible()
    page.mouse.click(900, 650)  # close the search suggestions, should they still be open
    page.wait_for_timeout(500)
    save_shot(page, "asset_catalog")

    deployments.click()
    page.wait_for_url(re.compile(rf"/assets/deployments/{re.escape(env)}"))
    page.get_by_role("tab", name="Events", exact=True).click()
    page.wait_for_url(re.compile(r"view=events"))
    expect(page.get_by_text(f"Materialized in run {run_id[:8]}").first).to_be_visible()
    for key, value in [("event", "released"), ("version", "ui-v1"), ("environment", env), ("target", "pm2")]:
        expect(metadata_row(page, key, value)).to_be_visible()
    save_shot(page, "asset_deployments_history")

    page.go_back()
    page.go_back()
    page.wait_for_url(re.compile(r"/assets\?"))
    backups.click()
    page.wait_for_url(re.compile(rf"/assets/backups/{re.escape(env)}/"))
    page.get_by_role("tab", name="Events", exact=True).click()
    page.wait_for_url(re.compile(r"view=events"))
    expect(page.get_by_text(re.compile(r"^pre-release backup \S+ \(verified\)$")).first).to_be_visible()
    for key, value in [("trigger", "pre-release"), ("release_version", "ui-v1")]:
        expect(metadata_row(page, key, value)).to_be_visible()
    save_shot(page, "asset_backups_history")

    timings["whole test"] = time.monotonic() - t0
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; screenshots in {SHOTS}")
