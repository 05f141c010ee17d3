"""Benchmark stylemodule and write the results to docs/benchmarks.md.

Measured on the CPU, or on one CUDA GPU with `--device cuda`:
- the time of one optimisation step of StyleTransferModule under the Lightning Trainer,
  in a plain PyTorch loop doing the same arithmetic, and of VGG19's bare forward and
  backward pass, for L-BFGS and Adam at each size;
- the floating-point work of one step (torch.utils.flop_counter) and the rate achieved;
- the peak memory of each case, which runs in a fresh subprocess of this script;
- float32 against bf16-mixed and channels-last: step time and the MAE after a fixed
  number of steps;
- ASHA against FIFO on the same sampled configurations: steps spent, wall time, best MAE;
- with `--device cuda`: the wall time of 500 L-BFGS steps at 512 pixels.

    python scripts/benchmark.py                         # the default run behind docs/benchmarks.md
    python scripts/benchmark.py --quick --skip-search --output /tmp/b.md   # smoke test, 32 pixels
    python scripts/benchmark.py --device cuda           # on a machine with an NVIDIA GPU

Every number in the written document comes from this run. The reference images are read
from --data-dir, else STYLEMODULE_DATA, else the project's data/ folder.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stylemodule.files import atomic_write_text

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPOSITORY / "docs" / "benchmarks.md"
REFERENCE_IMAGES = (
    "Tuebingen_Neckarfront_gatys_paper_002.jpg",
    "Van_Gogh_Starry_Night_gatys_paper_004.jpg",
    "Van_Gogh_true_target_gatys_paper_021.jpg",
)
OPTIMIZERS = ("lbfgs", "adam")
OPTIMIZER_NAMES = {"lbfgs": "L-BFGS", "adam": "Adam"}
# (name, Lightning precision, channels_last) of the precision and layout comparison.
VARIANTS = (
    ("float32", "32-true", False),
    ("bf16-mixed", "bf16-mixed", False),
    ("channels-last", "32-true", True),
    ("bf16-mixed + channels-last", "bf16-mixed", True),
)

# Targets the document checks the measurements against.
OVERHEAD_TARGET = 1.05  # Lightning step time / plain loop step time, at 256 px on the CPU
OVERHEAD_TARGET_SIZE = 256
PLAIN_TARGET = 1.3  # plain loop step time / bare forward+backward time
ASHA_MAE_TARGET = 1.02  # ASHA's best MAE / FIFO's best MAE
ASHA_STEPS_TARGET = 0.5  # ASHA's total steps / FIFO's total steps
GPU_TARGET_S = 10.0  # 500 L-BFGS steps at 512 px
GPU_TARGET_STEPS = 500
GPU_TARGET_SIZE = 512

# Option values of a default run and of --quick. An option given on the command line
# overrides both.
DEFAULTS: dict[str, Any] = {
    # 32 px shows Lightning's own per-step cost with the least noise: the step is short.
    "sizes": [32, 128, 256, 512],
    "warmup": 3,
    "steps": 5,
    "repeats": None,  # chosen by size and device: see repeats_for
    "variant_size": 128,
    "variant_steps": 30,
    "search_samples": 8,
    "search_size": 64,
    "search_steps": 60,
    "search_eval_every": 10,
    "grace_period": 10,
    "matmul_size": None,  # chosen by device: 2048 on the CPU, 8192 on a GPU
}
QUICK: dict[str, Any] = {
    "sizes": [32],
    "warmup": 1,
    "steps": 2,
    "repeats": 1,
    "variant_size": 32,
    "variant_steps": 3,
    "search_samples": 2,
    "search_size": 32,
    "search_steps": 6,
    "search_eval_every": 3,
    "grace_period": 3,
    "matmul_size": 256,
}

log = logging.getLogger("benchmark")


# ====================================================================== measurement helpers
# These run inside the worker subprocesses, which import torch and stylemodule.


def make_sync(device: str) -> Callable[[], None]:
    """Return a function that waits for the device's queued work, to call before perf_counter()."""
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def step_intervals(ends: Sequence[float], warmup: int) -> list[float]:
    """Return the seconds of each step after the first `warmup` steps (at least one).

    `ends` holds one perf_counter() value per step, taken when the step ended, so step
    k + 1 took ends[k] - ends[k - 1].
    """
    return [later - earlier for earlier, later in zip(ends[warmup - 1 :], ends[warmup:])]


def peak_memory(device: str) -> int:
    """Return the peak memory of this process in bytes: resident set on the CPU, allocated tensors on a GPU."""
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_step_timer(sync: Callable[[], None]) -> Any:
    """Build a Lightning callback that records perf_counter() at train start, after each step and at train end."""
    from pytorch_lightning.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.started: float | None = None
            self.ends: list[float] = []
            self.stopped: float | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            sync()
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            sync()
            self.ends.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            sync()
            self.stopped = time.perf_counter()

    return StepTimer()


def quiet_libraries() -> None:
    """Keep Lightning's start-up notes out of the worker logs; warnings still show."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # pytorch-lightning 2.6 builds torch.utils._pytree.LeafSpec, deprecated in torch 2.14.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def timed_config(spec: dict[str, Any], **changes: Any) -> Any:
    """Return gatys2016 on the benchmark's data with evaluation, images and checkpoints past the last step."""
    from stylemodule.config import GATYS2016

    total_steps = changes.get("steps", spec["warmup"] + spec["steps"])
    beyond = total_steps + 1
    settings = {
        "steps": total_steps,
        "eval_every": beyond,
        "image_every": beyond,
        "checkpoint_every": beyond,
        "accelerator": "gpu" if spec["device"] == "cuda" else "cpu",
        **changes,
    }
    return GATYS2016.replace(**settings).with_absolute_paths(Path(spec["data_dir"]))


def reset_image(module: Any, initial: Any, device: str) -> None:
    """Move the module to `device` and put the starting image back in place."""
    import torch

    # Lightning's teardown moves the module to the CPU after every fit.
    module.to(device)
    with torch.no_grad():
        module.image.copy_(initial.to(device))
    module.image.grad = None


def plain_step_times(module: Any, initial: Any, device: str, total_steps: int, sync: Callable[[], None]) -> tuple[list[float], int]:
    """Run `total_steps` steps in a plain loop; return the step end times and the L-BFGS history length.

    The optimiser comes from `configure_optimizers` and the closure evaluates the same
    losses as `training_step`, without Lightning and without logging.
    """
    from stylemodule import keys

    reset_image(module, initial, device)
    optimizer = module.configure_optimizers()

    def closure() -> Any:
        optimizer.zero_grad()
        total = module.compute_losses(module.image)[keys.LOSS_TOTAL]
        total.backward()
        return total

    ends = []
    for _ in range(total_steps):
        optimizer.step(closure)
        sync()
        ends.append(time.perf_counter())
    state = optimizer.state.get(module.image, {})
    return ends, len(state.get("old_dirs", []))


def lightning_step_times(module: Any, initial: Any, config: Any, folder: Path, sync: Callable[[], None]) -> list[float]:
    """Fit `module` for config.steps steps with `make_trainer`; return the step end times."""
    from stylemodule.run import make_trainer

    reset_image(module, initial, "cpu")
    timer = make_step_timer(sync)
    trainer = make_trainer(config, folder, callbacks=[timer], progress_bar=False, checkpoints=False)
    trainer.fit(module)
    if len(timer.ends) != config.steps:
        raise RuntimeError(f"the Trainer ran {len(timer.ends)} steps instead of {config.steps}")
    return timer.ends


def bare_step_times(module: Any, initial: Any, device: str, total_steps: int, sync: Callable[[], None]) -> list[float]:
    """Time VGG19's forward pass to the loss layers and the backward pass of the features' sum."""
    reset_image(module, initial, device)
    image = module.image.detach().clone().requires_grad_(True)
    ends = []
    for _ in range(total_steps):
        image.grad = None
        features = module.extractor(image)
        sum(feature.sum() for feature in features.values()).backward()
        sync()
        ends.append(time.perf_counter())
    return ends


def count_flops(module: Any, initial: Any, device: str) -> tuple[int, int]:
    """Return the FLOPs of one loss evaluation with its backward pass, and of the bare forward+backward.

    FlopCounterMode counts matrix products and convolutions only, so the optimiser's
    vector arithmetic is left out and the count is the same for L-BFGS and Adam.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from stylemodule import keys

    reset_image(module, initial, device)
    with FlopCounterMode(display=False) as counter:
        module.compute_losses(module.image)[keys.LOSS_TOTAL].backward()
    step_flops = counter.get_total_flops()

    image = module.image.detach().clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        features = module.extractor(image)
        sum(feature.sum() for feature in features.values()).backward()
    return step_flops, counter.get_total_flops()


def evaluation_seconds(module: Any, device: str, sync: Callable[[], None], repeats: int = 3) -> tuple[float, float]:
    """Return the median times of `module.evaluate()` (MAE, SSIM, PSNR) and of the MAE alone.

    The MAE alone is the resize to the reference's grid and the mean absolute difference,
    without torchmetrics, to show what the other metrics add.
    """
    import torch

    def mae_only() -> float:
        with torch.no_grad():
            generated = module._on_reference_grid(module.generated_rgb())
            return float((generated - module.reference.to(generated.dtype)).abs().mean())

    module.to(device)
    medians = []
    for function in (module.evaluate, mae_only):
        function()  # warm-up
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            function()
            sync()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times))
    return medians[0], medians[1]


# ====================================================================== workers


def matmul_rate(device: str, size: int) -> float:
    """Return the best float32 matmul rate in GFLOP/s, the practical ceiling of dense arithmetic."""
    import torch

    sync = make_sync(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    a @ b  # warm-up
    best = math.inf
    for _ in range(5):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def worker_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one size and optimiser: plain loop, Lightning and bare forward+backward, interleaved."""
    import torch

    from stylemodule.run import build_module

    device, warmup, steps = spec["device"], spec["warmup"], spec["steps"]
    sync = make_sync(device)
    total_steps = warmup + steps
    config = timed_config(spec, size=spec["size"], optimizer=spec["optimizer"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    module = build_module(config)
    module.to(device)
    module.prepare()
    initial = module.image.detach().cpu().clone()

    # The three kinds of run alternate within each repeat, so that other load on the
    # machine falls on all of them alike.
    plain, lightning, bare = [], [], []
    history = 0
    with tempfile.TemporaryDirectory(prefix="stylemodule-benchmark-") as folder:
        for repeat in range(spec["repeats"]):
            ends, history = plain_step_times(module, initial, device, total_steps, sync)
            plain.append(step_intervals(ends, warmup))
            if repeat == 0:
                # Before any Lightning run: the peak of the plain loop alone.
                plain_peak = peak_memory(device)
            lightning.append(step_intervals(lightning_step_times(module, initial, config, Path(folder), sync), warmup))
            # The process is warm by now, so one untimed pass suffices.
            bare.append(step_intervals(bare_step_times(module, initial, device, 1 + steps, sync), 1))

    evaluation, evaluation_mae = evaluation_seconds(module, device, sync)
    result = {
        "size": spec["size"],
        "optimizer": spec["optimizer"],
        "image_shape": list(module.image.shape[-2:]),
        "plain": plain,
        "lightning": lightning,
        "bare": bare,
        "lbfgs_history_entries": history,
        "evaluation_s": evaluation,
        "evaluation_mae_s": evaluation_mae,
        "plain_peak_bytes": plain_peak,
        "process_peak_bytes": peak_memory(device),
    }
    if spec["count_flops"]:
        result["step_flops"], result["bare_flops"] = count_flops(module, initial, device)

    # After the memory readings, which the matrices would otherwise raise.
    result["matmul_gflops"] = matmul_rate(device, spec["matmul_size"])
    result["threads"] = torch.get_num_threads()
    if device == "cuda":
        result["gpu_name"] = torch.cuda.get_device_name(0)
    return result


def worker_variants(spec: dict[str, Any]) -> dict[str, Any]:
    """Run each optimiser at one size under each precision and layout; record step time and final MAE.

    A variant that raises is recorded with its error, so that one failing setting does
    not hide the others.
    """
    from stylemodule import keys
    from stylemodule.run import run_transfer

    sync = make_sync(spec["device"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="stylemodule-benchmark-") as folder:
        for optimizer in OPTIMIZERS:
            for name, precision, channels_last in VARIANTS:
                row = {"optimizer": optimizer, "name": name, "precision": precision, "channels_last": channels_last}
                config = timed_config(
                    spec,
                    size=spec["size"],
                    steps=spec["variant_steps"],
                    optimizer=optimizer,
                    precision=precision,
                    channels_last=channels_last,
                )
                timer = make_step_timer(sync)
                output = Path(folder) / f"{optimizer}-{name.replace(' ', '')}"
                try:
                    record = run_transfer(config, output, progress_bar=False, callbacks=[timer], checkpoints=False)
                except RuntimeError as error:
                    log.exception("variant %s with %s failed", name, optimizer)
                    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    rows.append(row)
                    continue
                row.update(
                    step_s=statistics.median(step_intervals(timer.ends, spec["warmup"])),
                    mae=record.get(keys.METRIC_MAE),
                    final_loss=record.get("final_loss"),
                )
                rows.append(row)
    return {"size": spec["size"], "rows": rows}


def worker_search(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one search with the given scheduler and read its trials back."""
    from stylemodule.config import GATYS2016
    from stylemodule.report import collect_trials
    from stylemodule.search import SearchSettings, run_search

    settings = SearchSettings(
        space="paper",
        samples=spec["samples"],
        scheduler=spec["scheduler"],
        sampler_seed=spec["sampler_seed"],
        grace_period=spec["grace_period"],
        reduction_factor=spec["reduction_factor"],
        cpus_per_trial=1.0,
    )
    base = GATYS2016.replace(
        size=spec["size"],
        steps=spec["steps"],
        eval_every=spec["eval_every"],
        image_every=spec["steps"],
        log_every=spec["eval_every"],
        accelerator="cpu",
    ).with_absolute_paths(Path(spec["data_dir"]))
    folder = Path(spec["folder"])

    start = time.perf_counter()
    outcome = run_search(settings, base, folder)
    wall = time.perf_counter() - start

    trials = [
        {
            "params": row.params,
            "steps": row.steps,
            "best_mae": row.best_mae,
            "final_mae": row.final_mae,
            "stop_reason": row.stop_reason,
        }
        for row in collect_trials(folder)
    ]
    return {
        "scheduler": spec["scheduler"],
        "wall_s": wall,
        "errored": outcome.errors,
        "trials": trials,
    }


def worker_gpu_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Time a full run of L-BFGS steps at 512 px under Lightning and in the plain loop (CUDA only)."""
    import torch

    from stylemodule import keys
    from stylemodule.run import build_module, make_trainer

    device, steps = spec["device"], spec["gpu_steps"]
    sync = make_sync(device)
    config = timed_config(spec, size=GPU_TARGET_SIZE, steps=steps, optimizer="lbfgs")
    torch.cuda.reset_peak_memory_stats()
    module = build_module(config)
    initial = module.image.detach().clone()

    timer = make_step_timer(sync)
    with tempfile.TemporaryDirectory(prefix="stylemodule-benchmark-") as folder:
        trainer = make_trainer(config, folder, callbacks=[timer], progress_bar=False, checkpoints=False)
        trainer.fit(module)
    lightning_s = timer.stopped - timer.started
    mae = module.evaluate().get(keys.METRIC_MAE)

    sync()
    start = time.perf_counter()
    plain_step_times(module, initial, device, steps, sync)
    plain_s = time.perf_counter() - start
    return {
        "steps": steps,
        "size": GPU_TARGET_SIZE,
        "image_shape": list(module.image.shape[-2:]),
        "lightning_s": lightning_s,
        "plain_s": plain_s,
        "mae": mae,
        "peak_bytes": peak_memory(device),
    }


WORKERS = {
    "case": worker_case,
    "variants": worker_variants,
    "search": worker_search,
    "gpu-run": worker_gpu_run,
}


def run_worker(kind: str, spec_json: str, result_path: str) -> int:
    quiet_libraries()
    result = WORKERS[kind](json.loads(spec_json))
    atomic_write_text(Path(result_path), json.dumps(result))
    return 0


# ====================================================================== parent side


class WorkerError(RuntimeError):
    """Failure of a worker subprocess, with the end of its log in the message."""


def run_child(kind: str, spec: dict[str, Any], folder: Path, label: str) -> dict[str, Any]:
    """Run one worker in a fresh subprocess of this script and return its result."""
    index = len(list(folder.glob("*.log")))
    log_path = folder / f"{index:02d}-{kind}.log"
    result_path = folder / f"{index:02d}-{kind}.json"
    command = [
        sys.executable, str(Path(__file__).resolve()),
        "--worker", kind, "--worker-spec", json.dumps(spec), "--worker-result", str(result_path),
    ]  # fmt: skip
    log.info("%s ...", label)
    load_start = load_average()
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log_file:
        completed = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPOSITORY, check=False)
    if completed.returncode != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        raise WorkerError(f"{label} failed with exit code {completed.returncode}; the end of its log:\n{tail}")
    log.info("%s done in %.0f s", label, time.perf_counter() - start)
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result["load"] = (load_start, load_average())
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "pytorch-lightning", "ray", "torchmetrics"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def machine_info(gpu_name: str | None) -> dict[str, Any]:
    flags = cpu_flags()
    memory = memory_total_bytes()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory": f"{memory / 2**30:.1f} GiB" if memory else "unknown",
        "gpu": gpu_name or "none",
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16"}),
    }


# ---------------------------------------------------------------------- formatting


def ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    value = seconds * 1000
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def mib(count: float | None) -> str:
    return "n/a" if count is None else f"{count / 2**20:.0f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def mae_text(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def pooled_median(runs: Sequence[Sequence[float]]) -> float:
    return statistics.median([value for run in runs for value in run])


def minimum(runs: Sequence[Sequence[float]]) -> float:
    return min(value for run in runs for value in run)


def load_text(load: Sequence[float | None]) -> str:
    return ", ".join("n/a" if value is None else f"{value:.2f}" for value in load)


def run_ratios(numerators: Sequence[Sequence[float]], denominators: Sequence[Sequence[float]]) -> list[float]:
    """Return the ratio of the step-time medians of each repeat.

    The runs of one repeat follow each other, so load from other processes disturbs
    both sides of a ratio alike more often than it does across repeats.
    """
    return [statistics.median(top) / statistics.median(bottom) for top, bottom in zip(numerators, denominators)]


def range_text(values: Sequence[float]) -> str:
    if min(values) == max(values):
        return ratio(values[0])
    return f"{ratio(min(values))} to {ratio(max(values))}"


# ---------------------------------------------------------------------- summaries


def summarise_case(case: dict[str, Any], flops: dict[int, tuple[int, int]], ceiling_gflops: float) -> dict[str, Any]:
    """Return the case with the medians, ratios and rates that the tables and targets read."""
    from stylemodule.config import StyleConfig

    plain = pooled_median(case["plain"])
    lightning = pooled_median(case["lightning"])
    bare = pooled_median(case["bare"])
    height, width = case["image_shape"]
    step_flops, bare_flops = flops.get(case["size"], (None, None))
    gflops = step_flops / plain / 1e9 if step_flops else None
    history_bytes = None
    if case["optimizer"] == "lbfgs":
        # Two float32 vectors of the image's size per entry (L-BFGS's s and y).
        history_bytes = 2 * StyleConfig().history_size * 3 * height * width * 4
    return {
        **case,
        "image": f"{width}x{height}",
        "plain_s": plain,
        "lightning_s": lightning,
        "bare_s": bare,
        "overhead": lightning / plain,
        "plain_over_bare": plain / bare,
        "overhead_min": minimum(case["lightning"]) / minimum(case["plain"]),
        "plain_over_bare_min": minimum(case["plain"]) / minimum(case["bare"]),
        "overhead_runs": run_ratios(case["lightning"], case["plain"]),
        "plain_over_bare_runs": run_ratios(case["plain"], case["bare"]),
        "step_flops": step_flops,
        "bare_flops": bare_flops,
        "gflops": gflops,
        "ceiling_share": gflops / ceiling_gflops if gflops else None,
        "history_bytes": history_bytes,
    }


def summarise_search(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = {}
    for scheduler, result in results.items():
        trials = result["trials"]
        best = [t["best_mae"] for t in trials if t["best_mae"] is not None and math.isfinite(t["best_mae"])]
        final = [t["final_mae"] for t in trials if t["final_mae"] is not None and math.isfinite(t["final_mae"])]
        rows[scheduler] = {
            "trials": len(trials),
            "stopped_early": sum(1 for t in trials if "stopped early" in t["stop_reason"]),
            "total_steps": sum(t["steps"] for t in trials),
            "wall_s": result["wall_s"],
            "best_mae": min(best) if best else math.inf,
            "best_final_mae": min(final) if final else math.inf,
            "configs": sorted(json.dumps(t["params"], sort_keys=True) for t in trials),
            "steps_per_trial": sorted((t["steps"] for t in trials), reverse=True),
            "stop_reasons": collections.Counter(t["stop_reason"] for t in trials),
            "errored": result["errored"],
            "load": result["load"],
        }
    asha, fifo = rows["asha"], rows["fifo"]
    return {
        "rows": rows,
        "same_configs": asha["configs"] == fifo["configs"],
        "steps_ratio": asha["total_steps"] / fifo["total_steps"] if fifo["total_steps"] else math.inf,
        "wall_ratio": asha["wall_s"] / fifo["wall_s"],
        "mae_ratio": asha["best_mae"] / fifo["best_mae"] if fifo["best_mae"] > 0 else math.inf,
    }


def verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def timing_verdict(value: float, run_values: Sequence[float], limit: float) -> str:
    """Return MET when `value`, the ratio of the pooled medians, is at most `limit`, else MISSED.

    The pooled medians use every timed step, so one repeat that load from other processes
    disturbed moves them less than it moves that repeat's own ratio. The verdict counts
    the repeats whose ratios fall on the other side of the limit.
    """
    met = value <= limit
    others = sum(1 for run_value in run_values if (run_value <= limit) != met)
    if not others:
        return verdict(met)
    side = "above" if met else "within"
    return f"{verdict(met)} ({others} of {len(run_values)} repeats {side} the limit)"


def evaluate_targets(run: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Return (target, measured, result) rows computed from the measurements."""
    options, cases = run["options"], run["cases"]
    rows: list[tuple[str, str, str]] = []

    by_key = {(case["size"], case["optimizer"]): case for case in cases}
    for optimizer in OPTIMIZERS:
        target = (
            f"Lightning overhead at {OVERHEAD_TARGET_SIZE} px on the CPU, {OPTIMIZER_NAMES[optimizer]}: "
            f"Lightning / plain loop <= {OVERHEAD_TARGET:.2f}"
        )
        case = by_key.get((OVERHEAD_TARGET_SIZE, optimizer))
        if options["device"] != "cpu":
            rows.append((target, "not measured: this run used --device cuda", "not measured"))
        elif case is None:
            rows.append((target, f"not measured: {OVERHEAD_TARGET_SIZE} is not among --sizes", "not measured"))
        else:
            measured = (
                f"{case['overhead']:.3f} ({ms(case['lightning_s'])} ms / {ms(case['plain_s'])} ms); "
                f"repeats {range_text(case['overhead_runs'])}; minimums {case['overhead_min']:.3f}"
            )
            smallest = min(size for size, name in by_key if name == optimizer)
            if smallest < OVERHEAD_TARGET_SIZE:
                small = by_key[(smallest, optimizer)]
                cost = small["lightning_s"] - small["plain_s"]
                measured += (
                    f"; Lightning - plain at {smallest} px, where noise is smallest: {ms(cost)} ms, "
                    f"{cost / case['plain_s']:.1%} of this step"
                )
            rows.append((target, measured, timing_verdict(case["overhead"], case["overhead_runs"], OVERHEAD_TARGET)))

    for case in cases:
        target = (
            f"plain loop within {PLAIN_TARGET}x of bare forward+backward, {case['size']} px, "
            f"{OPTIMIZER_NAMES[case['optimizer']]}"
        )
        measured = (
            f"{case['plain_over_bare']:.3f} ({ms(case['plain_s'])} ms / {ms(case['bare_s'])} ms); "
            f"repeats {range_text(case['plain_over_bare_runs'])}; minimums {case['plain_over_bare_min']:.3f}"
        )
        rows.append((target, measured, timing_verdict(case["plain_over_bare"], case["plain_over_bare_runs"], PLAIN_TARGET)))

    search = run["search"]
    mae_target = f"ASHA's best MAE within {100 * (ASHA_MAE_TARGET - 1):.0f}% of FIFO's (same sampled configurations)"
    steps_target = f"ASHA's total steps at most {ASHA_STEPS_TARGET:.0%} of FIFO's"
    if search is None:
        rows.append((mae_target, "not measured: --skip-search", "not measured"))
        rows.append((steps_target, "not measured: --skip-search", "not measured"))
    else:
        asha, fifo = search["rows"]["asha"], search["rows"]["fifo"]
        rows.append(
            (
                mae_target,
                f"{search['mae_ratio']:.3f} ({mae_text(asha['best_mae'])} / {mae_text(fifo['best_mae'])})",
                verdict(search["mae_ratio"] <= ASHA_MAE_TARGET),
            )
        )
        rows.append(
            (
                steps_target,
                f"{search['steps_ratio']:.3f} ({asha['total_steps']} / {fifo['total_steps']} steps)",
                verdict(search["steps_ratio"] <= ASHA_STEPS_TARGET),
            )
        )

    gpu_target = f"{GPU_TARGET_STEPS} L-BFGS steps at {GPU_TARGET_SIZE} px on a GPU under {GPU_TARGET_S:.0f} s"
    gpu = run["gpu_run"]
    if gpu is None:
        reason = "not measured: no GPU" if run["machine"]["gpu"] == "none" else "not measured: run with --device cuda"
        rows.append((gpu_target, reason, "not measured"))
    elif gpu["steps"] != GPU_TARGET_STEPS:
        rows.append((gpu_target, f"not measured: --gpu-steps is {gpu['steps']}", "not measured"))
    else:
        rows.append((gpu_target, f"{gpu['lightning_s']:.2f} s under Lightning", verdict(gpu["lightning_s"] < GPU_TARGET_S)))
    return rows


# ---------------------------------------------------------------------- the document


def step_time_section(run: dict[str, Any]) -> list[str]:
    options = run["options"]
    header = [
        "size", "image", "optimizer", "runs", "Lightning (ms/step)", "plain loop (ms/step)", "Lightning - plain (ms)",
        "Lightning / plain", "its repeats", "bare fwd+bwd (ms)", "plain / bare", "its repeats",
        "both ratios from minimums", "load average at start, end",
    ]  # fmt: skip
    rows = [
        [
            case["size"], case["image"], OPTIMIZER_NAMES[case["optimizer"]], len(case["plain"]), ms(case["lightning_s"]),
            ms(case["plain_s"]), ms(case["lightning_s"] - case["plain_s"]), ratio(case["overhead"]),
            range_text(case["overhead_runs"]), ms(case["bare_s"]), ratio(case["plain_over_bare"]),
            range_text(case["plain_over_bare_runs"]),
            f"{ratio(case['overhead_min'])}, {ratio(case['plain_over_bare_min'])}", load_text(case["load"]),
        ]  # fmt: skip
        for case in run["cases"]
    ]
    return [
        "## Step time",
        "",
        f"Median over the timed steps of each case's runs ({plural(options['steps'], 'timed step')} per run, "
        f"after {plural(options['warmup'], 'warm-up step')}), on `{options['device']}`. One step is one loss "
        "evaluation with its backward pass and the optimiser update.",
        "",
        *table(header, rows),
        "",
        "- Lightning: `StyleTransferModule` fitted by `stylemodule.run.make_trainer` without "
        "checkpoints or progress bar, with evaluation and image logging set past the last step; a "
        "callback records `time.perf_counter()` at `on_train_batch_end`. Losses go to TensorBoard "
        "every 10 steps, as in a normal run.",
        "- plain loop: `module.prepare()`, the optimiser from `module.configure_optimizers()`, and "
        "`optimizer.step(closure)` with a closure that calls `module.compute_losses(module.image)` "
        "and `backward()`.",
        "- bare fwd+bwd: `module.extractor(image)` to the loss layers, the features summed, "
        "`backward()`; no losses and no optimiser. Each run has one warm-up pass, because it "
        "follows the plain and Lightning runs in the same process.",
        "- The ratios use the medians of all timed steps. its repeats: the lowest and highest ratio of "
        "the per-run medians within one repeat, in which the three kinds of run follow each other. "
        "A timing target is judged on the ratio of the medians of all timed steps; the verdict "
        "counts the repeats on the other side of the limit.",
        "- both ratios from minimums: Lightning / plain and plain / bare from the fastest timed "
        "step of each kind. Other processes only ever add time, so the minimums are the least "
        "disturbed steps.",
        "- load average: the 1-minute load average when the case's subprocess started and ended.",
        "",
    ]


def work_section(run: dict[str, Any]) -> list[str]:
    ceiling = run["ceiling"]
    header = [
        "size", "image", "optimizer", "GFLOP per step", "GFLOP per bare fwd+bwd", "plain loop GFLOP/s",
        "share of matmul ceiling", "evaluation (ms)", "MAE alone (ms)", "peak RSS, plain loop (MiB)",
        "peak RSS, process (MiB)", "L-BFGS history at 100 entries (MiB)",
    ]  # fmt: skip
    if run["options"]["device"] == "cuda":
        header[9], header[10] = "peak CUDA memory, plain loop (MiB)", "peak CUDA memory, process (MiB)"
    rows = []
    for case in run["cases"]:
        rows.append(
            [
                case["size"], case["image"], OPTIMIZER_NAMES[case["optimizer"]],
                f"{case['step_flops'] / 1e9:.2f}" if case["step_flops"] else "n/a",
                f"{case['bare_flops'] / 1e9:.2f}" if case["bare_flops"] else "n/a",
                f"{case['gflops']:.1f}" if case["gflops"] else "n/a",
                f"{case['ceiling_share']:.0%}" if case["ceiling_share"] else "n/a",
                ms(case["evaluation_s"]), ms(case["evaluation_mae_s"]), mib(case["plain_peak_bytes"]), mib(case["process_peak_bytes"]),
                mib(case["history_bytes"]) if case["history_bytes"] else "none",
            ]  # fmt: skip
        )
    size = ceiling["matmul_size"]
    return [
        "## Floating-point work and memory",
        "",
        *table(header, rows),
        "",
        "- GFLOP per step: `torch.utils.flop_counter.FlopCounterMode` around one loss evaluation "
        "and its backward pass. It counts convolutions and matrix products (the Gram matrices), "
        "not element-wise operations or the optimiser's vector arithmetic, so L-BFGS and Adam "
        "share one count. plain loop GFLOP/s is that count divided by the plain loop's step time.",
        f"- Peak arithmetic rate: the published peak of this machine is unknown. The practical "
        f"ceiling used here is the best of 5 float32 {size}x{size} matrix products, measured at "
        f"the end of each case's subprocess ({min(ceiling['rates']):.1f} to "
        f"{max(ceiling['rates']):.1f} GFLOP/s): {ceiling['matmul_gflops']:.1f} GFLOP/s with "
        f"{ceiling['threads']} torch threads. "
        "Load from other processes slows the ceiling measurement and the steps by different "
        "amounts, so under load the share can even exceed 100%.",
        "- evaluation: the median time of `module.evaluate()` (MAE, SSIM and PSNR against the "
        "512x384 reference, the generated image resized to the reference's grid), which a run "
        "performs every `eval_every` steps. MAE alone: the same resize and the mean absolute "
        "difference, without SSIM and PSNR.",
        "- peak RSS: `ru_maxrss` of the case's own subprocess. The plain loop column is read "
        "after the first plain run, before any Lightning run; the process column covers all runs. "
        f"The measured L-BFGS runs hold at most {run['options']['warmup'] + run['options']['steps'] - 1} "
        "history entries. The last column is computed, not measured: 2 x 100 float32 vectors of the "
        "image's size, which a long run with the default `history_size` adds.",
        "",
    ]


def variants_section(run: dict[str, Any]) -> list[str]:
    variants, machine, options = run["variants"], run["machine"], run["options"]
    baselines = {
        row["optimizer"]: row for row in variants["rows"] if row["name"] == "float32" and "error" not in row
    }
    rows, failures = [], []
    for row in variants["rows"]:
        cells = [OPTIMIZER_NAMES[row["optimizer"]], row["name"], row["precision"], "yes" if row["channels_last"] else "no"]
        if "error" in row:
            failures.append(f"- {OPTIMIZER_NAMES[row['optimizer']]}, {row['name']}: failed with `{row['error']}`")
            rows.append([*cells, "failed", "n/a", "n/a", "n/a", "n/a"])
            continue
        baseline = baselines.get(row["optimizer"])
        speed = row["step_s"] / baseline["step_s"] if baseline else None
        difference = row["mae"] - baseline["mae"] if baseline and row["mae"] is not None and baseline["mae"] is not None else None
        rows.append(
            [
                *cells, ms(row["step_s"]), ratio(speed), mae_text(row["mae"]),
                f"{difference:+.4f}" if difference is not None else "n/a",
                f"{row['final_loss']:.4g}" if row["final_loss"] is not None else "n/a",
            ]  # fmt: skip
        )
    header = [
        "optimizer", "variant", "precision", "channels-last", "ms/step", "time vs float32",
        f"MAE after {options['variant_steps']} steps", "MAE - float32 MAE", "final loss",
    ]  # fmt: skip
    if options["device"] == "cuda":
        native = f"Measured on the GPU ({machine['gpu']})."
    elif machine["bf16_flags"]:
        native = f"This CPU has native bf16 instructions ({', '.join(machine['bf16_flags'])} in /proc/cpuinfo)."
    else:
        native = "This CPU lists neither avx512_bf16 nor amx_bf16 in /proc/cpuinfo, so bf16 runs without native instructions."
    return [
        "## Precision and layout",
        "",
        f"Each optimiser from the same white-noise start at {variants['size']} px for "
        f"{options['variant_steps']} steps, each variant one `run_transfer` with the Lightning "
        f"precision flag and the `channels_last` config field; ms/step is the median after "
        f"{plural(options['warmup'], 'warm-up step')} of that run. {native} MAE: the mean absolute difference "
        "of RGB values in [0, 1] between the generated image and the reference, on the reference's "
        f"pixel grid. Load average at the start and end: {load_text(variants['load'])}.",
        "",
        *table(header, rows),
        "",
        *failures,
        *([""] if failures else []),
    ]


def search_section(run: dict[str, Any]) -> list[str]:
    options, search = run["options"], run["search"]
    lines = ["## Search efficiency: ASHA against FIFO", ""]
    if search is None:
        return [*lines, "Not measured: the run used --skip-search.", ""]
    header = [
        "scheduler", "trials", "errored", "stopped early", "steps per trial", "total steps", "wall time (s)",
        "best MAE", "best final MAE", "load average at start, end",
    ]  # fmt: skip
    rows = [
        [
            scheduler.upper(), row["trials"], "n/a" if row["errored"] is None else row["errored"],
            row["stopped_early"], " ".join(str(steps) for steps in row["steps_per_trial"]), row["total_steps"],
            f"{row['wall_s']:.0f}", mae_text(row["best_mae"]), mae_text(row["best_final_mae"]),
            load_text(row["load"]),
        ]  # fmt: skip
        for scheduler, row in search["rows"].items()
    ]
    return [
        *lines,
        f"`stylemodule.search.run_search` over the `paper` space, {options['search_samples']} trials "
        f"with `--sampler-seed {options['sampler_seed']}`, at {options['search_size']} px for "
        f"{options['search_steps']} L-BFGS steps, evaluation every {options['search_eval_every']} "
        f"steps, one CPU per trial; ASHA with grace period {options['grace_period']} and reduction "
        f"factor {options['reduction_factor']:g}. Trials read back with "
        "`stylemodule.report.collect_trials`: total steps is the sum over trials of the last "
        "reported step, best MAE the lowest MAE any evaluation reached, best final MAE the lowest "
        "last reported MAE. The search runs on the CPU whatever --device is.",
        "",
        *table(header, rows),
        "",
        f"- Both searches ran the same sampled configurations: {'yes' if search['same_configs'] else 'no'}.",
        *(
            f"- Stop reasons under {scheduler.upper()}: "
            + ", ".join(f"{reason} ({count})" for reason, count in sorted(row["stop_reasons"].items()))
            + "."
            for scheduler, row in search["rows"].items()
        ),
        f"- ASHA / FIFO: {search['steps_ratio']:.3f} of the steps, {search['wall_ratio']:.3f} of the "
        f"wall time, best MAE ratio {search['mae_ratio']:.3f}. Wall time includes starting Ray and "
        "each trial's start-up (loading VGG19 and computing the targets), which steps do not count.",
        "- ASHA decides at each rung from the trials that have reached it so far. Trials run "
        "concurrently, so the trials it stops and the total steps can change from run to run with "
        "the order in which trials report.",
        "",
    ]


def gpu_section(run: dict[str, Any]) -> list[str]:
    gpu = run["gpu_run"]
    lines = [f"## GPU: {GPU_TARGET_STEPS} L-BFGS steps at {GPU_TARGET_SIZE} px", ""]
    if gpu is None:
        reason = "no GPU" if run["machine"]["gpu"] == "none" else "the run used --device cpu"
        return [*lines, f"Not measured: {reason}. `--device cuda` runs it on a CUDA GPU.", ""]
    height, width = gpu["image_shape"]
    return [
        *lines,
        f"{gpu['steps']} L-BFGS steps at {width}x{height} on {run['machine']['gpu']}: "
        f"{gpu['lightning_s']:.2f} s under the Lightning Trainer (from `on_train_start` to "
        f"`on_train_end`, evaluation and image logging past the last step), "
        f"{gpu['plain_s']:.2f} s in the plain loop; MAE after the run {mae_text(gpu['mae'])}; "
        f"peak CUDA memory {mib(gpu['peak_bytes'])} MiB. The Lua neural-style reference takes about "
        "43 to 62 s for 500 iterations on a Titan X, according to its README.",
        "",
    ]


def targets_section(run: dict[str, Any]) -> list[str]:
    return ["## Targets", "", *table(["target", "measured", "result"], run["targets"]), ""]


def render(run: dict[str, Any]) -> str:
    machine, versions = run["machine"], run["versions"]
    load_start, load_end = run["load_start"], run["load_end"]
    load = (
        f"{load_start:.2f} at the start and {load_end:.2f} at the end"
        if load_start is not None and load_end is not None
        else "unknown"
    )
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/benchmark.py`; every number below comes from the run described here. "
        "Rerun the command to update the page rather than editing it.",
        "",
        f"- Command: `{run['command']}`",
        f"- Date: {run['date']}; total wall time {run['wall_s'] / 60:.1f} min",
        f"- Machine: {machine['cpu']}, {machine['cores']} logical cores, {machine['memory']} memory; "
        f"GPU: {machine['gpu']}; torch threads: {run['ceiling']['threads']}",
        "- Libraries: " + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- 1-minute load average: {load}. A load above the core count ({machine['cores']}) means "
        "other processes competed for the CPU during the run and the times are inflated and noisier.",
        "",
        *step_time_section(run),
        *work_section(run),
        *variants_section(run),
        *search_section(run),
        *gpu_section(run),
        *targets_section(run),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- orchestration


def repeats_for(options: dict[str, Any], size: int) -> int:
    """Return the runs per case: --repeats, else 3, 5 at 256 px and 1 above 256 px on the CPU.

    The overhead target is checked at 256 px, where five repeats narrow the spread. A
    512 px step takes seconds on a CPU, so three repeats there would triple the longest
    part of the run.
    """
    if options["repeats"] is not None:
        return options["repeats"]
    if size == OVERHEAD_TARGET_SIZE:
        return 5
    return 1 if options["device"] == "cpu" and size > OVERHEAD_TARGET_SIZE else 3


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Fill options not given on the command line from DEFAULTS, or from QUICK with --quick."""
    preset = QUICK if args.quick else DEFAULTS
    options = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in preset.items()}
    if options["matmul_size"] is None:
        options["matmul_size"] = 8192 if args.device == "cuda" else 2048
    options.update(
        device=args.device,
        skip_search=args.skip_search,
        sampler_seed=args.sampler_seed,
        reduction_factor=args.reduction_factor,
        gpu_steps=args.gpu_steps,
        output=args.output,
    )
    return options


def check_options(options: dict[str, Any]) -> str | None:
    """Return an error message for an option combination the run cannot use, or None."""
    if options["variant_steps"] <= options["warmup"]:
        return (
            f"--variant-steps {options['variant_steps']} leaves no timed step after "
            f"--warmup {options['warmup']}; use --variant-steps {options['warmup'] + 1} or more"
        )
    if not options["skip_search"] and not 1 <= options["grace_period"] <= options["search_steps"]:
        return f"invalid --grace-period {options['grace_period']}; use 1 to --search-steps ({options['search_steps']})"
    if not (math.isfinite(options["reduction_factor"]) and options["reduction_factor"] > 1):
        return f"invalid --reduction-factor {options['reduction_factor']}; it must be a number above 1"
    if Path(options["output"]).is_dir():
        return f"--output {options['output']} is a folder; give the path of the Markdown file to write"
    return None


def check_sizes(options: dict[str, Any], data_dir: Path) -> str | None:
    """Return an error message for a size the network cannot take, before any measuring."""
    from stylemodule.config import GATYS2016
    from stylemodule.errors import InputError
    from stylemodule.run import load_inputs

    sizes = {*options["sizes"], options["variant_size"]}
    if not options["skip_search"]:
        sizes.add(options["search_size"])
    for size in sorted(sizes):
        try:
            load_inputs(GATYS2016.replace(size=size).with_absolute_paths(data_dir))
        except InputError as error:
            return str(error)
    return None


def measure(options: dict[str, Any], data_dir: Path, folder: Path) -> dict[str, Any]:
    """Run every worker and return the measurements, summarised for the document."""
    common = {"device": options["device"], "data_dir": str(data_dir), "warmup": options["warmup"], "steps": options["steps"]}

    raw_cases, flops = [], {}
    for size in options["sizes"]:
        for optimizer in OPTIMIZERS:
            spec = {
                **common,
                "size": size,
                "optimizer": optimizer,
                "repeats": repeats_for(options, size),
                "count_flops": size not in flops,
                "matmul_size": options["matmul_size"],
            }
            case = run_child("case", spec, folder, f"{size} px, {OPTIMIZER_NAMES[optimizer]}")
            if "step_flops" in case:
                flops[size] = (case["step_flops"], case["bare_flops"])
            raw_cases.append(case)

    variants = run_child(
        "variants",
        {**common, "size": options["variant_size"], "variant_steps": options["variant_steps"]},
        folder,
        f"precision and layout at {options['variant_size']} px",
    )

    search = None
    if not options["skip_search"]:
        results = {}
        for scheduler in ("asha", "fifo"):
            spec = {
                "data_dir": str(data_dir),
                "scheduler": scheduler,
                "samples": options["search_samples"],
                "size": options["search_size"],
                "steps": options["search_steps"],
                "eval_every": options["search_eval_every"],
                "grace_period": options["grace_period"],
                "reduction_factor": options["reduction_factor"],
                "sampler_seed": options["sampler_seed"],
                "folder": str(folder / f"search-{scheduler}"),
            }
            results[scheduler] = run_child("search", spec, folder, f"search with {scheduler.upper()}")
        search = summarise_search(results)

    gpu_run = None
    if options["device"] == "cuda":
        gpu_run = run_child("gpu-run", {**common, "gpu_steps": options["gpu_steps"]}, folder, "GPU run")

    # Every case measures the matmul rate, and the best is the ceiling, because load from
    # other processes lowers some of the measurements.
    rates = [case["matmul_gflops"] for case in raw_cases]
    ceiling = {
        "matmul_size": options["matmul_size"],
        "matmul_gflops": max(rates),
        "rates": rates,
        "threads": raw_cases[0]["threads"],
        "gpu_name": raw_cases[0].get("gpu_name"),
    }
    cases = [summarise_case(case, flops, ceiling["matmul_gflops"]) for case in raw_cases]
    return {"ceiling": ceiling, "cases": cases, "variants": variants, "search": search, "gpu_run": gpu_run}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}; it must be 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark stylemodule: step time under Lightning and in a plain loop, FLOPs, "
        "memory, precision and layout, ASHA against FIFO; writes a Markdown page.",
    )
    parser.add_argument("--sizes", type=positive_int, nargs="+", help="long edges in pixels (default: 32 128 256 512)")
    parser.add_argument("--steps", type=positive_int, help="timed steps per run (default: 5)")
    parser.add_argument("--warmup", type=positive_int, help="untimed steps at the start of each run (default: 3)")
    parser.add_argument("--repeats", type=positive_int, help="runs per size and optimiser (default: 3; 5 at 256 px; 1 above 256 px on the CPU)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to measure (default: cpu)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown file to write (default: docs/benchmarks.md)")
    parser.add_argument("--data-dir", help="folder of the reference images (default: STYLEMODULE_DATA, else data/)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 32 pixels, 1 warm-up and 2 timed steps, 1 run")
    parser.add_argument("--skip-search", action="store_true", help="leave out the ASHA against FIFO searches")
    parser.add_argument("--variant-size", type=positive_int, help="long edge of the precision and layout runs (default: 128)")
    parser.add_argument("--variant-steps", type=positive_int, help="steps of each precision and layout run (default: 30)")
    parser.add_argument("--search-samples", type=positive_int, help="trials per search (default: 8)")
    parser.add_argument("--search-size", type=positive_int, help="long edge of the search trials in pixels (default: 64)")
    parser.add_argument("--search-steps", type=positive_int, help="steps per search trial (default: 60)")
    parser.add_argument("--search-eval-every", type=positive_int, help="steps between evaluations in the searches (default: 10)")
    parser.add_argument("--grace-period", type=positive_int, help="ASHA grace period in steps (default: 10)")
    parser.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA reduction factor (default: 2)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampled configurations (default: 0)")
    parser.add_argument("--gpu-steps", type=positive_int, default=GPU_TARGET_STEPS, help="L-BFGS steps of the GPU run (default: 500)")
    parser.add_argument("--matmul-size", type=positive_int, help="side of the matrices of the ceiling measurement (default: 2048 on the CPU, 8192 on a GPU)")
    # A worker is this script run again in a subprocess, so that each case has its own peak memory.
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.worker_spec, args.worker_result)

    logging.basicConfig(level=logging.INFO, format="benchmark: %(message)s", stream=sys.stderr)
    options = resolve_options(args)
    problem = check_options(options)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    import torch

    from stylemodule.data import resolve_data_dir

    cuda_available = torch.cuda.is_available()
    if options["device"] == "cuda" and not cuda_available:
        print(
            f"error: --device cuda needs a CUDA GPU, but torch {torch.__version__} finds none "
            "(torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU and its "
            "driver, or use --device cpu",
            file=sys.stderr,
        )
        return 2
    data_dir = resolve_data_dir(args.data_dir)
    missing = [name for name in REFERENCE_IMAGES if not (data_dir / name).is_file()]
    if missing:
        print(
            f"error: reference images {', '.join(missing)} not found in {data_dir}; set STYLEMODULE_DATA "
            "or --data-dir to the folder holding them, or run `stylemodule data fetch`",
            file=sys.stderr,
        )
        return 2
    problem = check_sizes(options, data_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    load_start = load_average()
    log.info("1-minute load average at the start: %s", load_start)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="stylemodule-benchmark-") as folder:
            measurements = measure(options, data_dir, Path(folder))
    except WorkerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    load_end = load_average()
    log.info("1-minute load average at the end: %s", load_end)

    # With --device cuda the name comes from a worker, so that this process creates no CUDA context.
    gpu_name = measurements["ceiling"].get("gpu_name")
    if gpu_name is None and cuda_available:
        gpu_name = torch.cuda.get_device_name(0)

    script = str(Path(__file__).resolve().relative_to(REPOSITORY))
    run = {
        **measurements,
        "options": options,
        "command": shlex.join(["python", script, *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_s": time.perf_counter() - start,
        "machine": machine_info(gpu_name),
        "versions": library_versions(),
        "load_start": load_start,
        "load_end": load_end,
    }
    run["targets"] = evaluate_targets(run)
    document = render(run)

    output = Path(options["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, document + "\n")
    print(document)
    log.info("wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
