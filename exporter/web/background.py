"""Work the server does between requests: the evaluation loop with the store's upkeep, and
the extra tasks (tail followers, the in-process demo), on daemon threads started and
stopped with the app's lifespan. Each step is isolated (`components`): a failing checkpoint
does not stop evaluations, and a failing task is restarted after a pause instead of ending
its thread silently."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from ..engine import Engine

log = logging.getLogger("llm_usage_exporter")
Task = Callable[[threading.Event], None]
NamedTask = tuple[str, Task]         # (component, task): a tail follower is ("tail", follower.run)
PRUNE_EVERY = 600.0          # seconds between prunes of aged-out rows
TASK_RESTART_PAUSE = 5.0     # seconds before a task that raised runs again


class Background:
    """Periodic evaluation, checkpoints and pruning, and the extra tasks."""

    def __init__(self, engine: Engine, extra: Sequence[NamedTask] = ()) -> None:
        self.engine = engine
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.extra = list(extra)

    def start(self) -> None:
        self.engine.evaluate()
        targets: list[Task] = [self._evaluate_loop, *(self._restarting(name, task) for name, task in self.extra)]
        for target in targets:
            t = threading.Thread(target=target, args=(self.stop,), daemon=True)
            t.start()
            self.threads.append(t)

    def _evaluate_loop(self, stop: threading.Event) -> None:
        engine = self.engine
        components = engine.components
        last_prune = 0.0
        while not stop.wait(engine.settings.evaluation_interval):
            engine.evaluate()
            components.attempt("checkpoint", self._upkeep, None)
            if time.monotonic() - last_prune > PRUNE_EVERY:
                components.attempt("prune", engine.prune, None)
                last_prune = time.monotonic()

    def _upkeep(self) -> None:
        """A quiet exporter still folds its last batches into the buckets; while readiness
        fails nothing else may write, so find out whether the store can be written again."""
        store = self.engine.store
        store.checkpoint()
        if not store.writable:
            store.probe()

    def _restarting(self, name: str, task: Task) -> Task:
        """`task`, run again after a pause whenever it raises, until the server stops."""

        def run(stop: threading.Event) -> None:
            while not stop.is_set():
                try:
                    task(stop)
                    return
                except Exception:
                    log.exception("%s stopped; restarting in %g s", name, TASK_RESTART_PAUSE)
                    self.engine.components.failed(name)
                    stop.wait(TASK_RESTART_PAUSE)
        return run

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
