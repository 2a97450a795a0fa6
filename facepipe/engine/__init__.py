"""Engines that run a job's items: ``local`` (this process, the default) or ``ray``
(actors on a local Ray instance or a cluster), with the same outputs.

Commands describe a job as a :class:`WorkerFactory` (how a worker builds its
models), a ``work`` function from :mod:`facepipe.engine.work` (the library call for
one item) and the items; :meth:`Engine.map` returns the outcomes::

    from facepipe.engine import WorkerFactory, create_engine
    from facepipe.engine.work import analyze_images

    engine = create_engine("ray")                       # or "local"
    factory = WorkerFactory(build_pipeline, "mtcnn", "default", "auto", 32)
    for outcome in engine.map(factory, analyze_images, shards, ordered=True):
        ...                                             # outcome.value or outcome.error
    engine.close()
"""

from __future__ import annotations

from typing import Any

from facepipe.engine.base import Engine, Outcome, WorkerFactory, in_order, run_item, shards
from facepipe.engine.local import LocalEngine

#: Engine names accepted by ``--engine``.
ENGINES = ("local", "ray")


def create_engine(name: str = "local", address: str | None = None, workers: int = 0, **ray_options: Any) -> Engine:
    """The engine called ``name``; ``address``/``workers``/``ray_options`` go to
    :class:`~facepipe.engine.ray_engine.RayEngine`. For ``local``, ``workers`` > 1 (or -1:
    one per CPU) runs the items in that many local processes
    (:class:`~facepipe.engine.pool.PoolEngine`). Raises
    :class:`~facepipe.engine.ray_engine.EngineError` when Ray is missing or the
    cluster cannot be reached, ``ValueError`` for an unknown name."""
    if name == "local":
        if address:
            raise ValueError("--ray-address needs --engine ray")
        if workers not in (0, 1):
            from facepipe.engine.pool import PoolEngine

            return PoolEngine(workers)  # --workers N: local worker processes
        return LocalEngine()
    if name == "ray":
        from facepipe.engine.ray_engine import RayEngine

        return RayEngine(address, workers, **ray_options)
    raise ValueError(f"unknown engine {name!r}; valid: {', '.join(ENGINES)}")


__all__ = ["ENGINES", "Engine", "LocalEngine", "Outcome", "WorkerFactory", "create_engine", "in_order",
           "run_item", "shards"]
