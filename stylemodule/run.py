"""One style transfer run: load the inputs, build the module and the Trainer, fit, and
write the results. The command line and every Ray Tune trial go through `run_transfer`.

An output folder holds:
    image.png            the generated image (rewritten at every image log)
    config.yaml          the resolved config; `stylemodule transfer --config` re-runs it
    metrics.json         final metrics and loss terms, steps run and the stop reason
    tensorboard/         TensorBoard event files and hparams
    checkpoints/         last.ckpt and the latest step checkpoints
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

from stylemodule import keys
from stylemodule.callbacks import (
    AtomicCheckpointIO,
    FinalMetrics,
    ImageLogger,
    RestoredStepLogger,
    RunCheckpoint,
    StallMonitor,
    StepProgressBar,
)
from stylemodule.config import StyleConfig, save_yaml
from stylemodule.errors import CheckpointError, ConfigError, ImageError, NonFiniteLossError
from stylemodule.files import atomic_write_text
from stylemodule.images import load_image, resize_exact, resize_long_edge, save_png, style_shape
from stylemodule.module import StyleTransferModule, check_checkpoint_matches
from stylemodule.vgg import deepest_layer, min_input_side

log = logging.getLogger(__name__)

IMAGE_FILE = "image.png"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
SSIM_MIN_SIDE = 11  # the side of the Gaussian window of torchmetrics' SSIM, in pixels


@dataclasses.dataclass
class Inputs:
    """RGB images in [0, 1], (3, H, W): content and style at the generation size."""

    content: torch.Tensor
    style: torch.Tensor
    reference: torch.Tensor | None
    calibration: list[torch.Tensor] | None


def load_inputs(config: StyleConfig) -> Inputs:
    """Load, validate and resize the images a config names (paths must be resolved)."""
    # The side limit applies to the images as resized, not to the files: a small file can
    # be resized up to `size`.
    min_side = min_input_side(config.loss_layers)
    load = dict(max_pixels=config.max_pixels)

    content = load_image(config.content, role="content", **load)
    if config.exact_shape:
        content = resize_exact(content, config.exact_shape)
    else:
        content = resize_long_edge(content, config.size)
    height, width = content.shape[-2:]
    if min(height, width) < min_side:
        layer = deepest_layer(config.loss_layers)
        if config.exact_shape:
            raise ConfigError(
                f"exact_size {config.exact_size} is too small: {layer} needs an image of at least "
                f"{min_side} pixels on each side; use exact_size {max(width, min_side)}x{max(height, min_side)} or more"
            )
        needed = math.ceil(min_side * max(height, width) / min(height, width))
        raise ConfigError(
            f"size {config.size} gives a {width}x{height} image, but {layer} needs an image of at "
            f"least {min_side} pixels on each side; use size {needed} or more"
        )

    style = load_image(config.style, role="style", **load)
    shape = style_shape(tuple(style.shape[-2:]), (height, width), config.style_size)
    if min(shape) < min_side:
        # Only style_size area keeps the painting's aspect, so only a very long painting gets here.
        raise ConfigError(
            f"style image {config.style} resized to the content's area is {shape[1]}x{shape[0]}, but "
            f"{deepest_layer(config.loss_layers)} needs at least {min_side} pixels on each side; "
            "use style_size content, a larger size, or crop the style image"
        )
    style = resize_exact(style, shape)

    reference = None
    if config.reference:
        reference = load_image(config.reference, role="reference", **load)
        if min(reference.shape[-2:]) < SSIM_MIN_SIDE:
            raise ImageError(
                f"reference image {config.reference} is {reference.shape[-1]}x{reference.shape[-2]} pixels, but "
                f"SSIM's {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} window needs at least {SSIM_MIN_SIDE} pixels on each side; "
                "use a larger reference image"
            )

    calibration = None
    if config.normalize and config.calibration_dir:
        folder = Path(config.calibration_dir)
        if not folder.is_dir():
            raise ImageError(f"calibration folder not found: {folder}; give a folder of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(
                f"calibration folder {folder} contains no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        calibration = []
        for path in files:
            image = resize_long_edge(load_image(path, role="calibration", **load), config.size)
            if min(image.shape[-2:]) < min_side:
                raise ImageError(
                    f"calibration image {path} resized to size {config.size} is {image.shape[-1]}x{image.shape[-2]}, "
                    f"but {deepest_layer(config.loss_layers)} needs at least {min_side} pixels on each side; "
                    "remove it from the folder or use a larger size"
                )
            calibration.append(image)
    return Inputs(content, style, reference, calibration)


def build_module(config: StyleConfig, inputs: Inputs | None = None) -> StyleTransferModule:
    inputs = inputs or load_inputs(config)
    return StyleTransferModule(config, inputs.content, inputs.style, inputs.reference, inputs.calibration)


def make_trainer(
    config: StyleConfig,
    output_dir: str | Path,
    *,
    callbacks: Sequence[Callback] = (),
    progress_bar: bool = True,
    checkpoints: bool = True,
    accelerator: str | None = None,
    resume_step: int | None = None,
) -> pl.Trainer:
    """Build a Trainer where one step is one loss evaluation and evaluation runs every `eval_every` steps.

    `resume_step` is the step of the checkpoint that the run resumes from. TensorBoard
    then hides what earlier runs logged from that step on (see RestoredStepLogger).
    """
    output_dir = Path(output_dir)
    all_callbacks: list[Callback] = [
        ImageLogger(config.image_every, output_dir / IMAGE_FILE),
        StallMonitor(config.stall_steps),
        FinalMetrics(),
        *callbacks,
    ]
    if checkpoints:
        all_callbacks.append(
            RunCheckpoint(
                dirpath=output_dir / CHECKPOINT_DIR,
                filename="step={step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=config.checkpoint_every,
                save_last=True,
                # "step" is always among ModelCheckpoint's monitor candidates: keep the latest.
                monitor="step",
                mode="max",
                save_top_k=config.keep_checkpoints,
                save_on_train_epoch_end=False,
                # Overwrite last.ckpt on resume. A step checkpoint written before the first
                # last.ckpt does not record that file, so Lightning would write last-v1.ckpt.
                enable_version_counter=False,
            )
        )
    if progress_bar:
        all_callbacks.append(StepProgressBar())

    # Lightning's start-up notes (accelerators, tips) are noise next to the progress bar;
    # its package sets its own level on import, so this comes after the import.
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    return pl.Trainer(
        default_root_dir=output_dir,
        max_steps=config.steps,
        max_epochs=-1,
        accelerator=accelerator or config.accelerator,
        devices=1,
        precision=config.precision,
        logger=TensorBoardLogger(
            output_dir, name="", version=TENSORBOARD_DIR, default_hp_metric=False, purge_step=resume_step
        ),
        callbacks=all_callbacks,
        val_check_interval=config.eval_every,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        # A run shorter than log_every would otherwise write no losses to TensorBoard.
        log_every_n_steps=min(config.log_every, config.steps),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        enable_checkpointing=checkpoints,
        plugins=[AtomicCheckpointIO()],
    )


# Entries of a Lightning checkpoint that a resumed run reads.
CHECKPOINT_KEYS = ("pytorch-lightning_version", "global_step", "state_dict", "hyper_parameters")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True), or raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}; give a .ckpt file from a run's checkpoints folder")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty; give a .ckpt file from a run's checkpoints folder")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files before it rejects them.
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign or damaged file raises many types
        # torch's own message suggests weights_only=False, which would run code from the
        # file, so only the exception type is passed on.
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint of tensors and plain "
            f"values ({type(error).__name__}); give a .ckpt file from a run's checkpoints folder"
        ) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint written by stylemodule (it has no {', '.join(missing)}); "
            "give a .ckpt file from a run's checkpoints folder"
        )
    return checkpoint


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    for callback in trainer.callbacks:
        if isinstance(callback, FinalMetrics):
            return callback.metrics
    return {}


def check_resume(checkpoint: dict[str, Any], config: StyleConfig, image_shape: Sequence[int], path: Path) -> None:
    """Raise CheckpointError unless `config` can continue the checkpoint at `path`."""
    check_checkpoint_matches(checkpoint, config, image_shape, source=f"checkpoint {path}")
    done = checkpoint["global_step"]
    if config.steps <= done:
        raise CheckpointError(
            f"checkpoint {path} is already at step {done}; set steps (--steps) above {done} to continue it"
        )


def stall_step(trainer: pl.Trainer) -> int | None:
    for callback in trainer.callbacks:
        if isinstance(callback, StallMonitor):
            return callback.stalled_at
    return None


def describe_saved_state(trainer: pl.Trainer, failed_step: int) -> str:
    """Return a message part naming the steps of image.png and last.ckpt after a failure.

    Both are written after an update and before the next loss evaluation, so either may
    contain the very image whose loss was not finite at `failed_step`.
    """
    steps = []
    for callback in trainer.callbacks:
        if isinstance(callback, ImageLogger) and callback.png_path is not None and callback.png_step >= 0:
            steps.append((callback.png_path, callback.png_step))
        if isinstance(callback, RunCheckpoint) and callback.saved_step is not None and callback.last_model_path:
            steps.append((Path(callback.last_model_path), callback.saved_step))
    text = "".join(f"{path} is from step {step}; " for path, step in steps)
    if any(step == failed_step for _, step in steps):
        text += f"the image of step {failed_step} is the one whose loss is not finite; "
    return text


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` torch CPU threads; 0 keeps the current number."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_transfer(
    config: StyleConfig,
    output_dir: str | Path,
    *,
    resume: str | Path | None = None,
    progress_bar: bool = True,
    callbacks: Sequence[Callback] = (),
    module: StyleTransferModule | None = None,
    checkpoints: bool = True,
    accelerator: str | None = None,
) -> dict[str, Any]:
    """Fit one style transfer run and write its results; returns the metrics record.

    `module` is the config's module when the caller has built it already, and
    `accelerator` replaces the config's for this run only.
    `checkpoints=False` leaves out the checkpoints/ folder, for callers such as Ray Tune
    trials that save their own.
    """
    output_dir = Path(output_dir)
    with torch_threads(config.threads):
        module = module or build_module(config)
        resume_step = None
        if resume is not None:
            checkpoint = read_checkpoint(resume)
            check_resume(checkpoint, config, module.image.shape, resume)
            resume_step = checkpoint["global_step"]
            earlier = StyleConfig.from_dict(checkpoint["hyper_parameters"])
            callbacks = [*callbacks, RestoredStepLogger(earlier.eval_every, earlier.image_every, earlier.steps)]
        output_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, output_dir / CONFIG_FILE)

        trainer = make_trainer(
            config,
            output_dir,
            callbacks=callbacks,
            progress_bar=progress_bar,
            checkpoints=checkpoints,
            accelerator=accelerator,
            resume_step=resume_step,
        )
        try:
            with warnings.catch_warnings():
                if resume is not None:
                    # A resumed run writes into its own checkpoint folder, which is not empty. One
                    # resumed into another --output starts that folder's list of kept checkpoints anew.
                    warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
                    warnings.filterwarnings("ignore", message="The dirpath has changed from")
                trainer.fit(module, ckpt_path=str(resume) if resume is not None else None, weights_only=True)
        except SystemExit:
            # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1).
            if trainer.interrupted:
                raise KeyboardInterrupt from None
            raise
        except NonFiniteLossError as error:
            saved = describe_saved_state(trainer, error.step)
            error.args = (f"{error}; {saved}lower the learning rate or the loss weights",)
            raise

        return finish_run(trainer, module, output_dir)


def finish_run(trainer: pl.Trainer, module: StyleTransferModule, output_dir: Path) -> dict[str, Any]:
    """Write the final image and metrics.json with the final metrics (FinalMetrics has
    logged them to TensorBoard)."""
    save_png(module.generated_rgb()[0].cpu(), output_dir / IMAGE_FILE)
    metrics = final_metrics(trainer)
    stalled = stall_step(trainer)
    # The loss terms of the last step this run took, because a stall can stop it between logged steps.
    losses = {key: float(value) for key, value in module.last_terms.items()}
    if module.last_loss is not None:
        losses[keys.LOSS_TOTAL] = module.last_loss
    record = {
        "steps": trainer.global_step,
        "stop_reason": f"stalled at step {stalled}" if stalled is not None else "max steps",
        "final_loss": module.last_loss,
        **losses,
        **metrics,
    }
    atomic_write_text(output_dir / METRICS_FILE, json.dumps(record, indent=2) + "\n")
    return record
