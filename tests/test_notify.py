"""Notifications reach Slack (dagster-slack's client, against a local Slack Web API stand-in) and the run log."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg

from ops_pipeline.platform.notify import Notifier


class SlackStandIn:
    def __init__(self, ok: bool = True) -> None:
        self.posts: list[dict] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body.decode()})
                payload = json.dumps({"ok": ok}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"


def test_announce_posts_to_slack_and_logs():
    slack = SlackStandIn()
    n = Notifier(slack_token="xoxb-test", slack_channel="#releases", slack_api_url=slack.url)
    logs = []

    class Log:
        def warning(self, m):
            logs.append(m)

        info = error = warning

    assert n.announce(Log(), "rollback of prod started: v2 -> v1", level="warning")
    assert slack.posts[0]["path"] == "/api/chat.postMessage" and slack.posts[0]["auth"] == "Bearer xoxb-test"
    assert "rollback of prod started" in slack.posts[0]["body"] and "releases" in slack.posts[0]["body"]
    assert logs == ["[notify] rollback of prod started: v2 -> v1"]


def test_slack_down_never_fails_the_caller():
    n = Notifier(slack_token="xoxb-test", slack_channel="#releases", slack_api_url="http://127.0.0.1:9/api/")
    ctx = dg.build_op_context()
    assert n.announce(ctx.log, "release failed") is False


def test_without_slack_settings_only_the_run_log():
    assert Notifier().announce(dg.build_op_context().log, "hello") is False
