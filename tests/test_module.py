"""StyleTransferModule and run_transfer on the real VGG19 at 24x32 pixels: parameters,
start images, step counting, logged keys, the MAE, checkpoints and exact resumption."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stylemodule import keys
from stylemodule.config import GATYS2016, StyleConfig
from stylemodule.errors import CheckpointError, ImageError, NonFiniteLossError
from stylemodule.images import to_uint8
from stylemodule.module import StyleTransferModule, image_quality_due
from stylemodule.run import build_module, load_inputs, make_trainer, run_transfer

from conftest import next_event_file_second

# The content photo is 4:3, so size 32 gives a 32x24 image and size 48 a 48x36 one.
HEIGHT, WIDTH = 24, 32
# Run B stops after this many steps and resumes. Run A runs twice as many without a break.
RESUME_STEPS = 4
OPTIMIZERS = ("lbfgs", "adam")


def small_config(data_dir: Path, **changes: Any) -> StyleConfig:
    """Return gatys2016 at 32 pixels with every step logged, like tiny_config but usable in module fixtures."""
    settings = dict(
        size=32, steps=6, eval_every=3, image_every=3, checkpoint_every=3, log_every=1, keep_checkpoints=-1
    )
    settings.update(changes)
    return GATYS2016.replace(**settings).with_absolute_paths(data_dir)


def resume_config(data_dir: Path, optimizer: str, steps: int) -> StyleConfig:
    return small_config(
        data_dir,
        optimizer=optimizer,
        steps=steps,
        checkpoint_every=RESUME_STEPS,
        image_every=RESUME_STEPS,
        eval_every=RESUME_STEPS,
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def saved_image(run_dir: Path) -> torch.Tensor:
    return load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]["image"]


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def event_accumulator(run_dir: Path) -> EventAccumulator:
    """Load every event of the run's TensorBoard folder (size_guidance 0 turns sampling off)."""
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def image_steps(accumulator: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in accumulator.Images(tag)]


class ForwardCounter:
    """Recorder of the `layers` argument of every call to `module.extractor.forward`."""

    def __init__(self, module: StyleTransferModule) -> None:
        self.calls: list[Any] = []
        original = module.extractor.forward

        def counted(x: torch.Tensor, layers: Any = None) -> dict[str, torch.Tensor]:
            self.calls.append(None if layers is None else list(layers))
            return original(x, layers)

        # nn.Module.__call__ looks `forward` up on the instance first.
        module.extractor.forward = counted


@pytest.fixture(scope="module")
def module(data_dir: Path) -> StyleTransferModule:
    """A module built from the real images at size 32, not yet prepared."""
    return build_module(small_config(data_dir))


@pytest.fixture(scope="module")
def full_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run A of the resume tests: 2 * RESUME_STEPS steps without a break, for each optimiser."""
    folders = {}
    for optimizer in OPTIMIZERS:
        folder = tmp_path_factory.mktemp(f"full-{optimizer}")
        run_transfer(resume_config(data_dir, optimizer, 2 * RESUME_STEPS), folder, progress_bar=False)
        folders[optimizer] = folder
    return folders


# ---------------------------------------------------------------------- parameters


def test_parameters_only_image(module: StyleTransferModule) -> None:
    parameters = list(module.parameters())

    assert len(parameters) == 1
    assert parameters[0] is module.image
    assert tuple(module.image.shape) == (1, 3, HEIGHT, WIDTH)
    assert module.image.requires_grad


def test_state_dict_only_image(module: StyleTransferModule) -> None:
    module.prepare()  # registers the content and Gram targets as buffers

    assert list(module.state_dict()) == ["image"]


def test_extractor_frozen_after_train(module: StyleTransferModule) -> None:
    module.train()
    extractor = module.extractor
    extractor_parameters = list(extractor.parameters())
    module_parameter_ids = {id(parameter) for parameter in module.parameters()}

    assert module.training
    assert not extractor.training
    assert not any(submodule.training for submodule in extractor.modules())
    assert extractor_parameters
    assert not any(parameter.requires_grad for parameter in extractor_parameters)
    assert not module_parameter_ids & {id(parameter) for parameter in extractor_parameters}


# ---------------------------------------------------------------------- start image


def test_noise_init_seeded(data_dir: Path) -> None:
    config = small_config(data_dir)
    inputs = load_inputs(config)

    first = build_module(config, inputs).image.detach()
    same_seed = build_module(config, inputs).image.detach()
    other_seed = build_module(config.replace(seed=1), inputs).image.detach()

    assert torch.equal(first, same_seed)
    assert not torch.allclose(first, other_seed)


def test_content_init_is_content(data_dir: Path) -> None:
    config = small_config(data_dir, init="content")
    inputs = load_inputs(config)

    module = build_module(config, inputs)

    torch.testing.assert_close(module.generated_rgb()[0], inputs.content, atol=1e-4, rtol=0)


def test_blend_init_between_noise_and_content(data_dir: Path) -> None:
    config = small_config(data_dir)
    inputs = load_inputs(config)
    noise = build_module(config, inputs).generated_rgb()[0]

    blend = build_module(config.replace(init="blend", init_blend=0.25), inputs).generated_rgb()[0]

    torch.testing.assert_close(blend, 0.25 * inputs.content + 0.75 * noise, atol=1e-4, rtol=0)
    assert (blend - inputs.content).abs().max() > 0.05
    assert (blend - noise).abs().max() > 0.05


def test_small_files_resized_up_accepted(data_dir: Path, tmp_path: Path) -> None:
    # 12 pixels is below relu5_1's 16, but the images reach the network at 32x24 and 32x32.
    for name in ("content.png", "style.png"):
        Image.new("RGB", (12, 12), (200, 40, 40)).save(tmp_path / name)
    config = small_config(data_dir, content=str(tmp_path / "content.png"), style=str(tmp_path / "style.png"))

    inputs = load_inputs(config)

    assert inputs.content.shape == (3, 32, 32)
    assert inputs.style.shape == (3, 32, 32)


def test_small_reference_names_ssim_window(data_dir: Path, tmp_path: Path) -> None:
    Image.new("RGB", (10, 30)).save(tmp_path / "reference.png")
    config = small_config(data_dir, reference=str(tmp_path / "reference.png"))

    with pytest.raises(ImageError, match="is 10x30 pixels, but SSIM's 11x11 window needs at least 11 pixels"):
        load_inputs(config)


def test_calibration_image_too_thin_rejected(data_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "calibration"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "square.png")
    Image.new("RGB", (200, 20), (0, 90, 0)).save(folder / "strip.png")  # 32x3 at size 32
    config = small_config(data_dir, normalize=True, calibration_dir=str(folder))

    with pytest.raises(ImageError, match=f"calibration image {folder / 'strip.png'} resized to size 32 is 32x3"):
        load_inputs(config)


# ---------------------------------------------------------------------- one step, one loss evaluation


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_one_forward_per_step(data_dir: Path, tmp_path: Path, optimizer: str) -> None:
    steps = 5
    # With eval_every > steps no evaluation runs in between, although it would not run VGG19 either.
    config = small_config(data_dir, optimizer=optimizer, steps=steps, eval_every=steps + 1)
    module = build_module(config)
    counter = ForwardCounter(module)

    module.prepare()
    # The Gatys normalisation runs content and style once each, then the targets are
    # computed from content (content layers) and style (style layers).
    assert len(counter.calls) == 4
    assert counter.calls[0] is not None
    assert counter.calls[1] is not None
    assert counter.calls[2] == config.content_layers
    assert counter.calls[3] == config.style_layers

    trainer = make_trainer(config, tmp_path, progress_bar=False, checkpoints=False)
    trainer.fit(module)
    training_calls = counter.calls[4:]

    assert trainer.global_step == steps
    assert len(training_calls) == steps
    assert all(call is None for call in training_calls)


# ---------------------------------------------------------------------- L-BFGS history and logged keys


@pytest.fixture(scope="module")
def fitted(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, StyleTransferModule]:
    """An L-BFGS run of 4 steps with an evaluation and an image every 2 steps."""
    config = small_config(data_dir, steps=4, eval_every=2, image_every=2)
    module = build_module(config)
    trainer = make_trainer(config, tmp_path_factory.mktemp("fitted"), progress_bar=False)
    trainer.fit(module)
    return trainer, module


@pytest.mark.slow
def test_lbfgs_history_kept_across_steps(fitted: tuple[Any, StyleTransferModule]) -> None:
    trainer, module = fitted
    optimizer = trainer.optimizers[0]
    state = optimizer.state[module.image]

    assert isinstance(optimizer, torch.optim.LBFGS)
    assert optimizer.param_groups[0]["max_iter"] == 1
    assert state["n_iter"] == 4
    assert state["func_evals"] == 4
    assert len(state["old_dirs"]) > 1


@pytest.mark.slow
def test_logged_keys(fitted: tuple[Any, StyleTransferModule]) -> None:
    trainer, module = fitted
    metrics = trainer.callback_metrics
    expected = [keys.LOSS_TOTAL, keys.LOSS_CONTENT, keys.LOSS_STYLE, keys.METRIC_MAE, keys.METRIC_SSIM, keys.METRIC_PSNR]
    expected += [keys.style_layer_loss(layer) for layer in module.config.style_layers]

    for key in expected:
        assert key in metrics, f"{key} missing from {sorted(metrics)}"
        assert math.isfinite(float(metrics[key])), f"{key} = {metrics[key]}"
    assert keys.style_layer_loss("relu5_1") == "loss/style/relu5_1"


@pytest.mark.slow
def test_logging_cadence(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Loss terms are logged only where Lightning writes them or an evaluation reports
    # them; SSIM and PSNR only at the first evaluation from each image step and at the end.
    calls = []
    log_dict = StyleTransferModule.log_dict
    monkeypatch.setattr(
        StyleTransferModule, "log_dict", lambda self, values, **kw: (calls.append(sorted(values)), log_dict(self, values, **kw))
    )
    run_transfer(small_config(data_dir, steps=8, eval_every=2, image_every=4, log_every=3), tmp_path, progress_bar=False)
    events = event_accumulator(tmp_path)

    loss_steps = scalar_steps(events, keys.LOSS_TOTAL)
    assert len(loss_steps) == 2
    for layer in ("relu1_1", "relu5_1"):
        assert scalar_steps(events, keys.style_layer_loss(layer)) == loss_steps
    assert scalar_steps(events, keys.LOSS_CONTENT) == loss_steps
    # Training steps 2, 3, 4, 6, 8 (eval or log steps) log their terms; 1, 5 and 7 do not.
    assert sum(keys.LOSS_CONTENT in logged for logged in calls) == 5
    # 3 evaluations and the final metrics, which replace an evaluation at the last step,
    # at the steps the image had reached.
    assert scalar_steps(events, keys.METRIC_MAE) == [2, 4, 6, 8]
    for key in (keys.METRIC_SSIM, keys.METRIC_PSNR):
        assert scalar_steps(events, key) == [4, 8]
    assert image_steps(events, "image/generated") == [0, 4, 8]


@pytest.mark.slow
def test_hparams_logged_without_reference(data_dir: Path, tmp_path: Path) -> None:
    record = run_transfer(small_config(data_dir, steps=2, reference=None), tmp_path, progress_bar=False)
    events = event_accumulator(tmp_path)

    assert keys.METRIC_MAE not in record
    assert events.PluginTagToContent("hparams"), "no hparams in the TensorBoard events"
    assert scalar_steps(events, keys.LOSS_TOTAL)[-1] == 2


@pytest.mark.parametrize(
    ("eval_every", "image_every", "quality_steps"),
    [(2, 4, [4, 8, 12]), (3, 4, [6, 9, 12]), (5, 5, [5, 10]), (4, 2, [4, 8, 12])],
)
def test_image_quality_after_each_image_step(eval_every: int, image_every: int, quality_steps: list[int]) -> None:
    evaluations = range(eval_every, 13, eval_every)
    due = [step for step in evaluations if image_quality_due(step, eval_every, image_every)]
    assert due == quality_steps


@pytest.mark.slow
def test_run_uses_config_threads(data_dir: Path, tmp_path: Path) -> None:
    class ThreadCounter(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            self.count = torch.get_num_threads()

    before = torch.get_num_threads()
    counter = ThreadCounter()
    run_transfer(small_config(data_dir, steps=1, threads=before + 1), tmp_path, progress_bar=False, callbacks=[counter])

    assert counter.count == before + 1
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------- MAE


def seeded_image(seed: int, height: int, width: int) -> torch.Tensor:
    return torch.rand((3, height, width), generator=torch.Generator().manual_seed(seed))


def test_mae_same_size_is_mean_abs_difference(data_dir: Path) -> None:
    config = small_config(data_dir)
    content, style = seeded_image(1, 32, 32), seeded_image(2, 32, 32)
    reference = seeded_image(3, 32, 32)
    module = StyleTransferModule(config, content, style, reference)
    generated = module.generated_rgb()

    expected = (generated - reference.unsqueeze(0)).abs().mean().item()

    assert module.evaluate()[keys.METRIC_MAE] == pytest.approx(expected, rel=1e-6)


def test_mae_resizes_with_antialiasing(data_dir: Path) -> None:
    config = small_config(data_dir)
    content, style = seeded_image(1, 32, 32), seeded_image(2, 32, 32)
    reference = seeded_image(3, 20, 24)
    module = StyleTransferModule(config, content, style, reference)
    generated = module.generated_rgb()

    resized = F.interpolate(generated, size=(20, 24), mode="bilinear", antialias=True, align_corners=False)
    expected = (resized.clamp(0, 1) - reference.unsqueeze(0)).abs().mean().item()
    plain = F.interpolate(generated, size=(20, 24), mode="bilinear", antialias=False, align_corners=False)
    without_antialias = (plain.clamp(0, 1) - reference.unsqueeze(0)).abs().mean().item()

    mae = module.evaluate()[keys.METRIC_MAE]

    assert mae == pytest.approx(expected, rel=1e-6)
    # The two resizes give different values here, so the check above distinguishes them.
    assert mae != pytest.approx(without_antialias, rel=1e-4)


def test_evaluate_without_reference(data_dir: Path) -> None:
    config = small_config(data_dir)
    module = StyleTransferModule(config, seeded_image(1, 32, 32), seeded_image(2, 32, 32))

    assert module.evaluate() == {}


# ---------------------------------------------------------------------- exact resumption


@pytest.mark.slow
@pytest.mark.parametrize(
    ("optimizer", "checkpoint_name"),
    [("lbfgs", f"step={RESUME_STEPS:06d}.ckpt"), ("adam", "last.ckpt")],
)
def test_resume_matches_full_run(
    data_dir: Path, tmp_path: Path, full_runs: dict[str, Path], optimizer: str, checkpoint_name: str
) -> None:
    full = full_runs[optimizer]
    resumed = tmp_path / "resumed"
    run_transfer(resume_config(data_dir, optimizer, RESUME_STEPS), resumed, progress_bar=False)
    checkpoint = resumed / "checkpoints" / checkpoint_name
    assert load_checkpoint(checkpoint)["global_step"] == RESUME_STEPS

    record = run_transfer(
        resume_config(data_dir, optimizer, 2 * RESUME_STEPS), resumed, resume=checkpoint, progress_bar=False
    )

    assert record["steps"] == 2 * RESUME_STEPS
    assert load_checkpoint(resumed / "checkpoints" / "last.ckpt")["global_step"] == 2 * RESUME_STEPS
    torch.testing.assert_close(saved_image(resumed), saved_image(full), atol=1e-5, rtol=0)
    assert np.array_equal(png_pixels(resumed / "image.png"), png_pixels(full / "image.png"))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_resume_tensorboard_continuous(
    data_dir: Path, tmp_path: Path, full_runs: dict[str, Path], optimizer: str
) -> None:
    resumed = tmp_path / "resumed"
    run_transfer(resume_config(data_dir, optimizer, RESUME_STEPS), resumed, progress_bar=False)
    next_event_file_second()
    run_transfer(
        resume_config(data_dir, optimizer, 2 * RESUME_STEPS),
        resumed,
        resume=resumed / "checkpoints" / "last.ckpt",
        progress_bar=False,
    )
    # One event file per fit: final metrics written to a second file could be read first.
    assert len(list((full_runs[optimizer] / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list((resumed / "tensorboard").glob("events.out.tfevents.*"))) == 2
    full_events, resumed_events = event_accumulator(full_runs[optimizer]), event_accumulator(resumed)
    all_steps = list(range(2 * RESUME_STEPS))

    assert scalar_steps(full_events, keys.LOSS_TOTAL) == all_steps
    assert scalar_steps(resumed_events, keys.LOSS_TOTAL) == all_steps
    full_losses = [event.value for event in full_events.Scalars(keys.LOSS_TOTAL)]
    resumed_losses = [event.value for event in resumed_events.Scalars(keys.LOSS_TOTAL)]
    np.testing.assert_allclose(resumed_losses, full_losses, rtol=1e-5)
    # Evaluations go to TensorBoard at the step the image has reached, as the images do,
    # and the final metrics at the final step, not back at step 0.
    for events in (full_events, resumed_events):
        assert scalar_steps(events, keys.METRIC_MAE) == [RESUME_STEPS, 2 * RESUME_STEPS]
        mae_by_step = {event.step: event.value for event in events.Scalars(keys.METRIC_MAE)}
        full_mae_by_step = {event.step: event.value for event in full_events.Scalars(keys.METRIC_MAE)}
        assert mae_by_step == pytest.approx(full_mae_by_step, rel=1e-4)
    # The resumed run logs neither its inputs nor its restored image a second time.
    assert image_steps(resumed_events, "input/content") == [0]
    assert image_steps(resumed_events, "image/generated") == image_steps(full_events, "image/generated")
    assert image_steps(resumed_events, "image/generated") == [0, RESUME_STEPS, 2 * RESUME_STEPS]


@pytest.mark.slow
def test_resume_after_run_between_checkpoints(data_dir: Path, tmp_path: Path, full_runs: dict[str, Path]) -> None:
    # 5 steps with a checkpoint every 4, and last.ckpt must still contain step 5.
    stop = RESUME_STEPS + 1
    run_transfer(resume_config(data_dir, "lbfgs", stop), tmp_path, progress_bar=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == stop

    next_event_file_second()
    run_transfer(resume_config(data_dir, "lbfgs", 2 * RESUME_STEPS), tmp_path, resume=last, progress_bar=False)

    torch.testing.assert_close(saved_image(tmp_path), saved_image(full_runs["lbfgs"]), atol=1e-5, rtol=0)
    assert scalar_steps(event_accumulator(tmp_path), keys.LOSS_TOTAL) == list(range(2 * RESUME_STEPS))


@pytest.mark.slow
def test_resume_older_checkpoint_hides_later_steps(
    data_dir: Path, tmp_path: Path, full_runs: dict[str, Path]
) -> None:
    # A run killed at step 6 with its last checkpoint at step 4 had logged steps 4 and 5.
    run_transfer(resume_config(data_dir, "lbfgs", RESUME_STEPS + 2), tmp_path, progress_bar=False)
    next_event_file_second()
    checkpoint = tmp_path / "checkpoints" / f"step={RESUME_STEPS:06d}.ckpt"
    run_transfer(resume_config(data_dir, "lbfgs", 2 * RESUME_STEPS), tmp_path, resume=checkpoint, progress_bar=False)

    events, full_events = event_accumulator(tmp_path), event_accumulator(full_runs["lbfgs"])
    assert scalar_steps(events, keys.LOSS_TOTAL) == list(range(2 * RESUME_STEPS))
    losses = [event.value for event in events.Scalars(keys.LOSS_TOTAL)]
    full_losses = [event.value for event in full_events.Scalars(keys.LOSS_TOTAL)]
    np.testing.assert_allclose(losses, full_losses, rtol=1e-5)
    # The evaluation and the image at the restored step stay, logged again by the resumed run.
    assert scalar_steps(events, keys.METRIC_MAE) == [RESUME_STEPS, 2 * RESUME_STEPS]
    assert image_steps(events, "image/generated") == [0, RESUME_STEPS, 2 * RESUME_STEPS]


@pytest.mark.slow
def test_resume_off_schedule_logs_no_extra_point(data_dir: Path, tmp_path: Path) -> None:
    # The checkpoint at step 5 lies between evaluations (every 2) and images (every 4).
    config = small_config(data_dir, steps=7, eval_every=2, image_every=4, checkpoint_every=5)
    run_transfer(config, tmp_path, progress_bar=False)
    next_event_file_second()
    checkpoint = tmp_path / "checkpoints" / "step=000005.ckpt"
    run_transfer(config.replace(steps=8), tmp_path, resume=checkpoint, progress_bar=False)

    events = event_accumulator(tmp_path)
    assert scalar_steps(events, keys.LOSS_TOTAL) == list(range(8))
    assert scalar_steps(events, keys.METRIC_MAE) == [2, 4, 6, 8]
    assert image_steps(events, "image/generated") == [0, 4, 8]


# ---------------------------------------------------------------------- checkpoint contents


@pytest.mark.slow
def test_checkpoint_contents(data_dir: Path, full_runs: dict[str, Path]) -> None:
    checkpoint = load_checkpoint(full_runs["lbfgs"] / "checkpoints" / "last.ckpt")
    optimizer_state = checkpoint["optimizer_states"][0]["state"][0]

    assert list(checkpoint["state_dict"]) == ["image"]
    assert tuple(checkpoint["state_dict"]["image"].shape) == (1, 3, HEIGHT, WIDTH)
    assert checkpoint["global_step"] == 2 * RESUME_STEPS
    assert len(optimizer_state["old_dirs"]) > 1
    assert len(optimizer_state["old_stps"]) == len(optimizer_state["old_dirs"])
    assert checkpoint["hyper_parameters"] == resume_config(data_dir, "lbfgs", 2 * RESUME_STEPS).to_dict()


@pytest.mark.slow
def test_resume_rejects_other_size(data_dir: Path, tmp_path: Path, full_runs: dict[str, Path]) -> None:
    checkpoint = full_runs["lbfgs"] / "checkpoints" / "last.ckpt"
    output = tmp_path / "other-size"
    config = resume_config(data_dir, "lbfgs", 2 * RESUME_STEPS).replace(size=48)

    with pytest.raises(CheckpointError) as raised:
        run_transfer(config, output, resume=checkpoint, progress_bar=False)

    assert f"{WIDTH}x{HEIGHT}" in str(raised.value)
    assert "48x36" in str(raised.value)
    assert not (output / "config.yaml").exists()
    assert not (output / "tensorboard").exists()


@pytest.mark.slow
def test_resume_rejects_other_layers(data_dir: Path, tmp_path: Path, full_runs: dict[str, Path]) -> None:
    checkpoint = full_runs["lbfgs"] / "checkpoints" / "last.ckpt"
    output = tmp_path / "other-layers"
    config = resume_config(data_dir, "lbfgs", 2 * RESUME_STEPS).replace(
        style_layers=["relu1_1", "relu2_1"], style_layer_weights=[0.5, 0.5]
    )

    with pytest.raises(CheckpointError, match="style_layers") as raised:
        run_transfer(config, output, resume=checkpoint, progress_bar=False)

    assert "relu5_1" in str(raised.value)
    assert not (output / "config.yaml").exists()


@pytest.mark.slow
def test_resume_rejects_other_input_space(data_dir: Path, tmp_path: Path, full_runs: dict[str, Path]) -> None:
    checkpoint = full_runs["lbfgs"] / "checkpoints" / "last.ckpt"
    output = tmp_path / "other-space"
    config = resume_config(data_dir, "lbfgs", 2 * RESUME_STEPS).replace(preprocessing="torchvision")

    with pytest.raises(CheckpointError, match="caffe input space but this run uses torchvision"):
        run_transfer(config, output, resume=checkpoint, progress_bar=False)

    assert not (output / "config.yaml").exists()


# ---------------------------------------------------------------------- failures and stalls


@pytest.mark.slow
def test_interrupt_ends_progress_line(
    tiny_config: StyleConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Interrupter(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_transfer(tiny_config.replace(steps=6), tmp_path, callbacks=[Interrupter()])

    # The command's message after Ctrl-C then starts on a line of its own.
    error = capsys.readouterr().err
    assert "steps" in error
    assert error.endswith("\n")


@pytest.mark.slow
def test_nan_loss_keeps_last_good_state(
    tiny_config: StyleConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_step = 3
    original = StyleTransferModule.compute_losses

    def losses_nan_at_failing_step(self: StyleTransferModule, image: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = original(self, image)
        if self.global_step == failing_step:
            losses[keys.LOSS_TOTAL] = losses[keys.LOSS_TOTAL] * float("nan")
        return losses

    monkeypatch.setattr(StyleTransferModule, "compute_losses", losses_nan_at_failing_step)
    config = tiny_config.replace(steps=6, eval_every=2, image_every=2, checkpoint_every=2)

    with pytest.raises(NonFiniteLossError) as raised:
        run_transfer(config, tmp_path, progress_bar=False)

    message = str(raised.value)
    assert raised.value.step == failing_step
    assert f"at step {failing_step}" in message
    assert "image.png is from step 2" in message
    assert "last.ckpt is from step 2" in message
    assert "whose loss is not finite" not in message
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert torch.isfinite(checkpoint["state_dict"]["image"]).all()
    # image.png shows the checkpoint's image, so nothing of the failed step was written.
    postprocess = build_module(config).extractor.postprocess
    expected_pixels = to_uint8(postprocess(checkpoint["state_dict"]["image"])[0]).permute(1, 2, 0).numpy()
    assert np.array_equal(png_pixels(tmp_path / "image.png"), expected_pixels)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_diverging_adam_names_failed_state(tiny_config: StyleConfig, tmp_path: Path) -> None:
    # lr 1e30 pushes the image to about 1e30 in one step, and the loss overflows float32.
    config = tiny_config.replace(optimizer="adam", lr=1e30, steps=4, image_every=1, checkpoint_every=1)

    with pytest.raises(NonFiniteLossError) as raised:
        run_transfer(config, tmp_path, progress_bar=False)

    message = str(raised.value)
    assert raised.value.step == 1
    assert "at step 1" in message
    assert "last.ckpt is from step 1" in message
    assert "the image of step 1 is the one whose loss is not finite" in message


def constant_losses(self: StyleTransferModule, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """Return a loss that depends on the image but never changes, so its gradient is zero."""
    total = (image * 0).sum() + 5.0
    return {keys.LOSS_TOTAL: total, keys.LOSS_CONTENT: total, keys.LOSS_STYLE: total}


@pytest.mark.slow
def test_stall_stops_run(tiny_config: StyleConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(StyleTransferModule, "compute_losses", constant_losses)
    # With a checkpoint every 2 steps, only the end of training writes last.ckpt at the stall step 3.
    # Steps 1 to 3 are neither log nor evaluation steps, so no loss term is logged before the stall.
    config = tiny_config.replace(steps=20, stall_steps=2, checkpoint_every=2, log_every=10, eval_every=10)

    record = run_transfer(config, tmp_path, progress_bar=False)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # The second and third losses equal the first, which makes 2 unchanged steps.
    assert record["steps"] == 3
    assert metrics["steps"] == 3
    assert metrics["stop_reason"] == "stalled at step 3"
    assert metrics[keys.LOSS_CONTENT] == 5.0
    assert metrics[keys.LOSS_STYLE] == 5.0
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


@pytest.mark.slow
def test_resume_after_stall_clears_stop_reason(
    tiny_config: StyleConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(StyleTransferModule, "compute_losses", constant_losses)
        run_transfer(tiny_config.replace(steps=20, stall_steps=2), tmp_path, progress_bar=False)

    record = run_transfer(
        tiny_config.replace(steps=5, stall_steps=2),
        tmp_path,
        resume=tmp_path / "checkpoints" / "last.ckpt",
        progress_bar=False,
    )

    assert record["steps"] == 5
    assert record["stop_reason"] == "max steps"


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_channels_last_runs(tiny_config: StyleConfig, tmp_path: Path, optimizer: str) -> None:
    config = tiny_config.replace(channels_last=True, optimizer=optimizer, lr=1.0, steps=3)

    record = run_transfer(config, tmp_path, progress_bar=False)

    assert record["steps"] == 3
    assert record["metric/mae"] < 1.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["64-true", "bf16-mixed"])
def test_precision_runs_with_normalisation(tiny_config: StyleConfig, tmp_path: Path, precision: str) -> None:
    # The Gatys normalisation calibrates on images that the precision plugin does not convert.
    config = tiny_config.replace(precision=precision, normalize=True, steps=3)

    record = run_transfer(config, tmp_path, progress_bar=False)

    assert record["steps"] == 3
    assert 0 < record["metric/mae"] < 1.0
