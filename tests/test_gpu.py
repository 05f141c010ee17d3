"""The CUDA path: a tiny transfer on the GPU agrees with the CPU, bf16-mixed runs, and a
search gives each trial a share of the GPU. Skipped without a CUDA device.

NOTE: these tests have not run yet, because no machine with a GPU was available.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stylemodule import keys
from stylemodule.cli import main
from stylemodule.config import StyleConfig
from stylemodule.run import run_transfer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_transfer_on_gpu_matches_cpu(tiny_config: StyleConfig, tmp_path: Path) -> None:
    cpu = run_transfer(tiny_config.replace(accelerator="cpu"), tmp_path / "cpu", progress_bar=False)
    gpu = run_transfer(tiny_config.replace(accelerator="gpu"), tmp_path / "gpu", progress_bar=False)

    assert cpu["steps"] == tiny_config.steps
    assert gpu["steps"] == tiny_config.steps
    # The same seeded start; float32 kernels differ between devices, so the MAE agrees only roughly.
    assert gpu[keys.METRIC_MAE] == pytest.approx(cpu[keys.METRIC_MAE], abs=0.01)


def test_bf16_mixed_on_gpu(tiny_config: StyleConfig, tmp_path: Path) -> None:
    config = tiny_config.replace(accelerator="gpu", precision="bf16-mixed", optimizer="adam", lr=5.0)

    record = run_transfer(config, tmp_path, progress_bar=False)

    assert math.isfinite(record[keys.METRIC_MAE])
    assert (tmp_path / "image.png").is_file()


def test_search_with_gpu_share(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    code = main([
        "search", "--space", "paper", "--samples", "2", "--size", "32", "--steps", "6", "--eval-every", "3",
        "--grace-period", "3", "--gpus-per-trial", "0.5", "--accelerator", "gpu",
        "--output", str(experiment), "--data-dir", str(data_dir),
    ])  # fmt: skip

    assert code == 0
    assert len(list(experiment.glob("trial_*/metrics.json"))) >= 1
