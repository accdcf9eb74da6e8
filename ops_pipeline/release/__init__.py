"""Releases: the release and rollback jobs (jobs.py, one module per stage in ops/), the sensors that roll a bad release
back (sensors.py), run liveness, status, packagers and test reports for the app's own commands, and `init_spec`."""
