"""Releases: the release and rollback jobs (jobs.py, one module per stage in ops/), the sensors that roll a bad release
back (sensors.py), run liveness, status, test reports of the app's own test commands, approval, and `init_spec`."""
