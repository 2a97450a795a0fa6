"""The local engine with worker processes: ``--workers N`` (face_recognition's ``--cpus``).

Each worker process builds the models once (from the same :class:`WorkerFactory` the
Ray engine uses) and runs the same ``work`` functions, so the outputs are those of the
single-process local engine. Processes are started with ``spawn`` (safe with PyTorch's
threads); each uses ``cpu_count // workers`` intra-op threads so the workers do not
oversubscribe the cores. A worker pays the start-up (importing torch, loading the
models: a few seconds) once, so workers help on batches of many images.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence

from facepipe.engine.base import ItemProgress, Outcome, Then, WorkerFactory, Work, in_order, run_item

_FACTORY: WorkerFactory | None = None


def _init_worker(factory: WorkerFactory, threads: int) -> None:
    global _FACTORY
    _FACTORY = factory
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _run(work: Work, index: int, item: Any) -> Outcome[Any]:
    if _FACTORY is None:
        raise RuntimeError("pool worker used before its initialiser ran")
    outcome = run_item(work, _FACTORY(), index, item, None)
    outcome.item = None             # the driver has it (a join's item holds all its segments' results)
    return outcome


def resolve_workers(workers: int) -> int:
    """``-1`` means one worker per CPU (as face_recognition's ``--cpus -1``); else ``workers`` (>= 1)."""
    if workers == -1:
        return max(1, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1 or -1 (all CPUs), got {workers}")
    return int(workers)


class PoolEngine:
    """Runs items in ``workers`` local processes; outcomes as they finish, or in item order."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = resolve_workers(workers)
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)
        self._pool: ProcessPoolExecutor | None = None
        self._factory: WorkerFactory | None = None

    def _executor(self, factory: WorkerFactory) -> ProcessPoolExecutor:
        if self._pool is not None and self._factory is not factory:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(factory, self.threads))
            self._factory = factory
        return self._pool

    def map(self, factory: WorkerFactory, work: Work, items: Sequence[Any], *,
            ordered: bool = False, on_done: Callable[[Outcome[Any]], None] | None = None,
            item_progress: Callable[[int, Any], ItemProgress | None] | None = None,
            then: Then | None = None) -> Iterator[Outcome[Any]]:
        """Outcomes of ``work`` over ``items`` (``item_progress`` is not available across processes);
        items added by ``then`` are submitted as their outcome arrives."""
        items = list(items)
        if not items:
            return iter(())
        pool = self._executor(factory)

        def finished() -> Iterator[Outcome[Any]]:
            pending: set[Future[Outcome[Any]]] = {pool.submit(_run, work, i, item) for i, item in enumerate(items)}
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    outcome = fut.result()
                    outcome.item = items[outcome.index]
                    if then is not None:
                        for item in then(outcome):
                            pending.add(pool.submit(_run, work, len(items), item))
                            items.append(item)
                    if on_done is not None:
                        on_done(outcome)
                    yield outcome

        return in_order(finished()) if ordered else finished()

    def describe(self) -> dict[str, Any]:
        """``{"engine": "local", "workers": N, "threads_per_worker": T}``."""
        return {"engine": self.name, "workers": self.workers, "threads_per_worker": self.threads}

    def close(self) -> None:
        """Stop the worker processes."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
