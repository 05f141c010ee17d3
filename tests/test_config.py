"""Presets against the published settings, the YAML round trip, input validation and paths."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from stylemodule.config import GATYS2016, PRESETS, TUTORIAL, StyleConfig, load_yaml, preset, save_yaml
from stylemodule.errors import ConfigError

STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


# ---------------------------------------------------------------------- presets


def test_gatys2016_layers_and_weights() -> None:
    config = preset("gatys2016")

    assert config.content_layers == ["relu4_2"]
    assert config.style_layers == STYLE_LAYERS
    assert config.style_layer_weights == [0.2] * 5
    assert config.content_weight / config.style_weight == pytest.approx(8e-4, rel=1e-12)


def test_gatys2016_network_and_losses() -> None:
    config = preset("gatys2016")

    assert config.weights == "caffe"
    assert config.preprocessing == "auto"
    assert config.pooling == "avg"
    assert config.normalize is True
    assert config.content_loss == "sum"
    assert config.style_loss == "gatys"


def test_gatys2016_optimisation_and_size() -> None:
    config = preset("gatys2016")

    assert config.init == "noise"
    assert config.optimizer == "lbfgs"
    assert config.steps == 2000
    assert config.size == 512
    assert config.style_size == "content"


def test_gatys2016_is_dataclass_default() -> None:
    assert preset("gatys2016") == StyleConfig()
    assert GATYS2016 == StyleConfig()


def test_tutorial_layers_and_weights() -> None:
    config = preset("tutorial")

    assert config.content_layers == ["relu4_2"]
    assert config.style_layers == STYLE_LAYERS
    assert config.style_layer_weights == [1.0, 0.75, 0.2, 0.2, 0.2]
    assert config.content_weight == 1.0
    assert config.style_weight == 1e6


def test_tutorial_network_and_losses() -> None:
    config = preset("tutorial")

    assert config.size == 400
    assert config.weights == "torchvision"
    assert config.preprocessing == "auto"
    assert config.pooling == "max"
    assert config.normalize is False
    assert config.content_loss == "mean"
    assert config.style_loss == "mean"
    assert config.style_size == "content"


def test_tutorial_optimisation() -> None:
    config = preset("tutorial")

    assert config.init == "content"
    assert config.optimizer == "adam"
    assert config.lr == 0.003


def test_presets_table_names() -> None:
    assert set(PRESETS) == {
        "gatys2016", "tutorial", "paper-search-best", "paper-search-best-256", "paper-search-stars-256"
    }
    assert PRESETS["tutorial"] == TUTORIAL


def test_preset_returns_independent_copy() -> None:
    config = preset("gatys2016")
    config.size = 33
    config.style_layers.append("relu1_2")

    assert GATYS2016.size == 512
    assert GATYS2016.style_layers == STYLE_LAYERS


def test_replace_shares_no_lists() -> None:
    derived = GATYS2016.replace(size=32)
    derived.style_layers.append("relu1_2")
    derived.style_layer_weights.append(0.1)
    derived.content_layers.append("relu3_2")

    assert GATYS2016.style_layers == STYLE_LAYERS
    assert GATYS2016.style_layer_weights == [0.2] * 5
    assert GATYS2016.content_layers == ["relu4_2"]


# ---------------------------------------------------------------------- derived values


def test_exact_shape_is_height_width() -> None:
    assert GATYS2016.replace(exact_size="512x384").exact_shape == (384, 512)
    assert GATYS2016.exact_shape is None


def test_loss_layers_deduplicated_in_order() -> None:
    config = GATYS2016.replace(content_layers=["relu4_2", "relu1_1"], style_layers=["relu1_1"], style_layer_weights=[1])

    assert config.loss_layers == ["relu4_2", "relu1_1"]


def test_from_dict_coerces_ints_and_tuples() -> None:
    config = StyleConfig.from_dict({"content_weight": 2, "style_layer_weights": (1, 1, 1, 1, 1)})

    assert config.content_weight == 2.0
    assert isinstance(config.content_weight, float)
    assert config.style_layer_weights == [1.0] * 5
    assert isinstance(config.style_layer_weights, list)


# ---------------------------------------------------------------------- YAML


def test_yaml_round_trip_preset(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"

    save_yaml(TUTORIAL, path)

    assert load_yaml(path) == TUTORIAL


def test_yaml_round_trip_changed_values(tmp_path: Path) -> None:
    config = TUTORIAL.replace(
        exact_size="96x64",
        reference=None,
        content_weight=1e-10,
        style_weight=3.5e12,
        style_layers=["relu1_1", "conv2_1"],
        style_layer_weights=[0.5, 2],
        tv_weight=0.0,
        seed=7,
        channels_last=True,
    )
    path = tmp_path / "nested" / "config.yaml"

    save_yaml(config, path)
    loaded = load_yaml(path)

    assert loaded == config
    assert loaded.reference is None
    assert loaded.content_weight == 1e-10


def test_yaml_preset_key_selects_base(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("preset: tutorial\nsteps: 5\n", encoding="utf-8")

    assert load_yaml(path) == TUTORIAL.replace(steps=5)
    assert load_yaml(path, base=GATYS2016) == TUTORIAL.replace(steps=5)


def test_yaml_without_preset_uses_base(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("steps: 5\n", encoding="utf-8")

    assert load_yaml(path) == GATYS2016.replace(steps=5)
    assert load_yaml(path, base=TUTORIAL) == TUTORIAL.replace(steps=5)


def test_yaml_empty_file_is_base(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("", encoding="utf-8")

    assert load_yaml(path) == GATYS2016


def test_yaml_exponent_without_dot_is_float(tmp_path: Path) -> None:
    # PyYAML alone reads `1e6` and `8e-4` as strings (YAML 1.1 floats need a dot).
    path = tmp_path / "config.yaml"
    path.write_text("style_weight: 1e6\ncontent_weight: 8e-4\nlr: 2E+1\n", encoding="utf-8")

    config = load_yaml(path)

    assert config.style_weight == 1e6
    assert config.content_weight == 8e-4
    assert config.lr == 20.0


# ---------------------------------------------------------------------- invalid input

# (changes, substrings that the message must contain: the value and the fix)
INVALID_CHANGES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("string for int", {"size": "512"}, ["'512'", "size", "an integer"]),
    ("bool for int", {"steps": True}, ["True", "steps", "an integer"]),
    ("float for int", {"steps": 2.5}, ["2.5", "steps", "an integer"]),
    ("string for float", {"content_weight": "big"}, ["'big'", "content_weight", "a number"]),
    ("int for bool", {"normalize": 1}, ["1", "normalize", "true or false"]),
    ("string weights", {"style_layer_weights": ["a"] * 5}, ["'a'", "style_layer_weights", "a list of numbers"]),
    ("string for list", {"style_layers": "relu1_1"}, ["'relu1_1'", "style_layers", "a list of layer names"]),
    ("unknown layer", {"content_layers": ["relu4_5"]}, ["'relu4_5'", "content_layers", "relu4_2"]),
    ("empty layers", {"content_layers": []}, ["content_layers is empty", "relu4_2"]),
    ("zero content weight", {"content_weight": 0}, ["content_weight 0", "greater than 0"]),
    ("negative content weight", {"content_weight": -1}, ["content_weight -1", "greater than 0"]),
    ("zero style weight", {"style_weight": 0}, ["style_weight 0", "greater than 0"]),
    ("negative style weight", {"style_weight": -2.5}, ["style_weight -2.5", "greater than 0"]),
    ("zero layer weight", {"style_layer_weights": [0.2, 0, 0.2, 0.2, 0.2]}, ["weight 0.0", "greater than 0"]),
    ("negative layer weight", {"style_layer_weights": [0.2, 0.2, -0.2, 0.2, 0.2]}, ["-0.2", "greater than 0"]),
    ("weights length", {"style_layer_weights": [0.5, 0.5]}, ["2 values", "has 5", "one weight per style layer"]),
    ("size zero", {"size": 0}, ["size 0", "positive integer"]),
    ("negative steps", {"steps": -3}, ["steps -3", "positive integer"]),
    ("invalid pooling", {"pooling": "median"}, ["'median'", "max, avg"]),
    ("invalid init", {"init": "zeros"}, ["'zeros'", "noise, content, blend"]),
    ("exact size text", {"exact_size": "abc"}, ["'abc'", "WIDTHxHEIGHT"]),
    ("exact size one side", {"exact_size": "512"}, ["'512'", "WIDTHxHEIGHT"]),
    ("exact size zero", {"exact_size": "0x10"}, ["'0x10'", "positive"]),
    ("init blend above one", {"init_blend": 1.5}, ["1.5", "between 0 and 1"]),
    ("init blend negative", {"init_blend": -0.1}, ["-0.1", "between 0 and 1"]),
    ("16-mixed with lbfgs", {"precision": "16-mixed"}, ["16-mixed", "bf16-mixed", "adam"]),
    ("negative tv weight", {"tv_weight": -1}, ["tv_weight -1", "0 or greater"]),
    ("nan tv weight", {"tv_weight": math.nan}, ["tv_weight nan", "0 or greater"]),
    ("empty content", {"content": ""}, ["content is empty", "path of the content image"]),
    ("infinite tv weight", {"tv_weight": math.inf}, ["tv_weight inf", "finite"]),
    ("infinite layer weight", {"style_layer_weights": [0.2, math.inf, 0.2, 0.2, 0.2]}, ["weight inf", "finite"]),
    ("keep checkpoints zero", {"keep_checkpoints": 0}, ["keep_checkpoints 0", "-1"]),
    ("seed too large", {"seed": 2**64}, ["seed 18446744073709551616", "2**64 - 1"]),
    ("history too long", {"history_size": 2**31}, ["history_size 2147483648", "at most 2147483647"]),
    ("size above max pixels", {"size": 5000}, ["size 5000", "25000000 pixels", "max_pixels 16777216"]),
    ("exact size above max pixels", {"exact_size": "99999999999999999999x5"}, ["exact_size 99999999999999999999x5", "max_pixels"]),
    ("seed too negative", {"seed": -(2**63) - 1}, ["seed -9223372036854775809", "-2**63"]),
    ("weights without suffix", {"weights": "vgg"}, ["'vgg'", "caffe", ".pth"]),
]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [case[1:] for case in INVALID_CHANGES],
    ids=[case[0] for case in INVALID_CHANGES],
)
def test_invalid_value_rejected(changes: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        GATYS2016.replace(**changes)

    for text in expected:
        assert text in str(raised.value)


def test_16_mixed_allowed_with_adam() -> None:
    config = GATYS2016.replace(precision="16-mixed", optimizer="adam")

    assert config.precision == "16-mixed"


def test_unknown_key_suggests_near_match() -> None:
    with pytest.raises(ConfigError) as raised:
        StyleConfig.from_dict({"szie": 256})

    assert "'szie'" in str(raised.value)
    assert "did you mean 'size'?" in str(raised.value)
    assert "valid keys:" in str(raised.value)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as raised:
        StyleConfig.from_dict({"xyzzy": 1})

    assert "'xyzzy'" in str(raised.value)
    assert "did you mean" not in str(raised.value)
    assert "; valid keys: content, style," in str(raised.value)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError) as raised:
        preset("gatys")

    assert "'gatys'" in str(raised.value)
    assert "gatys2016, tutorial" in str(raised.value)


def test_yaml_unknown_preset(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("preset: paper\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="unknown preset 'paper'"):
        load_yaml(path)


def test_yaml_invalid_value_names_file(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("pooling: median\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_yaml(path)

    assert str(path) in str(raised.value)
    assert "'median'" in str(raised.value)


def test_yaml_invalid_syntax(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("size: [512\nsteps: 3\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_yaml(path)

    assert "invalid YAML" in str(raised.value)
    assert str(path) in str(raised.value)
    assert "at line 2, column 6" in str(raised.value)
    assert "\n" not in str(raised.value)


def test_yaml_anchor_expansion_message_short(tmp_path: Path) -> None:
    # Seven levels of ten-fold anchors expand to 10**7 strings in a file of a few hundred bytes.
    levels = ["&l0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]" for level in range(1, 7)]
    path = tmp_path / "config.yaml"
    path.write_text(f"content_layers: [{', '.join(levels)}]\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_yaml(path)

    assert "expected a list of layer names" in str(raised.value)
    assert len(str(raised.value)) < 1000


def test_yaml_duplicate_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("size: 256\nsteps: 30\nsize: 512\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="found the key 'size' twice at line 3, column 1"):
        load_yaml(path)


def test_yaml_list_rejected(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- size: 512\n- steps: 3\n", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_yaml(path)

    assert str(path) in str(raised.value)
    assert "mapping of setting: value" in str(raised.value)


def test_yaml_unsafe_tag_rejected(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("size: !!python/object/apply:os.getcwd []\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(path)


def test_yaml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as raised:
        load_yaml(path)

    assert "not found" in str(raised.value)
    assert str(path) in str(raised.value)


# ---------------------------------------------------------------------- paths


def test_relative_names_resolve_into_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.chdir(tmp_path)

    config = GATYS2016.replace(calibration_dir="calibration").with_absolute_paths(data_dir)

    assert config.content == str(data_dir / GATYS2016.content)
    assert config.style == str(data_dir / GATYS2016.style)
    assert config.reference == str(data_dir / GATYS2016.reference)
    assert config.calibration_dir == str(data_dir / "calibration")


def test_existing_relative_path_resolves_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    work = tmp_path / "work"
    (work / "images").mkdir(parents=True)
    (work / "images" / "mine.jpg").write_bytes(b"")
    (work / "vgg.pth").write_bytes(b"")
    monkeypatch.chdir(work)

    config = GATYS2016.replace(content="images/mine.jpg", weights="vgg.pth").with_absolute_paths(data_dir)

    assert config.content == str(work / "images" / "mine.jpg")
    assert config.weights == str(work / "vgg.pth")
    assert config.style == str(data_dir / GATYS2016.style)


def test_absolute_paths_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    content = str(elsewhere / "content.png")
    style = str(elsewhere / "style.png")

    config = GATYS2016.replace(content=content, style=style, reference=None).with_absolute_paths(
        tmp_path / "data"
    )

    assert config.content == content
    assert config.style == style
    assert config.reference is None
    assert config.weights == "caffe"
