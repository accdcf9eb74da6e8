"""PM2 target: one PM2 fork-mode process per instance, each on its own port, behind the nginx front proxy."""
