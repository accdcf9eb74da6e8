"""Deploy targets, one subpackage per target: pm2/ (processes on this host), docker/ (a Docker Engine), kubernetes/.
base.py is the interface they all implement; resource.py (`DeployTargets`) builds the one a spec names. The front
proxy (nginx.py), process helpers (procs.py) and the host relay (relay.py) are shared.

Deliberately free of imports: the relay runs as `python -m ops_pipeline.targets.relay` and starts without Dagster."""
