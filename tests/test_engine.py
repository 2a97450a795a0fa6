"""The engine layer without Ray: local engine, ordering, worker factories, the missing-Ray error."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from facepipe.cli import cli
from facepipe.engine import LocalEngine, WorkerFactory, create_engine, in_order, shards
from facepipe.engine.base import Outcome
from facepipe.errors import ImageReadError


def _build(n: int) -> list[int]:
    return [n]


def _work(state: list[int], item: int, progress: object = None) -> int:
    if item < 0:
        raise ImageReadError(Path(f"img{item}.jpg"), "cannot read")
    state[0] += 1
    return item * 10


def test_local_engine_builds_once_and_reports_typed_errors_per_item() -> None:
    f = WorkerFactory(_build, 0)
    out = list(LocalEngine().map(f, _work, [1, -2, 3]))
    assert [o.index for o in out] == [0, 1, 2]
    assert [o.value for o in out] == [10, None, 30]
    assert out[1].error == "img-2.jpg: cannot read" and not out[1].ok
    assert f() == [2]                  # one state, shared by the items and the caller


def test_factory_pickles_without_its_built_state() -> None:
    f = WorkerFactory(_build, 5)
    f()[0] = 99
    g = pickle.loads(pickle.dumps(f))
    assert g() == [5] and f() == [99]


def test_in_order_and_shards() -> None:
    outs = [Outcome(i, i) for i in (2, 0, 3, 1)]
    assert [o.index for o in in_order(outs)] == [0, 1, 2, 3]
    assert shards(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        shards([1], 0)


def test_engine_ray_without_ray_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` fails as if not installed
    from facepipe.engine.ray_engine import EngineError

    with pytest.raises(EngineError, match=r"pip install 'facepipe\[ray\]'"):
        create_engine("ray")
    img = tmp_path / "x.jpg"
    img.write_bytes(b"")
    r = CliRunner().invoke(cli, ["embed", str(img), "--out", str(tmp_path / "e.npy"), "--detector", "haar",
                                 "--embedder", "untrained", "--device", "cpu", "--engine", "ray"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "needs Ray, which is not installed: pip install 'facepipe[ray]'" in r.output
    assert len([ln for ln in r.output.splitlines() if ln.startswith("Error")]) == 1


def test_ray_options_need_the_ray_engine(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["video", str(tmp_path), "--out", str(tmp_path / "o"), "--ray-address", "x:1"])
    assert r.exit_code != 0 and "--ray-address and --ray-workers need --engine ray" in r.output


def test_batch_summary_lists_each_failed_input_at_the_end(tmp_path: Path, astronaut_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    good = tmp_path / "good.jpg"
    good.write_bytes(astronaut_path.read_bytes())
    r = CliRunner().invoke(cli, ["embed", str(tmp_path), "--out", str(tmp_path / "e.npy"), "--detector", "haar",
                                 "--embedder", "untrained", "--device", "cpu", "--engine", "local"])
    assert r.exit_code == 1, r.output
    lines = r.output.rstrip().splitlines()
    at = lines.index("facepipe: 2 input(s) failed:")
    assert at > [i for i, ln in enumerate(lines) if "image(s)" in ln and "embedded" in ln][0]   # after the summary
    listed = lines[at + 1:]
    assert len(listed) == 2 and all(ln.startswith("  ") for ln in listed)
    assert any("bad.jpg" in ln for ln in listed) and any("empty.png" in ln for ln in listed)
    # the same lines were reported as errors when they happened
    for ln in listed:
        assert f"facepipe: error: {ln.strip()}" in r.output


def _tenfold(state: object, item: int, progress: object = None) -> int:
    return item * 10


def test_then_adds_items_to_a_running_job_on_worker_processes() -> None:
    """What a finished item makes possible (a video's join after its segments) joins the job
    (the single-process and Ray engines: tests/test_segments.py, tests/test_engine_ray.py)."""
    engine = create_engine("local", workers=2)
    try:
        seen = []
        out = list(engine.map(WorkerFactory(dict), _tenfold, [1, 2], on_done=seen.append,
                              then=lambda o: [o.value] if o.value < 100 else []))
    finally:
        engine.close()
    assert sorted(o.value for o in out) == [10, 20, 100, 200] and len(seen) == 4
    assert all(o.item * 10 == o.value for o in out)          # each outcome names its own item
