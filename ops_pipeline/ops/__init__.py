"""One module per stage of a release (and of backups and rollbacks)."""
