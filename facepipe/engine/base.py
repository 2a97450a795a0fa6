"""What every engine shares: work items, outcomes, and worker state built once per worker.

An engine runs ``work(state, item, progress)`` for every item of a job, where
``state`` (the models: detector, embedder, gallery) is built once per worker by a
:class:`WorkerFactory`. The local engine has one worker, this process; the Ray
engine has one per actor. Both call the same library functions (the ``work``), so
their outputs are the same. A :class:`~facepipe.errors.FacepipeError` raised by
``work`` (a bad file, an unwritable output) becomes a failed :class:`Outcome`
naming the item, as the commands report it locally; any other exception is a bug
and propagates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, Iterator, Protocol, Sequence, TypeVar

from facepipe.errors import FacepipeError

T = TypeVar("T")

#: ``progress(phase, done, total)`` for one item's own progress (local engine only).
ItemProgress = Callable[[str, int, int], None]
#: ``work(state, item, progress_or_None) -> value``; must be a module-level function
#: (the Ray engine sends it to workers by reference).
Work = Callable[[Any, Any, "ItemProgress | None"], Any]
#: ``then(outcome) -> more items``: work that an outcome makes possible (the stitching of a
#: video's segments once the last one is in, a segment to redo); appended to the job.
Then = Callable[["Outcome[Any]"], Sequence[Any]]


class WorkerFactory:
    """Builds a worker's state (models) once: ``factory()`` returns the same object on
    every call in one process. Pickling (sending it to a Ray worker) drops the built
    state, so each worker builds its own from the same arguments."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self._state: Any = None
        self._built = False

    def __call__(self) -> Any:
        if not self._built:
            self._state = self.fn(*self.args, **self.kwargs)
            self._built = True
        return self._state

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "args": self.args, "kwargs": self.kwargs, "_state": None, "_built": False}


@dataclass
class Outcome(Generic[T]):
    """The result of one item: ``value`` or, for a reported failure, ``error`` (one line)."""

    index: int
    item: Any
    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the item was processed."""
        return self.error is None


def run_item(work: Work, state: Any, index: int, item: Any, progress: ItemProgress | None = None) -> Outcome[Any]:
    """Run one item, turning the library's typed errors into a failed outcome."""
    try:
        return Outcome(index, item, value=work(state, item, progress))
    except FacepipeError as exc:
        return Outcome(index, item, error=str(exc))


class Engine(Protocol):
    """Runs a job's items on one machine or many; see the module docstring."""

    name: str

    def map(self, factory: WorkerFactory, work: Work, items: Sequence[Any], *,
            ordered: bool = False, on_done: Callable[[Outcome[Any]], None] | None = None,
            item_progress: Callable[[int, Any], ItemProgress | None] | None = None,
            then: Then | None = None) -> Iterator[Outcome[Any]]:
        """Outcomes of ``work`` over ``items``: as they finish, or in item order when
        ``ordered``. ``on_done`` is called as each item finishes (for a progress bar);
        ``item_progress(index, item)`` may give a per-item progress callback where the
        engine can call it (local). ``then(outcome)``, called on the driver as each item
        finishes (before ``on_done``), returns items to add to the job: they get the next
        indices and their outcomes are yielded too (a dynamic job: segments, then the
        step that joins them)."""
        ...

    def describe(self) -> dict[str, Any]:
        """Engine name, workers and resources, for reports and benchmarks."""
        ...

    def close(self) -> None:
        """Release workers (and a Ray instance this engine started)."""
        ...


def in_order(outcomes: Iterable[Outcome[T]]) -> Iterator[Outcome[T]]:
    """Re-emit outcomes by ``index`` (0, 1, 2, ...), holding early ones back."""
    held: dict[int, Outcome[T]] = {}
    nxt = 0
    for o in outcomes:
        held[o.index] = o
        while nxt in held:
            yield held.pop(nxt)
            nxt += 1
    for k in sorted(held):
        yield held[k]


def shards(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive groups of ``size`` items (the last may be shorter)."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    return [list(items[i:i + size]) for i in range(0, len(items), size)]
