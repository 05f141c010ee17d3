"""scripts/benchmark.py run as a command: the --quick smoke run at 32 pixels and its Markdown
page, and the error for --device cuda on a machine without CUDA."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
SECTIONS = (
    "# Benchmarks",
    "## Step time",
    "## Floating-point work and memory",
    "## Precision and layout",
    "## Search efficiency: ASHA against FIFO",
    "## GPU: 500 L-BFGS steps at 512 px",
    "## Targets",
)


def load_script() -> ModuleType:
    """Import scripts/benchmark.py as a module, for its pure helper functions."""
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = load_script()


def run_script(*args: str, data_dir: Path | None = None, timeout: float) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    if data_dir is not None:
        environment["STYLEMODULE_DATA"] = str(data_dir)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
        check=False,
    )


def table_row(document: str, first_cells: str) -> list[str]:
    """Return the cells of the Markdown table row that starts with `first_cells`."""
    for line in document.splitlines():
        if line.startswith(f"| {first_cells} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no table row starting with '| {first_cells} |' in:\n{document}")


@pytest.fixture(scope="module")
def quick_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], str]:
    """Return the process and the written page of one --quick run without the searches."""
    output = tmp_path_factory.mktemp("benchmark") / "b.md"
    completed = run_script("--quick", "--skip-search", "--sizes", "32", "--output", str(output), data_dir=data_dir, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, output.read_text(encoding="utf-8")


@pytest.mark.slow
def test_quick_run_writes_sections(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, document = quick_run
    for section in SECTIONS:
        assert f"\n{section}\n" in f"\n{document}", section


@pytest.mark.slow
def test_quick_run_prints_page(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    completed, document = quick_run
    assert "## Step time" in completed.stdout
    assert completed.stdout.strip() == document.strip()


@pytest.mark.slow
def test_quick_run_records_run(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, document = quick_run
    assert "- Command: `python scripts/benchmark.py --quick --skip-search --sizes 32 --output " in document
    assert re.search(r"- Date: \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", document)
    assert re.search(r"1-minute load average: \d+\.\d+ at the start and \d+\.\d+ at the end", document)
    for library in ("torch", "pytorch-lightning", "ray", "torchmetrics", "python"):
        assert re.search(rf"- Libraries: .*\b{library} \d", document), library


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["L-BFGS", "Adam"])
def test_quick_run_step_times(quick_run: tuple[subprocess.CompletedProcess[str], str], optimizer: str) -> None:
    _, document = quick_run
    cells = table_row(document, f"32 | 32x24 | {optimizer}")
    assert cells[3] == "1"  # runs: --quick makes one
    lightning_ms, plain_ms, overhead = float(cells[4]), float(cells[5]), float(cells[7])
    bare_ms, plain_over_bare = float(cells[9]), float(cells[10])
    assert lightning_ms > 0
    assert plain_ms > 0
    assert bare_ms > 0
    assert overhead == pytest.approx(lightning_ms / plain_ms, rel=0.05)
    assert plain_over_bare == pytest.approx(plain_ms / bare_ms, rel=0.05)


@pytest.mark.slow
def test_quick_run_work_and_memory(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, document = quick_run
    section = document.split("## Floating-point work and memory")[1].split("## Precision and layout")[0]
    cells = table_row(section, "32 | 32x24 | L-BFGS")
    step_gflop, bare_gflop, rate = float(cells[3]), float(cells[4]), float(cells[5])
    assert step_gflop >= bare_gflop > 0
    assert rate > 0
    assert float(cells[7]) >= float(cells[8]) > 0  # evaluation, MAE alone
    assert float(cells[10]) >= float(cells[9]) > 0  # peak resident memory: process, plain loop
    ceiling = r"best of 5 float32 256x256 matrix products, measured at the end of each case's subprocess"
    assert re.search(rf"{ceiling} \(\d+\.\d to \d+\.\d GFLOP/s\): \d+\.\d GFLOP/s", document)


@pytest.mark.slow
def test_quick_run_precision_rows(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, document = quick_run
    for optimizer in ("L-BFGS", "Adam"):
        cells = table_row(document, f"{optimizer} | float32 | 32-true | no")
        assert float(cells[4]) > 0  # ms/step
        assert 0 < float(cells[6]) < 1  # MAE
        table_row(document, f"{optimizer} | bf16-mixed | bf16-mixed | no")
        table_row(document, f"{optimizer} | channels-last | 32-true | yes")


@pytest.mark.slow
def test_quick_run_targets(quick_run: tuple[subprocess.CompletedProcess[str], str]) -> None:
    _, document = quick_run
    targets = document.split("## Targets")[1]
    assert "| not measured: 256 is not among --sizes | not measured |" in targets
    assert "| not measured: --skip-search | not measured |" in targets
    plain_rows = [line for line in targets.splitlines() if "of bare forward+backward, 32 px" in line]
    assert len(plain_rows) == 2
    for line in plain_rows:
        assert line.endswith(("| MET |", "| MISSED |")), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_rejected(tmp_path: Path) -> None:
    output = tmp_path / "b.md"
    completed = run_script("--device", "cuda", "--output", str(output), timeout=120)
    assert completed.returncode == 2
    assert "--device cuda needs a CUDA GPU" in completed.stderr
    assert "use --device cpu" in completed.stderr
    assert not output.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--sizes", "8"], "size 8 gives a 8x6 image"),
        (["--reduction-factor", "nan"], "invalid --reduction-factor nan"),
        (["--output", "."], "is a folder"),
    ],
    ids=["size", "reduction-factor", "output-folder"],
)
def test_bad_options_rejected_early(data_dir: Path, tmp_path: Path, options: list[str], message: str) -> None:
    completed = run_script("--quick", "--skip-search", *options, data_dir=data_dir, timeout=120)
    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


def test_step_intervals_skip_warmup() -> None:
    ends = [10.0, 11.0, 13.0, 16.0, 20.0]
    assert benchmark.step_intervals(ends, 1) == [1.0, 2.0, 3.0, 4.0]
    assert benchmark.step_intervals(ends, 3) == [3.0, 4.0]


def test_run_ratios_pair_repeats() -> None:
    lightning = [[1.1, 1.0, 1.2], [2.2, 2.0, 2.4]]
    plain = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    assert benchmark.run_ratios(lightning, plain) == pytest.approx([1.1, 1.1])


@pytest.mark.parametrize(
    ("value", "run_values", "expected"),
    [
        (1.02, [1.00, 1.04], "MET"),
        (1.10, [1.06, 1.20], "MISSED"),
        (1.02, [1.01, 1.02, 1.07], "MET (1 of 3 repeats above the limit)"),
        (1.06, [1.04, 1.06, 1.07], "MISSED (1 of 3 repeats within the limit)"),
        (1.05, [1.05], "MET"),
    ],
)
def test_timing_verdict_cases(value: float, run_values: list[float], expected: str) -> None:
    assert benchmark.timing_verdict(value, run_values, 1.05) == expected


def test_repeats_by_size_and_device() -> None:
    cpu = {"repeats": None, "device": "cpu"}
    assert [benchmark.repeats_for(cpu, size) for size in (128, 256, 512)] == [3, 5, 1]
    assert benchmark.repeats_for({"repeats": None, "device": "cuda"}, 512) == 3
    assert benchmark.repeats_for({"repeats": 2, "device": "cpu"}, 512) == 2


def timing_case(size: int, optimizer: str, lightning_s: float, plain_s: float) -> dict:
    return {
        "size": size, "optimizer": optimizer, "lightning_s": lightning_s, "plain_s": plain_s, "bare_s": plain_s / 1.1,
        "overhead": lightning_s / plain_s, "overhead_runs": [lightning_s / plain_s], "overhead_min": lightning_s / plain_s,
        "plain_over_bare": 1.1, "plain_over_bare_runs": [1.1], "plain_over_bare_min": 1.1,
    }  # fmt: skip


def test_overhead_target_cites_smallest_size_cost() -> None:
    cases = [
        timing_case(32, "lbfgs", 0.0222, 0.0210),
        timing_case(256, "lbfgs", 0.4040, 0.4000),
        timing_case(256, "adam", 0.4400, 0.4000),
    ]
    run = {"options": {"device": "cpu"}, "cases": cases, "search": None, "gpu_run": None, "machine": {"gpu": "none"}}

    rows = {target: (measured, result) for target, measured, result in benchmark.evaluate_targets(run)}

    lbfgs = rows["Lightning overhead at 256 px on the CPU, L-BFGS: Lightning / plain loop <= 1.05"]
    assert lbfgs[0].endswith("; Lightning - plain at 32 px, where noise is smallest: 1.20 ms, 0.3% of this step")
    assert lbfgs[1] == "MET"
    adam = rows["Lightning overhead at 256 px on the CPU, Adam: Lightning / plain loop <= 1.05"]
    assert "32 px" not in adam[0]  # no smaller Adam case to cite
    assert adam[1] == "MISSED"
