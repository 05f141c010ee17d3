"""Shared fixtures: the real reference images and small configs that run in seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from stylemodule.config import GATYS2016, StyleConfig
from stylemodule.data import DATA_ENV, resolve_data_dir

CONTENT = "Tuebingen_Neckarfront_gatys_paper_002.jpg"
STYLE = "Van_Gogh_Starry_Night_gatys_paper_004.jpg"
REFERENCE = "Van_Gogh_true_target_gatys_paper_021.jpg"


def next_event_file_second() -> None:
    """Sleep until the clock's second changes before a second fit in the same process.

    TensorBoard reads a folder's event files in name order. A name starts with the second
    the file was opened, then the process id and a per-process counter, so two fits in
    one process within one second can sort wrongly (counter 10 before 9). A command line
    run fits once per process and never meets this.
    """
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked gpu on a machine without a CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder of the real reference images (STYLEMODULE_DATA, as .ci/run sets it)."""
    folder = resolve_data_dir()
    missing = [name for name in (CONTENT, STYLE, REFERENCE) if not (folder / name).is_file()]
    if missing:
        pytest.fail(
            f"reference images {missing} not found in {folder}; set {DATA_ENV} to the folder "
            "holding them or run `stylemodule data fetch`"
        )
    return folder


@pytest.fixture
def tiny_config(data_dir: Path) -> StyleConfig:
    """gatys2016 at 32 pixels for a few steps: seconds on a CPU."""
    return GATYS2016.replace(
        size=32, steps=6, eval_every=3, image_every=3, checkpoint_every=3, log_every=1, keep_checkpoints=-1
    ).with_absolute_paths(data_dir)


@pytest.fixture(autouse=True)
def _quiet_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ray and Lightning read these; keep test runs offline and free of usage reporting.
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("PL_DISABLE_FORK", os.environ.get("PL_DISABLE_FORK", "1"))
