"""Process pools whose workers die with their parent.

Nothing tells a pool's worker that its parent was killed (SIGKILL, OOM killer): it finishes
its task, writing labels into a run its owner believes stopped, and then waits on its task
queue for ever, along with multiprocessing's resource tracker. Every process pool in saescope
comes from `process_pool`: each worker starts a watcher thread that ends the worker as soon as
its parent is gone (its parent pid changes when it is re-parented). Work is written in
transactions, so a worker ended mid-task leaves nothing half-written, and a re-run resumes.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor

WATCH_INTERVAL_S = 0.2


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes (not forked: the parent may hold a model with live
    torch thread pools) that exit when this process dies."""
    import multiprocessing as mp

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker as soon as `parent_pid` is no longer its parent."""
    if os.getppid() != parent_pid:  # the parent died while this worker was starting
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="saescope-parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)  # no cleanup: open transactions roll back, the parent's run resumes them
