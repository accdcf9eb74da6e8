"""The state file of a PM2 environment's warm standby: `<env>/standby.json`, next to the processes it describes.

PM2 cannot tell a standby instance from a serving one (a running process's environment cannot be changed), so the
target records which of its instances are out of traffic: the standby (the previous version, kept warm after a
release) and, after a traffic switch, the replaced instances still to be drained and stopped (`retiring`). Every
change is a read-modify-write under an exclusive flock on `<env>/standby.lock` (the run process and the sensor's
process may both change it), written to a temporary file and renamed over the old one, so a reader without the
lock (`read`) sees the old state or the new one, never half of it.

`<env>/rollout.lock` is held by a rollout for its whole length: a traffic switch asked for by a sensor takes it
without waiting and refuses when it is held, so a release in progress is never touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ops_pipeline.targets.base import Standby


class StandbyStore:
    def __init__(self, env_dir: Path) -> None:
        self.path = env_dir / "standby.json"
        self.lock_path = env_dir / "standby.lock"
        self.rollout_lock_path = env_dir / "rollout.lock"

    def read(self) -> Standby:
        try:
            return Standby.from_json(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return Standby()

    def _write(self, state: Standby) -> None:
        tmp = self.path.with_name(f".standby.{uuid.uuid4().hex[:8]}.json")
        tmp.write_text(json.dumps(state.to_json(), indent=2))
        os.replace(tmp, self.path)

    @contextmanager
    def locked(self) -> Iterator[Standby]:
        """The state, for a change: written back (atomically) when the block ends without an exception."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                self._write(state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    @contextmanager
    def rollout(self) -> Iterator[None]:
        """Held for a whole rollout (waits for another rollout of this environment to finish)."""
        self.rollout_lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rollout_lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def unless_rolling_out(self) -> Iterator[bool]:
        """True (and the rollout lock held for the block) when no rollout of this environment runs; False at once if
        one does."""
        self.rollout_lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rollout_lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
