"""Lightning callbacks: TensorBoard images, stall detection, the step progress bar and
crash-safe checkpoint files."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from pytorch_lightning.loggers import TensorBoardLogger

from stylemodule import keys
from stylemodule.files import atomic_path
from stylemodule.images import save_png, to_uint8
from stylemodule.module import image_quality_due

log = logging.getLogger(__name__)


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """Return the SummaryWriter of the trainer's TensorBoard logger, or None without one."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def finite_generated_image(pl_module: Any) -> torch.Tensor | None:
    """Return the generated image, (3, H, W) on the CPU, or None when a pixel is not finite."""
    image = pl_module.generated_rgb()[0].cpu()
    return image if image.isfinite().all() else None


class ImageLogger(Callback):
    """Log the input images once and the generated image every `every_n_steps` steps.

    TensorBoard receives the same uint8 pixels that `png_path` (when given) is
    overwritten with. The PNG is also rewritten at each evaluation, so that a search
    trial stopped by its scheduler leaves the image its last reported MAE describes.
    """

    def __init__(self, every_n_steps: int, png_path: str | Path | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.png_path = Path(png_path) if png_path is not None else None
        # Step of the image last written to TensorBoard, or -1 before the first.
        self.last_logged_step = -1
        # Step of the image in `png_path`, or -1 before the first write.
        self.png_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # Not on_fit_start: Lightning restores global_step after that hook, so a resumed
        # run would log its inputs and its restored image at step 0 a second time.
        writer = tensorboard_writer(trainer)
        if writer is None or trainer.global_step > 0:
            return
        inputs = {"input/content": pl_module.content, "input/style": pl_module.style}
        if pl_module.reference is not None:
            inputs["input/reference"] = pl_module.reference
        for tag, image in inputs.items():
            writer.add_image(tag, to_uint8(image[0].float().cpu()), 0, dataformats="CHW")
        self._log_generated(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log_generated(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self.png_path is None or trainer.global_step == self.png_step:
            return
        image = finite_generated_image(pl_module)
        if image is not None:
            save_png(image, self.png_path)
            self.png_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._log_generated(trainer, pl_module)

    def _log_generated(self, trainer: pl.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if step == self.last_logged_step:
            return
        image = finite_generated_image(pl_module)
        if image is None:
            log.warning("generated image at step %d is not finite; not logged", step)
            return
        self.last_logged_step = step
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_image("image/generated", to_uint8(image), step, dataformats="CHW")
        if self.png_path is not None:
            save_png(image, self.png_path)
            self.png_step = step


class RestoredStepLogger(Callback):
    """Log the image and the metrics of the restored step again when a run resumes.

    A resumed run's TensorBoard writer hides every event that earlier runs logged at the
    restored step or later (SummaryWriter's `purge_step`), so the curves drop the steps
    that a run killed after its last checkpoint had logged. The image and the evaluation
    that the earlier run logged at the restored step are among the hidden events: on its
    schedule (`eval_every`, `image_every`) or at its last step (`steps`), this puts back
    what it logged there.

    NOTE: TensorBoard 2.21 hides them with its default data server, but still shows
    them with `--load_fast=false` (checked through its HTTP API).
    """

    def __init__(self, eval_every: int, image_every: int, steps: int) -> None:
        self.eval_every = eval_every
        self.image_every = image_every
        self.steps = steps

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        writer = tensorboard_writer(trainer)
        step = trainer.global_step
        if writer is None or step == 0:
            return  # at step 0, ImageLogger logs the inputs and the image anew
        final = step == self.steps
        image_step = final or step % self.image_every == 0
        image = finite_generated_image(pl_module) if image_step else None
        if image is not None:
            writer.add_image("image/generated", to_uint8(image), step, dataformats="CHW")
        if final or step % self.eval_every == 0:
            metrics = pl_module.evaluate()
            if not final and not image_quality_due(step, self.eval_every, self.image_every):
                # The other evaluations measure the MAE alone.
                metrics = {key: value for key, value in metrics.items() if key == keys.METRIC_MAE}
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)


class StallMonitor(Callback):
    """Stop a run whose total loss has not changed for `patience` consecutive steps.

    A stalled L-BFGS (no descent direction, or a step too small to change the loss)
    otherwise looks like a finished run. `stalled_at` records the step, and the run's
    metrics report it as the stop reason.
    """

    def __init__(self, patience: int, rtol: float = 1e-9) -> None:
        self.patience = patience
        self.rtol = rtol
        self.unchanged = 0
        self.previous: float | None = None
        self.stalled_at: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # A resumed run starts afresh: a stall restored from the checkpoint is not this run's
        # stop reason. The restored counter still stops it at once if the loss stays constant.
        self.stalled_at = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        loss = pl_module.last_loss
        if loss is None or self.patience <= 0:
            return
        if self.previous is not None and abs(loss - self.previous) <= self.rtol * abs(self.previous):
            self.unchanged += 1
        else:
            self.unchanged = 0
        self.previous = loss
        if self.unchanged >= self.patience:
            self.stalled_at = trainer.global_step
            log.warning(
                "loss has not changed for %d steps (%.6g at step %d); stopping: the optimiser stalled",
                self.patience, loss, trainer.global_step,
            )
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"unchanged": self.unchanged, "previous": self.previous, "stalled_at": self.stalled_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unchanged = state_dict["unchanged"]
        self.previous = state_dict["previous"]
        self.stalled_at = state_dict["stalled_at"]


class FinalMetrics(Callback):
    """Evaluate the final image once and log the metrics with the hyperparameters.

    This runs in `on_fit_end`, before the Trainer closes its logger, so the final metrics
    go to the run's own event file. Logged after the close, they would open a second file.
    TensorBoard reads a folder's files in name order and can then read that file first.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.metrics = pl_module.evaluate()
        if trainer.logger is None:
            return
        metrics = dict(self.metrics)
        if not metrics and pl_module.last_loss is not None:
            # TensorBoardLogger writes the hparams only with metrics, and a run without a
            # reference has no MAE, so the final loss goes in its place.
            metrics[keys.LOSS_TOTAL] = pl_module.last_loss
        # Logged at the final step, because Lightning's default, step 0, would put the
        # final metrics at the start of their curves.
        trainer.logger.log_hyperparams(pl_module.hparams, metrics, step=trainer.global_step)


class StepProgressBar(TQDMProgressBar):
    """One bar over all optimisation steps (not epochs), with the loss and the latest MAE."""

    def init_train_tqdm(self) -> Tqdm:
        # Lightning 2.6 writes its bars to stdout. stderr, tqdm's default, keeps stdout for
        # the command's result line.
        return Tqdm(
            desc="steps",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.set_description("steps")
        self.train_progress_bar.refresh()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        step = trainer.global_step
        if self._should_update(step, trainer.max_steps):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        # Close the bar, which ends its line, so that the command's message starts a new one.
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()

    # The evaluation every few steps is a single batch: no second bar for it.
    def on_validation_start(self, *args: Any) -> None:
        pass

    def on_validation_batch_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_validation_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose last.ckpt always contains the step where the run stopped.

    Lightning 2.6 writes last.ckpt only together with a step checkpoint, so a run that ends
    between two of them (max_steps not a multiple of every_n_train_steps, or a stall) would
    resume from an earlier step and log those steps to TensorBoard twice.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Step of the last checkpoint this fit wrote, or None before the first.
        self.saved_step: int | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: Any, exception: BaseException) -> None:
        """Save last.ckpt when Ctrl-C stops the run, so that --resume loses no finished step.

        Other exceptions save nothing: after a non-finite loss the image is no longer valid.
        """
        super().on_exception(trainer, pl_module, exception)
        if isinstance(exception, KeyboardInterrupt):
            # NOTE: Ctrl-C between L-BFGS's update of the image and Lightning's step count
            # would save the image one step ahead. That window is short, because the
            # closure, where nearly all of a step's time goes, comes before the update.
            self._save_last_if_behind(trainer)

    def _save_last_if_behind(self, trainer: pl.Trainer) -> None:
        if self.save_last and self.saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saved_step = trainer.global_step


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints under a temporary name and rename them; load with weights_only=True."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with atomic_path(path) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)
