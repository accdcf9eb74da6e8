"""One dagster-webserver + dagster-daemon for the end-to-end tests of a session."""

import pytest

from tests.e2e.servers import DagsterServers


@pytest.fixture(scope="session")
def dagster_stack(state_dir, local_stack, node_app):
    servers = DagsterServers(state_dir / "e2e_dagster_home", env={"OPS_STATE_DIR": str(state_dir)})
    try:
        servers.start()
    except Exception:
        servers.stop()
        raise
    yield servers
    servers.stop()
