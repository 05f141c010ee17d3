"""Crashes: runs and trials killed with SIGKILL resume without losing work; files are
never left half written."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylemodule import files
from stylemodule.cli import main

TRANSFER = ["transfer", "--preset", "gatys2016", "--size", "48", "--eval-every", "4",
            "--image-every", "4", "--checkpoint-every", "4", "--log-every", "1", "--no-progress"]


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def wait_for(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(message)


def interrupt_when(
    command: list[str], ready: Callable[[subprocess.Popen], bool], timeout: float, message: str
) -> tuple[int, str]:
    """Start `command`, send it SIGINT once `ready(process)` is true, and return its exit code and stderr."""
    # A shell starts background jobs with SIGINT ignored, and a child inherits that, so
    # the command gets the default disposition back, under which Python raises KeyboardInterrupt.
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        wait_for(lambda: ready(process), timeout, message)
        process.send_signal(signal.SIGINT)
        _, error = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, error


def test_atomic_write_keeps_old_file_on_crash(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with files.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_copytree_copies_whole_folder(tmp_path: Path) -> None:
    source = tmp_path / "checkpoint_000003"
    (source / "nested").mkdir(parents=True)
    (source / "state.ckpt").write_bytes(b"weights")
    (source / "nested" / "extra.json").write_text("{}")
    destination = tmp_path / "checkpoint_000002"

    files.atomic_copytree(source, destination)

    assert (destination / "state.ckpt").read_bytes() == b"weights"
    assert (destination / "nested" / "extra.json").read_text() == "{}"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint_000002", "checkpoint_000003"]


def test_atomic_copytree_leaves_nothing_on_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "checkpoint_000003"
    source.mkdir()
    for name in ("a.ckpt", "b.ckpt"):
        (source / name).write_bytes(b"x")
    copied = []
    copyfile = shutil.copyfile

    def copy_then_crash(src: str, dst: str, **kwargs: object) -> None:
        if copied:
            raise OSError("disk full")
        copied.append(copyfile(src, dst, **kwargs))

    monkeypatch.setattr(shutil, "copyfile", copy_then_crash)
    with pytest.raises(shutil.Error, match="disk full"):
        files.atomic_copytree(source, tmp_path / "checkpoint_000002")

    assert copied, "the copy never started"
    assert list(tmp_path.iterdir()) == [source]


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "config.yaml"
    files.atomic_write_text(target, "new: 1\n")
    assert target.read_text() == "new: 1\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.slow
def test_transfer_killed_then_resumed_matches(tmp_path: Path, data_dir: Path) -> None:
    steps = "16"
    reference = tmp_path / "uninterrupted"
    assert main([*TRANSFER, "--steps", steps, "--output", str(reference), "--data-dir", str(data_dir)]) == 0

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "stylemodule.cli", *TRANSFER, "--steps", steps,
               "--output", str(killed), "--data-dir", str(data_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (killed / "checkpoints" / "step=000008.ckpt").exists(), 120,
                 "the run wrote no step-8 checkpoint within 120 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it was killed"
    # No temporary file survives as a checkpoint.
    assert all(not name.name.startswith(".") for name in (killed / "checkpoints").iterdir())

    assert main([*TRANSFER[:1], "--resume", str(killed), "--no-progress", "--data-dir", str(data_dir)]) == 0
    assert np.abs(png_pixels(killed / "image.png") - png_pixels(reference / "image.png")).max() <= 1
    resumed = json.loads((killed / "metrics.json").read_text())
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    assert resumed["steps"] == 16
    assert resumed["metric/mae"] == pytest.approx(uninterrupted["metric/mae"], abs=1e-5)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(killed / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = [event.step for event in accumulator.Scalars("loss/total")]
    assert logged == list(range(16)), "the TensorBoard curve has a gap or a repeated step"


@pytest.mark.slow
def test_transfer_interrupted_saves_last_step(tmp_path: Path, data_dir: Path) -> None:
    # Ctrl-C comes after the image of step 4 or 8 and long before step 40.
    steps = "40"
    reference = tmp_path / "uninterrupted"
    assert main([*TRANSFER, "--steps", steps, "--output", str(reference), "--data-dir", str(data_dir)]) == 0

    # No periodic checkpoint before step 100: only the one saved on Ctrl-C can resume it.
    interrupted = tmp_path / "interrupted"
    command = [sys.executable, "-m", "stylemodule.cli", *TRANSFER, "--steps", steps, "--checkpoint-every", "100",
               "--output", str(interrupted), "--data-dir", str(data_dir)]
    image = interrupted / "image.png"
    first_write: list[int] = []

    def image_rewritten(process: subprocess.Popen) -> bool:
        """Return whether image.png has changed since first seen: a step of 4 or more has finished."""
        if not image.exists():
            return False
        stamp = image.stat().st_mtime_ns
        first_write[:] = first_write or [stamp]
        return stamp != first_write[0]

    returncode, error = interrupt_when(command, image_rewritten, 120, "the run wrote no image after step 0 within 120 s")
    assert returncode == 130
    assert f"stylemodule transfer --resume {interrupted}" in error
    assert not (interrupted / "metrics.json").exists(), "the run finished before it was interrupted"
    assert (interrupted / "checkpoints" / "last.ckpt").is_file()

    assert main([*TRANSFER[:1], "--resume", str(interrupted), "--no-progress", "--data-dir", str(data_dir)]) == 0
    assert np.abs(png_pixels(interrupted / "image.png") - png_pixels(reference / "image.png")).max() <= 1
    resumed = json.loads((interrupted / "metrics.json").read_text())
    uninterrupted = json.loads((reference / "metrics.json").read_text())
    assert resumed["metric/mae"] == pytest.approx(uninterrupted["metric/mae"], abs=1e-5)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/<pid>/maps (Linux)")
def test_interrupt_during_start_up(tmp_path: Path, data_dir: Path) -> None:
    command = [sys.executable, "-m", "stylemodule", *TRANSFER, "--steps", "40",
               "--output", str(tmp_path / "run"), "--data-dir", str(data_dir)]
    # `import torch` maps libtorch early and then runs for about two more seconds.
    returncode, error = interrupt_when(
        command,
        lambda process: "libtorch" in Path(f"/proc/{process.pid}/maps").read_text(),
        60,
        "the command did not load torch within 60 s",
    )
    assert returncode == 130
    assert "Traceback" not in error
    assert "interrupted" in error


def run_search_killing_trial(experiment: Path, data_dir: Path, max_failures: int) -> int:
    """Run a one-trial search, SIGKILL its worker after the report at step 6, return the exit code."""
    command = [sys.executable, "-m", "stylemodule.cli", "search", "--space", "paper", "--samples", "1",
               "--size", "32", "--steps", "30", "--eval-every", "3", "--checkpoint-every", "3", "--scheduler", "fifo",
               "--max-failures", str(max_failures), "--output", str(experiment), "--data-dir", str(data_dir)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def first_report() -> list[dict]:
            results = list(experiment.glob("trial_*/result.json"))
            if not results or not results[0].read_text().strip():
                return []
            return [json.loads(line) for line in results[0].read_text().splitlines() if line.strip()]

        wait_for(lambda: any(row["step"] >= 6 for row in first_report()), 180, "no report at step 6 within 180 s")
        # The worker process dies as if its machine failed; Tune restarts the trial if retries are left.
        os.kill(first_report()[-1]["pid"], signal.SIGKILL)
        return driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


@pytest.mark.slow
def test_killed_trial_is_retried_from_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    assert run_search_killing_trial(experiment, data_dir, max_failures=2) == 0

    (trial,) = experiment.glob("trial_*")
    steps = [json.loads(line)["step"] for line in (trial / "result.json").read_text().splitlines() if line.strip()]
    assert steps[-1] == 30
    assert steps.count(3) == 1, f"the trial restarted from scratch: {steps}"
    table = (experiment / "results.csv").read_text()
    assert "retried" in table


@pytest.mark.slow
def test_trial_out_of_retries_exits_1(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    assert run_search_killing_trial(experiment, data_dir, max_failures=0) == 1

    with open(experiment / "results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert "error" in row["stop_reason"]
