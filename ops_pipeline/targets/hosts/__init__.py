"""Hosts reached over SSH: the connection (pinned host keys) and the readiness checks a release runs first."""
