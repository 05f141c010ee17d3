"""scripts/reproduce.py and scripts/search_paper.py run as commands on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
README = SCRIPTS.parent / "README.md"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reproduce(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "reproduce.py"), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--size", "8"], "size 8 gives a 8x6 image"),
        (["--steps", "0"], "invalid steps 0"),
    ],
    ids=["size", "steps"],
)
def test_reproduce_bad_input_exits_2(data_dir: Path, tmp_path: Path, options: list[str], message: str) -> None:
    output = tmp_path / "reproduce"

    completed = reproduce(data_dir, *options, "--output", str(output))

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not output.exists()


def test_reproduce_missing_images_exits_2(tmp_path: Path) -> None:
    completed = reproduce(tmp_path / "no-data", "--smoke", "--output", str(tmp_path / "reproduce"))

    assert completed.returncode == 2
    assert "content image not found" in completed.stderr
    assert not (tmp_path / "reproduce").exists()


@pytest.mark.slow
def test_reproduce_rerun_needs_overwrite(data_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "reproduce"
    first = reproduce(data_dir, "--smoke", "--variants", "content-init", "--output", str(output))
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads((output / "summary.json").read_text())
    (result,) = summary["results"]
    assert result["variant"] == "content-init"
    assert 0 < result["mae_mean"] < 1

    again = reproduce(data_dir, "--smoke", "--variants", "max-pooling", "--output", str(output))
    assert again.returncode == 2
    assert "already contains results (summary.json, content-init); pass --overwrite" in again.stderr

    notes = output / "notes.txt"
    notes.write_text("not written by reproduce.py")

    replaced = reproduce(
        data_dir, "--smoke", "--variants", "max-pooling", "--seeds", "0", "--output", str(output), "--overwrite"
    )
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    # The earlier variant's folder is gone, so the results match summary.json; other files stay.
    assert sorted(path.name for path in output.iterdir()) == ["max-pooling", "notes.txt", "summary.json"]
    assert notes.read_text() == "not written by reproduce.py"


def test_search_paper_modes() -> None:
    search_paper = load_script("search_paper")

    cpu = search_paper.build_argv([])
    smoke = search_paper.build_argv(["--smoke"])
    gpu = search_paper.build_argv(["--gpu", "--samples", "4"])

    assert cpu[:3] == ["search", "--space", "paper"]
    assert cpu[cpu.index("--size") + 1] == "128"
    assert "--smoke" not in smoke
    assert smoke[smoke.index("--size") + 1] == "32"
    assert gpu[gpu.index("--gpus-per-trial") + 1] == "0.25"
    # Arguments after the mode come last, so argparse lets them override the mode's values.
    assert gpu[-2:] == ["--samples", "4"]


def test_readme_gpu_example_matches_script() -> None:
    text = README.read_text(encoding="utf-8")
    start = text.index(".venv/bin/python scripts/search_paper.py --gpu")
    command = text[text.index(".venv/bin/stylemodule search", start):text.index("```", start)]
    options = shlex.split(command.replace("\\\n", " "))[2:]

    assert options == ["--space", "paper", *load_script("search_paper").GPU]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--resume"], ["search", "--resume", "outputs/search-paper"]),
        (["--gpu", "--resume"], ["search", "--resume", "outputs/search-paper-gpu"]),
        (["--resume", "runs/mine"], ["search", "--resume", "runs/mine"]),
        (["--resume=runs/mine"], ["search", "--resume=runs/mine"]),
    ],
    ids=["cpu", "gpu", "folder", "equals"],
)
def test_search_script_resume_argv(argv: list[str], expected: list[str]) -> None:
    assert load_script("search_paper").build_argv(argv) == expected


def test_search_script_help_names_modes() -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPTS / "search_paper.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert "--smoke" in completed.stdout
    assert "--resume" in completed.stdout
    assert "--max-concurrent" in completed.stdout
