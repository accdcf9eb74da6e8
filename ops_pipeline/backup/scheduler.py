"""The streamed restore's tasks (load a table, build an index, add a constraint, ANALYZE) and the threads that run
them as their inputs become ready, one connection each."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from ops_pipeline.backup.common import BackupError
from ops_pipeline.platform.postgres import DatabaseError
from ops_pipeline.platform.redaction import Redactor


@dataclass
class Task:
    key: tuple[str, int]  # what `needs` refers to
    name: str  # for messages
    run: Callable[[Callable[[], psycopg.Connection]], None]
    needs: set[tuple[str, int]]  # task keys that must be done first
    locks: frozenset[int]  # tables (dump ids) it locks: tasks sharing one do not run at the same time, unless
    shared: bool = False  # both only take SHARE locks (CREATE INDEX): those may
    rank: tuple = ()  # lower starts first
    ready: Callable[[], bool] = lambda: True


def schedule(tasks: list[Task], *, jobs: int, failed: threading.Event, fail: Callable[[BaseException], None],
             connect: Callable[[], psycopg.Connection], disconnect: Callable[[psycopg.Connection], None],
             finished: dict[tuple[str, int], float], redact: Redactor) -> None:
    """Run every task on `jobs` threads: each takes the first task (by rank) whose needs are done, whose input
    is ready and whose tables no running task locks (two index builds on one table may run together). A thread
    opens its connection (`connect`) when it takes its first task; the first failure goes to `fail`, which sets
    `failed`; `finished` records when each task finished."""
    cond = threading.Condition()
    pending = sorted(tasks, key=lambda task: task.rank)
    done: set[tuple[str, int]] = set()
    running: list[Task] = []

    def free(task: Task) -> bool:
        return all(not (task.locks & other.locks) or (task.shared and other.shared) for other in running)

    def take() -> Task | None:
        with cond:
            while pending and not failed.is_set():
                for task in pending:
                    if task.needs <= done and free(task) and task.ready():
                        pending.remove(task)
                        running.append(task)
                        return task
                if not running and all(task.ready() for task in pending):  # nothing can change any more
                    fail(BackupError("restore tasks that can never start: "
                                     + ", ".join(task.name for task in pending[:10])))
                    break
                cond.wait(0.05)  # also woken when a task finishes; a spool that starts is seen within 50 ms
            return None

    def worker() -> None:
        conn: psycopg.Connection | None = None

        def connection() -> psycopg.Connection:
            nonlocal conn
            if conn is None:
                conn = connect()
            return conn

        try:
            while (task := take()) is not None:
                try:
                    task.run(connection)
                except (psycopg.Error, DatabaseError) as exc:
                    fail(BackupError(f"{task.name} failed: {redact(str(exc).strip()[:1500])}"))
                    return
                except BaseException as exc:
                    fail(exc)
                    return
                with cond:
                    done.add(task.key)
                    finished[task.key] = time.monotonic()
                    running.remove(task)
                    cond.notify_all()
        finally:
            if conn is not None:
                disconnect(conn)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(worker) for _ in range(jobs)]
        try:
            for future in futures:
                future.result()
        except BaseException as exc:  # an interrupt (Ctrl-C, a terminated run) in this thread: stop the workers
            fail(exc)
            raise
