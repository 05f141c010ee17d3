"""`stylemodule transfer` through `main(argv)` at 32 pixels: output files, TensorBoard
contents, re-runs from config.yaml, --overwrite, --resume, presets and bad input."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stylemodule import keys
from stylemodule.cli import EXIT_BAD_INPUT, main

from conftest import next_event_file_second

STEPS = 4


def resume_args(run_dir: Path, output: Path, data_dir: Path, *extra: str) -> list[str]:
    """Return the command that resumes `run_dir`'s last checkpoint into `output`."""
    return [
        "transfer", "--resume", str(run_dir / "checkpoints" / "last.ckpt"), *extra,
        "--output", str(output), "--no-progress", "--data-dir", str(data_dir),
    ]  # fmt: skip


def transfer_args(output: Path, data_dir: Path, *extra: str) -> list[str]:
    """Return the gatys2016 transfer command at 32 pixels for STEPS steps, without a progress bar."""
    return [
        "transfer",
        "--preset", "gatys2016",
        "--size", "32",
        "--steps", str(STEPS),
        "--eval-every", "2",
        "--image-every", "2",
        "--checkpoint-every", "2",
        "--output", str(output),
        "--no-progress",
        "--data-dir", str(data_dir),
        *extra,
    ]  # fmt: skip


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def event_accumulator(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


@pytest.fixture(scope="module")
def run_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished transfer run. Tests that change a run work on a copy."""
    output = tmp_path_factory.mktemp("transfer") / "run"
    exit_code = main(transfer_args(output, data_dir))
    assert exit_code == 0
    return output


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """Copy a finished run to tmp_path/run, so that a test can change it."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# ---------------------------------------------------------------------- outputs


@pytest.mark.slow
def test_transfer_writes_outputs(run_dir: Path) -> None:
    assert (run_dir / "image.png").is_file()
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "metrics.json").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == STEPS
    assert metrics["stop_reason"] == "max steps"
    assert 0 < metrics[keys.METRIC_MAE] < 1
    assert math.isfinite(metrics["final_loss"])
    assert metrics[keys.LOSS_TOTAL] == metrics["final_loss"]
    assert metrics[keys.LOSS_CONTENT] > 0
    assert metrics[keys.LOSS_STYLE] > 0
    assert png_pixels(run_dir / "image.png").shape == (24, 32, 3)


@pytest.mark.slow
def test_transfer_tensorboard_tags(run_dir: Path) -> None:
    tags = event_accumulator(run_dir).Tags()

    for scalar in (keys.LOSS_TOTAL, keys.LOSS_CONTENT, keys.LOSS_STYLE, keys.METRIC_MAE):
        assert scalar in tags["scalars"], f"{scalar} missing from {tags['scalars']}"
    for image in ("input/content", "input/style", "input/reference", "image/generated"):
        assert image in tags["images"], f"{image} missing from {tags['images']}"


@pytest.mark.slow
def test_transfer_hparams_saved(run_dir: Path) -> None:
    hparams = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["size"] == 32
    assert hparams["optimizer"] == "lbfgs"
    assert event_accumulator(run_dir).PluginTagToContent("hparams")


@pytest.mark.slow
def test_last_tensorboard_image_is_png(run_dir: Path) -> None:
    events = event_accumulator(run_dir).Images("image/generated")
    last = max(events, key=lambda event: event.step)

    with Image.open(io.BytesIO(last.encoded_image_string)) as logged:
        logged_pixels = np.asarray(logged.convert("RGB"))

    assert last.step == STEPS
    assert np.array_equal(logged_pixels, png_pixels(run_dir / "image.png"))


# ---------------------------------------------------------------------- config.yaml, --overwrite, --resume


@pytest.mark.slow
def test_config_yaml_reproduces_image(run_dir: Path, tmp_path: Path, data_dir: Path) -> None:
    output = tmp_path / "again"

    exit_code = main(
        ["transfer", "--config", str(run_dir / "config.yaml"), "--output", str(output), "--no-progress",
         "--data-dir", str(data_dir)]
    )  # fmt: skip

    assert exit_code == 0
    assert np.array_equal(png_pixels(output / "image.png"), png_pixels(run_dir / "image.png"))


@pytest.mark.slow
def test_existing_output_needs_overwrite(
    run_dir: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = copy_run(run_dir, tmp_path)
    stale = output / "checkpoints" / "step=000099.ckpt"
    stale.write_bytes(b"left by an older run")

    exit_code = main(transfer_args(output, data_dir))

    assert exit_code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "--overwrite" in error
    assert str(output) in error
    assert stale.exists()

    # --overwrite removes the old run only once the new run's inputs have passed their checks.
    exit_code = main(transfer_args(output, data_dir, "--overwrite", "--content", "missing-photo.jpg"))

    assert exit_code == EXIT_BAD_INPUT
    assert stale.exists()
    assert (output / "image.png").exists()

    exit_code = main(transfer_args(output, data_dir, "--overwrite"))

    assert exit_code == 0
    assert not stale.exists()
    assert checkpoint_step(output / "checkpoints" / "last.ckpt") == STEPS


@pytest.mark.slow
def test_resume_continues_in_same_folder(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run of its own, not a copy: resuming in a moved checkpoint folder makes Lightning 2.6
    # warn that the folder changed, and pytest turns warnings into errors.
    output = tmp_path / "run"
    assert main(transfer_args(output, data_dir, "--log-every", "1")) == 0
    monkeypatch.chdir(tmp_path)  # a wrong default --output would land here
    next_event_file_second()

    exit_code = main(
        ["transfer", "--resume", str(output / "checkpoints" / "last.ckpt"), "--steps", "6", "--no-progress",
         "--data-dir", str(data_dir)]
    )  # fmt: skip

    assert exit_code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert checkpoint_step(output / "checkpoints" / "last.ckpt") == 6
    assert not (tmp_path / "outputs").exists()
    loss_steps = [event.step for event in event_accumulator(output).Scalars(keys.LOSS_TOTAL)]
    assert loss_steps == list(range(6))


@pytest.mark.slow
def test_tutorial_preset_with_caffe_weights(tmp_path: Path, data_dir: Path) -> None:
    output = tmp_path / "tutorial"

    exit_code = main(
        ["transfer", "--preset", "tutorial", "--weights", "caffe", "--size", "32", "--steps", "3",
         "--output", str(output), "--no-progress", "--data-dir", str(data_dir)]
    )  # fmt: skip

    assert exit_code == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["steps"] == 3
    config_text = (output / "config.yaml").read_text()
    assert "optimizer: adam" in config_text
    assert "init: content" in config_text
    assert "weights: caffe" in config_text


@pytest.mark.slow
def test_nonfinite_loss_exits_1(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # lr 1e30 overflows the loss in one Adam step: a failure after work started, not bad input.
    output = tmp_path / "diverged"
    exit_code = main(transfer_args(output, data_dir, "--optimizer", "adam", "--lr", "1e30"))

    assert exit_code == 1
    assert "loss became" in capsys.readouterr().err
    assert not (output / "metrics.json").exists()  # written only by a finished run


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--preset", "nope"], ["unknown preset 'nope'", "gatys2016"]),
        (["--style-layers", "relu9_1"], ["relu9_1", "style_layers"]),
        (["--content-weight", "0"], ["content_weight", "0"]),
        (["--size", "8"], ["size 8", "relu5_1", "at least 16 pixels"]),
        (["--exact-size", "10x12"], ["exact_size 10x12 is too small", "use exact_size 16x16 or more"]),
        (["--content", "missing-photo.jpg"], ["content image not found", "missing-photo.jpg"]),
    ],
    ids=["preset", "layer", "content-weight", "size", "exact-size", "content-file"],
)
def test_bad_input_exit_code(
    options: list[str],
    expected: list[str],
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "run"

    exit_code = main(transfer_args(output, data_dir, *options))

    assert exit_code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert error.startswith("stylemodule transfer: error: ")
    for text in expected:
        assert text in error
    assert not (output / "image.png").exists()


def test_unknown_config_key(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text("size: 32\ncolour: red\n")

    exit_code = main(transfer_args(tmp_path / "run", data_dir, "--config", str(config_file)))

    assert exit_code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "colour" in error
    assert str(config_file) in error


@pytest.mark.slow
@pytest.mark.parametrize("steps", [[], ["--steps", "8"]], ids=["checkpoint-steps", "more-steps"])
def test_resume_other_size_rejected(
    run_dir: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], steps: list[str]
) -> None:
    output = tmp_path / "bigger"

    exit_code = main(resume_args(run_dir, output, data_dir, "--size", "48", *steps))

    # The size mismatch is named first: asking for more steps would not fix it.
    assert exit_code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert "contains a 32x24 image but these settings give 48x36" in error
    assert "--steps" not in error
    assert not (output / "config.yaml").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lr", "0.01"], "lr=0.01, which a resumed run cannot change"),
        (["--seed", "5"], "seed=5, which a resumed run cannot change"),
        (["--optimizer", "adam"], "optimizer=adam"),
        (["--no-normalize"], "normalize=False"),
        (["--preset", "tutorial"], "--preset tutorial does not apply with --resume"),
        (["--style", "Van_Gogh_Starry_Night_970.jpg"], "style image Van_Gogh_Starry_Night_gatys_paper_004.jpg but"),
    ],
    ids=["lr", "seed", "optimizer", "normalize", "preset", "style"],
)
def test_resume_fixed_setting_rejected(
    run_dir: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    # These settings would be ignored: the optimiser state and the image come from the checkpoint.
    output = tmp_path / "resumed"
    exit_code = main(resume_args(run_dir, output, data_dir, "--steps", "8", *options))

    assert exit_code == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not output.exists()


@pytest.mark.slow
def test_resume_same_size_other_spelling(tmp_path: Path, data_dir: Path) -> None:
    # --exact-size 32x24 gives the checkpoint's 32x24 image, so the run continues. (A run of
    # its own: Lightning warns when a run resumes into another checkpoint folder.)
    output = tmp_path / "run"
    assert main(transfer_args(output, data_dir)) == 0

    exit_code = main(
        ["transfer", "--resume", str(output), "--steps", "6", "--exact-size", "32x24", "--no-progress",
         "--data-dir", str(data_dir)]
    )  # fmt: skip

    assert exit_code == 0
    assert json.loads((output / "metrics.json").read_text())["steps"] == 6


@pytest.mark.slow
def test_resume_loose_checkpoint_needs_output(
    run_dir: Path, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loose = tmp_path / "saved" / "my.ckpt"
    loose.parent.mkdir()
    shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", loose)

    exit_code = main(["transfer", "--resume", str(loose), "--steps", "6", "--no-progress", "--data-dir", str(data_dir)])

    assert exit_code == EXIT_BAD_INPUT
    assert "pass --output for the resumed run" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["saved"]
    assert sorted(path.name for path in loose.parent.iterdir()) == ["my.ckpt"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "is empty"),
        ({"state_dict": {"image": torch.zeros(1, 3, 24, 32)}, "global_step": 1}, "is not a checkpoint written by stylemodule"),
        (b"not a checkpoint", "cannot read checkpoint"),
        ({"code": os.getcwd}, "cannot read checkpoint"),
    ],
    ids=["empty", "hand-made", "other-file", "pickled-code"],
)
def test_resume_foreign_checkpoint_rejected(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], content: object, message: str
) -> None:
    path = tmp_path / "foreign.ckpt"
    if content is None:
        path.write_bytes(b"")
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    output = tmp_path / "out"

    exit_code = main(["transfer", "--resume", str(path), "--output", str(output), "--no-progress", "--data-dir", str(data_dir)])

    assert exit_code == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert message in error
    assert "weights_only" not in error  # torch's advice to load with weights_only=False
    assert not output.exists()


# ---------------------------------------------------------------------- progress bar


@pytest.mark.slow
def test_progress_bar_shows_steps_and_loss(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [arg for arg in transfer_args(tmp_path / "run", data_dir) if arg != "--no-progress"]

    exit_code = main(args)

    assert exit_code == 0
    error = capsys.readouterr().err
    assert "steps" in error
    assert f"{STEPS}/{STEPS}" in error
    assert f"{keys.LOSS_TOTAL}=" in error
