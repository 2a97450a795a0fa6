"""The Ray engine: a job's items spread over the actors of a local Ray instance or a cluster.

Each worker is a Ray actor that builds the models once (:class:`WorkerFactory`)
and then runs the same library function the local engine runs (``work``) for one
item per call: a whole video, or a shard of images whose faces are embedded in one
batch. On a cluster with GPUs every actor holds one GPU (``num_gpus``) unless told
otherwise; on CPUs one core each. The driver keeps each actor ``queue_per_worker``
items ahead, so an actor never waits for its next item, and collects outcomes as
they finish (``ray.wait``), so a progress bar counts items finished anywhere.

Faults: actors are restarted when their process dies (``max_restarts=-1``) and the
call that was running is retried on the restarted actor (``max_task_retries``), so
a worker killed mid-item (``kill -9``, out of memory, a node lost) costs a retry,
not the item. Outputs are only ever written under temporary names and renamed when
an item is complete (as locally), so a retried item's output appears exactly once.
An item whose worker dies on every retry is reported as failed, like a bad file.

Everything the workers read and write (inputs, ``--out``) must be at the same path
on every machine of a cluster (a shared filesystem); image results (embeddings)
come back to the driver, which alone writes the image commands' outputs and the
gallery.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

from facepipe.engine.base import ItemProgress, Outcome, Then, WorkerFactory, Work, in_order, run_item
from facepipe.errors import FacepipeError

log = logging.getLogger(__name__)

#: Object store of a Ray instance facepipe starts itself: items and results are small
#: (paths in, boxes and embeddings out), so a small store leaves the memory to the models.
LOCAL_OBJECT_STORE_MB = 256


class EngineError(FacepipeError):
    """The engine cannot run (Ray missing, cluster unreachable)."""


def import_ray() -> Any:
    """The ``ray`` module, or :class:`EngineError` saying what to install."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError(
            "--engine ray needs Ray, which is not installed: pip install 'facepipe[ray]' "
            "(or pip install ray)") from exc
    return ray


class _Worker:
    """One Ray actor: models built once, then one item per call."""

    def __init__(self, factory: WorkerFactory, work: Work, threads: int) -> None:
        if threads > 0:
            import cv2
            import torch

            torch.set_num_threads(threads)
            cv2.setNumThreads(threads)
        self.factory = factory
        self.work = work
        self.state: Any = None
        self.build_error: str | None = None

    def run(self, index: int, item: Any) -> Outcome[Any]:
        """The outcome of one item (a model that cannot be built here fails the item)."""
        if self.state is None and self.build_error is None:
            try:
                self.state = self.factory()
            except FacepipeError as exc:
                self.build_error = f"worker on {os.uname().nodename}: {exc}"
        if self.build_error is not None:
            return Outcome(index, None, error=self.build_error)
        outcome = run_item(self.work, self.state, index, item)
        outcome.item = None             # the driver has it (a join's item holds all its segments' results)
        return outcome

    def pid(self) -> int:
        """This worker's process id (tests kill it)."""
        return os.getpid()


class RayEngine:
    """Runs items on Ray actors; see the module docstring.

    ``address``: a running cluster to join (``HOST:PORT`` of ``ray start --head``, or
    ``auto``); ``None`` starts a local instance on this machine (or uses the one this
    process already started). ``workers``: actors per job (0: one per GPU when the
    cluster has GPUs and ``device`` is not ``cpu``, else one per CPU).
    ``cpus_per_worker`` and ``gpus_per_worker`` (``None``: 1 when GPUs are used) are
    each actor's reservation; ``threads`` the PyTorch/OpenCV threads in each (0: as
    many as its CPUs). ``max_retries``: retries of an item whose worker died.
    ``keep_workers``: keep the actors (and their models) after a :meth:`map` for the next
    one with the same factory and work, until :meth:`close` (benchmarks warm up this way);
    by default each job's actors end with it.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 0, *, device: str = "auto",
                 cpus_per_worker: float = 1.0, gpus_per_worker: float | None = None, threads: int = 0,
                 max_retries: int = 3, queue_per_worker: int = 2, num_cpus: int | None = None,
                 object_store_mb: int = LOCAL_OBJECT_STORE_MB, log_to_driver: bool = False,
                 keep_workers: bool = False) -> None:
        ray = import_ray()
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.address = address
        self.started_here = False
        t0 = time.perf_counter()
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=log_to_driver,
                                      logging_level=logging.INFO if log_to_driver else logging.ERROR)
            if not address:
                kw.update(num_cpus=num_cpus, object_store_memory=int(object_store_mb) * 1024 * 1024)
            if not log_to_driver:
                # Ray announces on every start that token authentication (its default) is on.
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            try:
                ray.init(address=address or None, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise EngineError(f"cannot start or join {where}: {str(exc).splitlines()[0]}") from exc
            self.started_here = True
        self.startup_seconds = time.perf_counter() - t0
        res = ray.cluster_resources()
        self.cluster_cpus = float(res.get("CPU", 0.0))
        self.cluster_gpus = float(res.get("GPU", 0.0))
        use_gpu = self.cluster_gpus > 0 and not device.strip().lower().startswith("cpu")
        self.gpus_per_worker = (1.0 if use_gpu else 0.0) if gpus_per_worker is None else float(gpus_per_worker)
        self.cpus_per_worker = float(cpus_per_worker)
        if workers:
            self.workers = int(workers)
        elif self.gpus_per_worker > 0:
            self.workers = max(1, int(self.cluster_gpus / self.gpus_per_worker))
        else:
            self.workers = max(1, int(self.cluster_cpus / max(self.cpus_per_worker, 1e-9)))
        self.threads = int(threads) if threads else max(1, int(self.cpus_per_worker))
        self.max_retries = int(max_retries)
        self.queue_per_worker = max(1, int(queue_per_worker))
        self.last_actors: list[Any] = []
        self.keep_workers = bool(keep_workers)
        self._kept: dict[bytes, list[Any]] = {}

    def describe(self) -> dict[str, Any]:
        """Engine, workers and the cluster's resources."""
        return {"engine": self.name, "workers": self.workers, "address": self.address or "local",
                "cluster_cpus": self.cluster_cpus, "cluster_gpus": self.cluster_gpus,
                "cpus_per_worker": self.cpus_per_worker, "gpus_per_worker": self.gpus_per_worker,
                "startup_seconds": round(self.startup_seconds, 3)}

    def map(self, factory: WorkerFactory, work: Work, items: Sequence[Any], *,
            ordered: bool = False, on_done: Callable[[Outcome[Any]], None] | None = None,
            item_progress: Callable[[int, Any], ItemProgress | None] | None = None,
            then: Then | None = None) -> Iterator[Outcome[Any]]:
        """Outcomes as items finish on the cluster (in item order when ``ordered``).
        ``item_progress`` is not used: per-item progress stays on the workers. Items
        added by ``then`` go to the next free worker."""
        gen = self._map(factory, work, list(items), on_done, then)
        return in_order(gen) if ordered else gen

    def _map(self, factory: WorkerFactory, work: Work, items: list[Any],
             on_done: Callable[[Outcome[Any]], None] | None, then: Then | None = None) -> Iterator[Outcome[Any]]:
        if not items:
            return
        ray = import_ray()
        key = ray.cloudpickle.dumps((factory, work)) if self.keep_workers else b""
        actors = self._kept.get(key) if self.keep_workers else None
        if not actors:
            actor_cls = ray.remote(_Worker).options(
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker,
                max_restarts=-1, max_task_retries=self.max_retries)
            n = self.workers if self.keep_workers else min(self.workers, len(items))
            actors = [actor_cls.remote(factory, work, self.threads) for _ in range(n)]
            if self.keep_workers:
                self._kept[key] = actors
        self.last_actors = actors
        inflight: dict[Any, tuple[int, Any]] = {}
        load = [0] * len(actors)
        nxt = 0

        def fill() -> None:
            # Round-robin over the actors, each kept up to queue_per_worker items ahead.
            nonlocal nxt
            for _ in range(self.queue_per_worker):
                for k, actor in enumerate(actors):
                    if nxt < len(items) and load[k] < self.queue_per_worker:
                        inflight[actor.run.remote(nxt, items[nxt])] = (nxt, k)
                        load[k] += 1
                        nxt += 1

        try:
            fill()
            while inflight:
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                index, k = inflight.pop(ref)
                load[k] -= 1
                try:
                    outcome = ray.get(ref)
                    outcome.item = items[index]
                except ray.exceptions.RayActorError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    outcome = Outcome(index, items[index],
                                      error=f"{_describe_item(items[index])}: worker died "
                                            f"{self.max_retries + 1} times while processing it ({first})")
                if then is not None:
                    items.extend(then(outcome))
                fill()
                if on_done is not None:
                    on_done(outcome)
                yield outcome
        finally:
            if not self.keep_workers:
                _kill(ray, actors)
            self.last_actors = []

    def close(self) -> None:
        """End kept workers; shut down the Ray instance if this engine started it."""
        if self._kept:
            ray = import_ray()
            for actors in self._kept.values():
                _kill(ray, actors)
            self._kept.clear()
        if self.started_here:
            import ray

            ray.shutdown()
            self.started_here = False


def _kill(ray: Any, actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception as exc:  # an actor already gone; nothing to release
            log.debug("ray.kill: %s", exc)


def _describe_item(item: Any) -> str:
    """A short name for an item in an error line (its path where it has one)."""
    for attr in ("path", "source"):
        v = getattr(item, attr, None)
        if v is not None:
            return os.fspath(v)
    if isinstance(item, (list, tuple)) and item:
        return f"{_describe_item(item[0])} (+{len(item) - 1} more)" if len(item) > 1 else _describe_item(item[0])
    return str(item)
