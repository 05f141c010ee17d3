"""StyleTransferModule: a LightningModule whose only parameter is the generated image."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.regression import MeanAbsoluteError

from stylemodule import keys
from stylemodule.config import StyleConfig
from stylemodule.errors import CheckpointError, NonFiniteLossError
from stylemodule.losses import content_loss, gram_matrix, style_layer_loss, total_variation
from stylemodule.vgg import build_extractor


class StyleTransferModule(pl.LightningModule):
    """Optimise an image so that its VGG19 features match a content and a style image.

    `content` and `style` are RGB images in [0, 1] of shape (3, H, W), already at the
    sizes to use; `reference`, at its own size, is what `metric/mae` compares against.
    `calibration` holds RGB images for the Gatys normalisation (default: content and
    style). The feature extractor is frozen and kept out of `parameters()`,
    `state_dict()` and checkpoints; the targets are computed once on the run's device.
    """

    def __init__(
        self,
        config: StyleConfig,
        content: torch.Tensor,
        style: torch.Tensor,
        reference: torch.Tensor | None = None,
        calibration: Sequence[torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # The logger stores the hparams at the start for its hparams.yaml. TensorBoard's HParams
        # tab gets them once, with the final metrics (callbacks.FinalMetrics).
        self.save_hyperparameters(config.to_dict())

        extractor = build_extractor(config.loss_layers, config.weights, config.pooling, config.preprocessing)
        if config.channels_last:
            extractor = extractor.to(memory_format=torch.channels_last)
        # Stored outside nn.Module's registry: not a parameter, not in the checkpoint.
        self.__dict__["extractor"] = extractor
        self._calibration = list(calibration) if calibration is not None else [content, style]
        self._prepared = False

        self.register_buffer("content", content.unsqueeze(0).contiguous(), persistent=False)
        self.register_buffer("style", style.unsqueeze(0).contiguous(), persistent=False)
        self.register_buffer(
            "reference", None if reference is None else reference.unsqueeze(0).contiguous(), persistent=False
        )
        self.image = nn.Parameter(self._initial_image(content))

        # MAE at every evaluation; SSIM (about 80 ms on the 512x384 reference grid, 80 times
        # the MAE) and PSNR only at image steps and at the end.
        self.mae = MeanAbsoluteError()
        self.image_quality = MetricCollection(
            {"ssim": StructuralSimilarityIndexMeasure(data_range=1.0), "psnr": PeakSignalNoiseRatio(data_range=1.0)},
            prefix="metric/",
        )
        self.last_loss: float | None = None
        self.last_terms: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ set-up

    def _initial_image(self, content: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) starting image in the extractor's input space."""
        generator = torch.Generator().manual_seed(self.config.seed)
        noise = torch.rand(content.shape, generator=generator)  # white noise, uniform RGB
        blend = {"noise": 0.0, "content": 1.0, "blend": self.config.init_blend}[self.config.init]
        start = blend * content + (1 - blend) * noise
        image = self.extractor.preprocess(start.unsqueeze(0))
        # The parameter stays contiguous even with channels_last, because L-BFGS flattens
        # its gradient with view(); compute_losses converts the layout for VGG19.
        return image.contiguous()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "StyleTransferModule":
        # Device and dtype moves reach the unregistered extractor too.
        super()._apply(fn, *args, **kwargs)
        self.extractor._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def prepare(self) -> None:
        """Calibrate the normalisation (if enabled) and compute the loss targets, once."""
        if self._prepared:
            return
        extractor = self.extractor
        if self.config.normalize:
            # The calibration images are no buffers, so precision plugins did not convert them.
            images = [extractor.preprocess(image.to(self.device, self.image.dtype)) for image in self._calibration]
            extractor.normalize_(images)
        self._calibration = []

        content = self._network_input(self.content)
        style_input = self._network_input(self.style)
        content_features = extractor(content, self.config.content_layers)
        style_features = extractor(style_input, self.config.style_layers)
        for layer in self.config.content_layers:
            self.register_buffer(f"target_{layer}", content_features[layer], persistent=False)
        for layer in self.config.style_layers:
            features = style_features[layer]
            self.register_buffer(f"gram_{layer}", gram_matrix(features), persistent=False)
        self._prepared = True

    def _network_input(self, rgb: torch.Tensor) -> torch.Tensor:
        x = self.extractor.preprocess(rgb)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def on_fit_start(self) -> None:
        self.prepare()

    def on_validation_start(self) -> None:
        self.prepare()

    # ------------------------------------------------------------------ losses

    def compute_losses(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward pass of `image`; returns every loss term keyed by its metric key."""
        config = self.config
        if config.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        features = self.extractor(image)
        losses: dict[str, torch.Tensor] = {}

        content = sum(
            content_loss(features[layer], getattr(self, f"target_{layer}"), config.content_loss)
            for layer in config.content_layers
        )
        style = image.new_zeros(())
        for layer, weight in zip(config.style_layers, config.style_layer_weights):
            layer_features = features[layer]
            positions = layer_features.shape[-2] * layer_features.shape[-1]
            term = style_layer_loss(
                gram_matrix(layer_features), getattr(self, f"gram_{layer}"), positions, config.style_loss
            )
            losses[keys.style_layer_loss(layer)] = term
            style = style + weight * term

        total = config.content_weight * content + config.style_weight * style
        if config.tv_weight > 0:
            tv = total_variation(image)
            losses[keys.LOSS_TV] = tv
            total = total + config.tv_weight * tv
        losses[keys.LOSS_CONTENT] = content
        losses[keys.LOSS_STYLE] = style
        losses[keys.LOSS_TOTAL] = total
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(self.image)
        total = losses[keys.LOSS_TOTAL]
        # NOTE: the one host sync of a step, which the finite check and the stall check need.
        # torch.optim.LBFGS syncs in its step anyway; for Adam on a GPU its cost is unmeasured.
        loss_value = float(total.detach())
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self.global_step, loss_value)
        self.last_loss = loss_value
        # Kept on the device, so no sync: the run's record reads the last step's terms.
        self.last_terms = {key: losses[key].detach() for key in (keys.LOSS_CONTENT, keys.LOSS_STYLE)}
        self.log(keys.LOSS_TOTAL, total, prog_bar=True, batch_size=1)
        if self._terms_used():
            self.log_dict({key: value for key, value in losses.items() if key != keys.LOSS_TOTAL}, batch_size=1)
        return total

    def _terms_used(self) -> bool:
        """Return whether this step's loss terms reach TensorBoard or an evaluation's report.

        Lightning writes to its logger only every `log_every_n_steps` steps and discards
        the terms of other steps, but each `self.log` call still costs about 0.3 ms.
        Evaluation steps log the terms for the callbacks that report them to Ray Tune.
        """
        step = self.global_step + 1
        trainer = self.trainer
        return (
            step % trainer.log_every_n_steps == 0 or step % self.config.eval_every == 0 or step >= trainer.max_steps
        )

    # ------------------------------------------------------------------ evaluation

    def generated_rgb(self) -> torch.Tensor:
        """Return the generated image as RGB in [0, 1], (1, 3, H, W), detached and clamped."""
        return self.extractor.postprocess(self.image.detach().float()).clamp(0, 1)

    def _on_reference_grid(self, rgb: torch.Tensor) -> torch.Tensor:
        target_shape = self.reference.shape[-2:]
        if rgb.shape[-2:] != target_shape:
            rgb = F.interpolate(rgb, size=tuple(target_shape), mode="bilinear", antialias=True, align_corners=False)
        # torchmetrics flattens with view(), which needs contiguous memory.
        return rgb.clamp(0, 1).contiguous()

    def _measure(self, image_quality: bool) -> dict[str, torch.Tensor]:
        """MAE against the reference and, when asked, SSIM and PSNR."""
        generated = self._on_reference_grid(self.generated_rgb())
        reference = self.reference.to(generated.dtype)
        values = {keys.METRIC_MAE: self.mae(generated, reference)}
        self.mae.reset()
        if image_quality:
            values.update(self.image_quality(generated, reference))
            self.image_quality.reset()
        return values

    def image_quality_due(self) -> bool:
        """Return whether this step's evaluation adds SSIM and PSNR (see `image_quality_due`)."""
        return image_quality_due(self.global_step, self.config.eval_every, self.config.image_every)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # At the last step the final metrics (callbacks.FinalMetrics) measure the same image.
        if self.reference is None or self.global_step >= self.trainer.max_steps:
            return
        values = self._measure(image_quality=self.image_quality_due())
        # Lightning logs an evaluation inside training at the step before the one the image
        # has reached. The logger gets the image's step instead, as the image logs do.
        if self.logger is not None:
            self.logger.log_metrics({key: float(value) for key, value in values.items()}, step=self.global_step)
        self.log(keys.METRIC_MAE, values.pop(keys.METRIC_MAE), prog_bar=True, logger=False, batch_size=1)
        self.log_dict(values, logger=False, batch_size=1)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """MAE, SSIM and PSNR of the current image against the reference, outside any Trainer loop."""
        if self.reference is None:
            return {}
        return {key: float(value) for key, value in self._measure(image_quality=True).items()}

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> torch.optim.Optimizer:
        config = self.config
        if config.optimizer == "adam":
            return torch.optim.Adam([self.image], lr=config.lr)
        # One loss evaluation per step (max_iter=1); the history stays in the optimiser
        # state across steps, so a run of N steps performs N L-BFGS iterations. The
        # tolerances are 0 because the step count and the stall check decide when to stop.
        return torch.optim.LBFGS(
            [self.image],
            lr=config.lr,
            max_iter=1,
            history_size=config.history_size,
            tolerance_grad=0.0,
            tolerance_change=0.0,
        )

    def train_dataloader(self) -> Iterator[int]:
        # Style transfer has no data set: one dummy batch is one optimisation step, and
        # the Trainer's max_steps ends the endless stream. (Lightning skips None batches.)
        return itertools.repeat(0)

    def val_dataloader(self) -> range:
        # A single dummy batch: evaluation looks at the image, not at data.
        return range(1)

    # ------------------------------------------------------------------ checkpoints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_matches(checkpoint, self.config, self.image.shape)


# Settings that a resumed run cannot change, because the checkpoint's image, optimiser
# state and loss targets were made with them (the normalisation rescales every feature).
# Loss weights, steps and logging can change.
RESUME_FIXED = (
    "content_layers", "style_layers", "weights", "pooling", "normalize", "calibration_dir", "style_size",
    "optimizer", "lr", "history_size", "init", "init_blend", "seed",
)  # fmt: skip


def image_quality_due(step: int, eval_every: int, image_every: int) -> bool:
    """Return whether the evaluation at `step` adds SSIM and PSNR to the MAE.

    The first evaluation at or after each image step does, so the image metrics come
    every `image_every` steps also when it is not a multiple of `eval_every`.
    """
    return step // image_every > (step - eval_every) // image_every


def check_checkpoint_matches(
    checkpoint: dict[str, Any], config: StyleConfig, image_shape: Sequence[int], source: str = "checkpoint"
) -> None:
    """Raise CheckpointError when a checkpoint belongs to another image size or fixed setting.

    `image_shape` is the (1, 3, H, W) shape of the image that `config` generates.
    """
    saved = checkpoint.get("state_dict", {}).get("image")
    if saved is None:
        raise CheckpointError(f"{source} contains no generated image; give a checkpoint written by stylemodule")
    if tuple(saved.shape) != tuple(image_shape):
        raise CheckpointError(
            f"{source} contains a {saved.shape[-1]}x{saved.shape[-2]} image but these settings give "
            f"{image_shape[-1]}x{image_shape[-2]}; resume with the size settings of the checkpoint's "
            "run (its config.yaml)"
        )
    hparams = checkpoint.get("hyper_parameters", {})
    for name in RESUME_FIXED:
        if name in hparams and list_or_value(hparams[name]) != list_or_value(getattr(config, name)):
            raise CheckpointError(
                f"{source} was written with {name}={hparams[name]} but this run uses "
                f"{name}={getattr(config, name)}, which a resumed run cannot change; "
                "resume with the checkpoint's config.yaml, or start a new run"
            )
    # The loss targets come from the images. Paths change when the data moves, so the
    # file names are compared. NOTE: two different files with one name pass.
    for role in ("content", "style"):
        saved_name = Path(str(hparams.get(role) or "")).name
        name = Path(str(getattr(config, role) or "")).name
        if saved_name and saved_name != name:
            raise CheckpointError(
                f"{source} was made from the {role} image {saved_name} but this run uses {name}, which a "
                "resumed run cannot change; resume with the checkpoint's config.yaml, or start a new run"
            )
    # The image is stored in the network's input space, so that space must not change.
    saved_space = resolved_preprocessing(hparams.get("preprocessing", "auto"), hparams.get("weights", "caffe"))
    space = resolved_preprocessing(config.preprocessing, config.weights)
    if saved_space != space:
        raise CheckpointError(
            f"{source} stores its image in {saved_space} input space but this run uses "
            f"{space}; resume with the checkpoint's config.yaml"
        )


def resolved_preprocessing(preprocessing: str, weights: str) -> str:
    """Resolve `auto` to the preprocessing the weights expect: caffe for caffe, else torchvision."""
    if preprocessing != "auto":
        return preprocessing
    return "caffe" if weights == "caffe" else "torchvision"


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
