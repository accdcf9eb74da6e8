"""Announcements: the run log always, Slack when a token and channel are configured."""

from __future__ import annotations

import dagster as dg
import httpx
from pydantic import Field


class Notifier(dg.ConfigurableResource):
    """Announces failed releases and rollbacks. Always to the run log; to Slack when configured."""

    slack_token: str = Field("", description="Slack bot token (set it with EnvVar; empty: no Slack).")
    slack_channel: str = Field("", description="Slack channel, e.g. #releases.")
    slack_api_url: str = Field("https://slack.com/api", description="Slack Web API base URL.")

    def announce(self, log, text: str, *, level: str = "info") -> bool:
        """Log `text` and post it to Slack if configured. Returns True if Slack accepted it. Never raises."""
        getattr(log, level if level in ("info", "warning", "error") else "info")(f"[notify] {text}")
        if not (self.slack_token and self.slack_channel):
            return False
        try:
            from dagster_slack import SlackResource  # optional dependency

            SlackResource(token=self.slack_token).get_client().chat_postMessage(channel=self.slack_channel, text=text)
            return True
        except ImportError:
            pass
        except Exception as exc:  # a notification failure must not fail a rollback
            log.warning(f"[notify] Slack post failed: {type(exc).__name__}")
            return False
        try:
            resp = httpx.post(f"{self.slack_api_url}/chat.postMessage", timeout=5,
                              headers={"Authorization": f"Bearer {self.slack_token}"},
                              json={"channel": self.slack_channel, "text": text})
            return resp.status_code == 200 and resp.json().get("ok", False)
        except Exception as exc:
            log.warning(f"[notify] Slack post failed: {type(exc).__name__}")
            return False
