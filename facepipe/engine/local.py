"""The local engine: every item in this process, one after another (facepipe's default)."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from facepipe.engine.base import ItemProgress, Outcome, Then, WorkerFactory, Work, run_item


class LocalEngine:
    """Runs items in order in this process with the state ``factory()`` built here once."""

    name = "local"

    def map(self, factory: WorkerFactory, work: Work, items: Sequence[Any], *,
            ordered: bool = False, on_done: Callable[[Outcome[Any]], None] | None = None,
            item_progress: Callable[[int, Any], ItemProgress | None] | None = None,
            then: Then | None = None) -> Iterator[Outcome[Any]]:
        """Outcomes in item order (``ordered`` is always true here); items added by
        ``then`` run after the ones before them."""
        todo = list(items)
        state = factory() if todo else None
        i = 0
        while i < len(todo):
            item = todo[i]
            progress = item_progress(i, item) if item_progress is not None else None
            outcome = run_item(work, state, i, item, progress)
            if then is not None:
                todo.extend(then(outcome))
            if on_done is not None:
                on_done(outcome)
            yield outcome
            i += 1

    def describe(self) -> dict[str, Any]:
        """``{"engine": "local", "workers": 1}``."""
        return {"engine": self.name, "workers": 1}

    def close(self) -> None:
        """Nothing to release."""
