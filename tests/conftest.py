"""Shared fixtures: real images (scikit-image's astronaut photo) and the dev data root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facepipe.datasets import data_root


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """Eileen Collins' NASA portrait: a real RGB face photo shipped with scikit-image."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="module")
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures(...)``):
    on a shared 2-core machine OpenMP barriers make 2 threads far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def astronaut_photos(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> dict[str, Path]:
    """Three photos of one person: the portrait (JPEG), a resized crop (PNG), its mirror (JPEG)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("photos")
    p1, p2, p3 = d / "eileen1.jpg", d / "eileen2.png", d / "eileen3.jpg"
    Image.fromarray(astronaut).save(p1, quality=95)
    Image.fromarray(astronaut[20:480, 10:500]).resize((400, 360)).save(p2)
    Image.fromarray(astronaut[:, ::-1]).save(p3, quality=90)
    return {"p1": p1, "p2": p2, "p3": p3}


@pytest.fixture(scope="session")
def astronaut_path(tmp_path_factory: pytest.TempPathFactory, astronaut: np.ndarray) -> Path:
    """The astronaut photo written as a JPEG file."""
    from PIL import Image

    p = tmp_path_factory.mktemp("img") / "astronaut.jpg"
    Image.fromarray(astronaut).save(p, quality=95)
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$FACEPIPE_DATA`` (default ../shared/data); tests using it skip when it is absent."""
    root = data_root(required=False)
    if root is None:
        pytest.skip("development data (FACEPIPE_DATA / ../shared/data) not available")
    return root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that reads the development data must say so (``@pytest.mark.data``), so that
    ``-m "not data"`` really leaves the data alone and docs/testing.md's list stays true."""
    unmarked = [it.nodeid for it in items
                if "shared_data" in getattr(it, "fixturenames", ()) and it.get_closest_marker("data") is None]
    if unmarked:
        raise pytest.UsageError("tests use the shared_data fixture without @pytest.mark.data: "
                                + ", ".join(unmarked[:5]))
