"""The Docker Engine resource lives in targets/docker_engine.py; this name stays for the callers outside targets/
(ops/artifact.py, ops/migrate.py, definitions.py) until they import it from there."""

from ops_pipeline.resources.targets.docker_engine import DockerEngine, ImageBuildError

__all__ = ["DockerEngine", "ImageBuildError"]
