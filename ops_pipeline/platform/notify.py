"""Announcements: the run log always, Slack (dagster-slack's SlackResource) when a token and channel are configured."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

SLACK_API = "https://slack.com/api/"


class Notifier(dg.ConfigurableResource):
    """Announces failed releases and rollbacks. Always to the run log; to Slack when configured."""

    slack_token: str = Field("", description="Slack bot token (set it with EnvVar; empty: no Slack).")
    slack_channel: str = Field("", description="Slack channel, e.g. #releases.")
    slack_api_url: str = Field(SLACK_API, description="Slack Web API base URL (a proxy or a test server).")

    def _client(self):
        from dagster_slack import SlackResource

        client = SlackResource(token=self.slack_token).get_client()
        if self.slack_api_url != SLACK_API:
            client.base_url = self.slack_api_url
        return client

    def announce(self, log, text: str, *, level: str = "info") -> bool:
        """Log `text` and post it to Slack if configured. Returns True if Slack accepted it. Never raises:
        a notification failure must not fail a release or a rollback."""
        getattr(log, level if level in ("info", "warning", "error") else "info")(f"[notify] {text}")
        if not (self.slack_token and self.slack_channel):
            return False
        try:
            resp = self._client().chat_postMessage(channel=self.slack_channel, text=text)
            return bool(resp.get("ok"))
        except Exception as exc:  # noqa: BLE001
            log.warning(f"[notify] Slack post failed: {type(exc).__name__}")
            return False
