"""One module per stage of a release (preflight, tests, artifact, migrate, deploy, health) and of a rollback."""
