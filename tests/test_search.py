"""Ray Tune search: spaces, a real local Ray with ASHA, restore after a kill, the report."""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stylemodule import keys, search
from stylemodule.cli import main
from stylemodule.config import GATYS2016, load_yaml
from stylemodule.errors import ConfigError, ImageError, InputError
from stylemodule.images import load_image
from stylemodule.report import RESULTS_FILE, collect_trials, write_report
from stylemodule.run import run_transfer

from conftest import CONTENT, REFERENCE, STYLE

# 4 trials of 12 steps at 32 pixels, evaluated every 3 steps: ASHA can stop at 3 and 6.
TINY_SEARCH = [
    "--samples", "4", "--size", "32", "--steps", "12", "--eval-every", "3",
    "--image-every", "12", "--checkpoint-every", "3", "--grace-period", "3", "--reduction-factor", "2",
]


def result_rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]


def trial_folders(experiment: Path) -> list[Path]:
    return sorted(path.parent for path in experiment.glob("trial_*/params.json"))


def kill_processes_using(folder: Path) -> None:
    """SIGKILL every process whose command line or environment names `folder` (Linux)."""
    marker = str(folder).encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            found = marker in (proc / "cmdline").read_bytes() or marker in (proc / "environ").read_bytes()
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if found and int(proc.name) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def png_mae(png: Path, reference: Path) -> float:
    """MAE of a PNG against the reference on the reference's grid, as the module measures it."""
    target = load_image(reference)
    image = F.interpolate(
        load_image(png).unsqueeze(0), size=tuple(target.shape[-2:]), mode="bilinear", antialias=True, align_corners=False
    )
    return float((image[0].clamp(0, 1) - target).abs().mean())


# ---------------------------------------------------------------------- spaces, no Ray


def test_tenths_compositions_cover_simplex() -> None:
    combos = search.tenths_compositions()
    assert len(combos) == 126  # C(9, 4): 10 tenths into 5 positive parts
    assert all(math.isclose(sum(c), 1.0) for c in combos)
    assert all(min(c) >= 0.1 for c in combos)
    assert len({tuple(c) for c in combos}) == 126


def test_tutorial_grid_stride_sizes_grid() -> None:
    space = search.tutorial_grid_space(stride=10)
    assert len(space["style_layer_weights"]["grid_search"]) == 13
    assert len(space["content_weight"]["grid_search"]) == 3


def test_simplex_point_sums_to_one() -> None:
    point = search.simplex_point([0.1, 0.5, 0.9, 0.3, 0.7])
    assert math.isclose(sum(point), 1.0)
    assert all(value > 0 for value in point)
    assert point[0] > point[2]  # a small draw gives a large exponential


def test_trial_config_merges_mappings() -> None:
    params = {"optimizer_settings": {"optimizer": "adam", "lr": 0.01}, "pooling": "max"}
    config = search.trial_config(params, GATYS2016)
    assert config.optimizer == "adam"
    assert config.lr == 0.01
    assert config.pooling == "max"


def test_space_file_domains(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "content_weight: {loguniform: [1.0e-6, 1.0e-2]}\n"
        "pooling: {choice: [avg, max]}\n"
        "seed: {randint: [0, 10]}\n"
        "style_layer_weights: {grid: [[0.2, 0.2, 0.2, 0.2, 0.2], [0.6, 0.1, 0.1, 0.1, 0.1]]}\n"
        "steps: 30\n"
    )
    space = search.load_space_file(path)
    assert space["steps"] == 30
    assert space["content_weight"].lower == 1e-6
    assert space["pooling"].categories == ["avg", "max"]
    assert len(space["style_layer_weights"]["grid_search"]) == 2
    search.check_space(space, GATYS2016)


def test_space_file_simplex_and_mapping(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(
        "style_layer_weights_simplex: [" + ", ".join(["{uniform: [0, 1]}"] * 5) + "]\n"
        "optimiser: {optimizer: adam, lr: 0.02}\n"
    )
    space = search.load_space_file(path)
    search.check_space(space, GATYS2016)

    config = search.trial_config({**space, search.SIMPLEX_KEY: [0.5, 0.1, 0.2, 0.3, 0.9]}, GATYS2016)
    assert math.isclose(sum(config.style_layer_weights), 1.0)
    assert len(config.style_layer_weights) == 5
    assert config.optimizer == "adam"
    assert config.lr == 0.02


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("content_weight: {lognormal: [1, 2]}\n", "unknown domain"),
        ("content_weight: {loguniform: [1]}\n", "needs a list of 2 finite numbers"),
        ("content_weight: {loguniform: [-1, 2]}\n", "invalid loguniform"),
        ("pooling: {choice: []}\n", "non-empty list"),
        ("pooling: {choice: [avg, median]}\n", "invalid pooling 'median'"),
        ("colour_weight: {uniform: [0, 1]}\n", "unknown config key 'colour_weight'"),
        ("- not a mapping\n", "must hold a mapping"),
        ("content_weight: {uniform: [-0.01, 1]}\n", "content_weight -0.01"),
        ("content_weight: {loguniform: [1.0e-1, 1.0e-7]}\n", "needs a lower bound below the upper bound"),
        ("seed: {randint: [5, 5]}\n", "needs a lower bound below the upper bound"),
        ("content_weight: {qloguniform: [1.0e-5, 1.0e-1, 0]}\n", "needs a quantisation step q above 0"),
        ("content_weight: {randn: [1, 0]}\n", "needs a standard deviation above 0"),
        ("content_weight: {uniform: [0, .inf]}\n", "2 finite numbers"),
        ("style_layer_weights_simplex: [0.5, 0.5]\n", "give a list of draws, one per style layer"),
        ("style_layer_weights_simplex: [{uniform: [0.5, 1.02]}]\n", "0 <= low < high <= 1"),
        ("style_layer_weights_simplex: [{choice: [1]}]\n", "one per style layer, each"),
        ("threads: {qrandint: [5, 1025, 5]}\n", "invalid threads 1025"),
        ("base: &b {size: 48}\nx:\n  <<: *b\n  lr: 1.0\n  lr: 2.0\n", "found the key 'lr' twice"),
        ('"a\\nb": 1\n', "unknown config key 'a.nb'"),  # the newline as the two characters \\n
        ("style_layer_weights_simplex: [{uniform: [0, 1]}]\n", "style_layer_weights has 1 values but style_layers has 5"),
        ("optimiser: {optimizer: adam, learning_rate: 0.1}\n", "unknown domain"),
        ("optimiser: {choice: [{optimizer: adam, lr: [1]}]}\n", "invalid config"),
    ],
)
def test_space_file_rejects_bad_domain(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        search.check_space(search.load_space_file(path), GATYS2016)


def test_unknown_space_lists_names() -> None:
    with pytest.raises(ConfigError, match="unknown search space 'papers'; choose one of: paper, tutorial-grid"):
        search.resolve_space("papers")


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({}, "not started"),
        ({"config.yaml": "steps: 12\n"}, "interrupted before its first evaluation"),
        ({"config.yaml": "steps: 12\n", "result.json": '{"step": 6, "mae": 0.2}\n'}, "stopped early at step 6"),
        ({"config.yaml": "steps: 12\n", "result.json": '{"step": 12, "mae": 0.2}\n'}, "max steps"),
    ],
    ids=["pending", "no-report", "asha", "finished"],
)
def test_stop_reason_from_trial_files(tmp_path: Path, files: dict[str, str], reason: str) -> None:
    trial = tmp_path / "trial_0"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    for name, text in files.items():
        (trial / name).write_text(text)

    (row,) = collect_trials(tmp_path)

    assert row.stop_reason == reason


def test_results_columns_unique(tmp_path: Path) -> None:
    trial = tmp_path / "trial_0"
    trial.mkdir()
    (trial / "params.json").write_text('{"steps": 12, "seed": 3}')
    (trial / "config.yaml").write_text("steps: 12\n")
    (trial / "result.json").write_text('{"step": 6, "mae": 0.2}\n')

    write_report(tmp_path)

    with open(tmp_path / RESULTS_FILE, newline="") as handle:
        header = next(csv.reader(handle))
    assert len(header) == len(set(header))
    assert header.count("steps") == 1
    with open(tmp_path / RESULTS_FILE, newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["steps"] == "12"
    assert row["steps_run"] == "6"


def test_trial_rewound_to_older_checkpoint(tmp_path: Path) -> None:
    trial = tmp_path / "trial_0"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    (trial / "config.yaml").write_text("steps: 12\n")
    # The first run reached step 9 (best MAE 0.1); the resumed one restarted from step 3.
    maes = [(3, 0.3), (6, 0.2), (9, 0.1), (6, 0.25)]
    (trial / "result.json").write_text("".join(json.dumps({"step": step, "mae": mae}) + "\n" for step, mae in maes))

    (row,) = collect_trials(tmp_path)

    assert row.steps == 6
    assert row.best_mae == 0.25
    assert row.final_mae == 0.25


def test_stop_reason_after_retry(tmp_path: Path) -> None:
    trial = tmp_path / "trial_00001"
    trial.mkdir()
    (trial / "params.json").write_text("{}")
    (trial / "config.yaml").write_text("steps: 12\n")
    # Reported again at 12:00:05, after the failure at 12:00:00 (local time, as Tune writes it).
    failed_at = datetime.datetime(2026, 12, 5, 12, 0, 0).timestamp()
    (trial / "result.json").write_text(json.dumps({"step": 6, "mae": 0.2, "timestamp": failed_at + 5}) + "\n")
    (trial / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-12-05_12-00-00)\n\x1b[36mThe actor\x1b[39m is unavailable\n"
    )
    state = {"trial_data": [[json.dumps({"trial_id": "00001", "status": "TERMINATED"}), "{}"]]}
    (tmp_path / "experiment_state-2026-12-05.json").write_text(json.dumps(state))

    (row,) = collect_trials(tmp_path)

    assert row.stop_reason == "stopped early at step 6 (retried after 1 failure)"

    # The same failure after the last report: the trial did not run on.
    (trial / "result.json").write_text(json.dumps({"step": 6, "mae": 0.2, "timestamp": failed_at - 5}) + "\n")
    (row,) = collect_trials(tmp_path)
    assert row.stop_reason == "error after 1 failures: The actor is unavailable"


def test_checkpoint_at_first_report_after_each_period() -> None:
    callback = search.StepReportCallback(checkpoint_every=100, max_steps=1000, filename="x.ckpt")
    # Reports every 30 steps: a checkpoint at the first report in each period of 100.
    due = [step for step in range(30, 400, 30) if callback.checkpoint_due(step)]
    assert due == [120, 210, 300]


def test_trial_without_gpu_runs_on_cpu() -> None:
    assert search.trial_accelerator(GATYS2016, []) == "cpu"
    assert search.trial_accelerator(GATYS2016, [0]) == "auto"
    assert search.trial_accelerator(GATYS2016.replace(accelerator="gpu"), []) == "gpu"


def test_plan_uses_space_fixed_steps(tmp_path: Path, data_dir: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("steps: 120\ncontent_weight: {loguniform: [1.0e-5, 1.0e-3]}\n")
    base = GATYS2016.replace(size=32).with_absolute_paths(data_dir)
    plan = search.plan_search(search.SearchSettings(space=str(space)), base)
    assert plan.settings.grace_period == 20  # a sixth of the space's steps, not the preset's 2000
    assert plan.scheduler._max_t == 120


def test_plan_resolves_space_paths(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the images are not in the working folder
    space = tmp_path / "space.yaml"
    space.write_text(
        f"style: {STYLE}\n"
        f"content: {{choice: [{CONTENT}, {STYLE}]}}\n"
        f"reference: {{grid: [{REFERENCE}]}}\n"
    )
    base = GATYS2016.replace(size=32).with_absolute_paths(data_dir)
    plan = search.plan_search(search.SearchSettings(space=str(space)), base, data_dir)

    assert plan.space["style"] == str(data_dir / STYLE)
    contents = [str(data_dir / name) for name in (CONTENT, STYLE)]
    assert plan.space["content"].categories == contents
    assert plan.space["reference"] == {"grid_search": [str(data_dir / REFERENCE)]}


def test_plan_loads_each_chosen_image(tmp_path: Path, data_dir: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(f"content: {{choice: [{CONTENT}, absent.jpg]}}\n")
    base = GATYS2016.replace(size=32).with_absolute_paths(data_dir)
    with pytest.raises(ImageError, match=f"content image not found: {data_dir / 'absent.jpg'}"):
        search.plan_search(search.SearchSettings(space=str(space)), base, data_dir)


def test_plan_rejects_space_that_samples_nothing(tmp_path: Path, data_dir: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("steps: 30\noptimiser: {optimizer: adam, lr: 0.01}\n")
    base = GATYS2016.replace(size=32).with_absolute_paths(data_dir)
    with pytest.raises(InputError, match=f"the search space {space} samples nothing"):
        search.plan_search(search.SearchSettings(space=str(space)), base)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sampler_seed": -1}, "invalid --sampler-seed -1"),
        ({"sampler_seed": 2**32}, "invalid --sampler-seed 4294967296"),
        ({"cpus_per_trial": math.nan}, "invalid --cpus-per-trial nan"),
    ],
)
def test_plan_rejects_bad_settings(data_dir: Path, settings: dict, message: str) -> None:
    base = GATYS2016.replace(size=32).with_absolute_paths(data_dir)
    with pytest.raises(InputError, match=re.escape(message)):
        search.plan_search(search.SearchSettings(**settings), base)


def test_plan_on_cluster_skips_local_memory_check(data_dir: Path) -> None:
    base = GATYS2016.replace(size=256).with_absolute_paths(data_dir)
    with pytest.raises(InputError, match="--max-concurrent 500 needs about"):
        search.plan_search(search.SearchSettings(max_concurrent=500), base)
    plan = search.plan_search(search.SearchSettings(max_concurrent=500, address="auto"), base)
    assert plan.searcher.max_concurrent == 500


def test_plan_rejects_gpu_without_gpus_per_trial(data_dir: Path) -> None:
    base = GATYS2016.replace(size=32, accelerator="gpu").with_absolute_paths(data_dir)
    with pytest.raises(InputError, match="--accelerator gpu needs --gpus-per-trial above 0"):
        search.plan_search(search.SearchSettings(), base)


def test_optuna_samples_paper_space() -> None:
    from ray.tune.search.optuna import OptunaSearch  # the test extra installs Optuna

    space = search.optuna_space(search.paper_space())
    searcher = OptunaSearch(space=space, metric=keys.TUNE_MAE, mode="min", seed=0)
    config = search.trial_config(searcher.suggest("trial-1"), GATYS2016)
    assert math.isclose(sum(config.style_layer_weights), 1.0)
    assert 1e-7 <= config.content_weight <= 1e-1


def test_concurrency_beyond_memory_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "available_memory_bytes", lambda: 16 * 10**9)
    config = GATYS2016.replace(size=512)
    with pytest.raises(InputError, match=r"--max-concurrent 64 needs about .* GB .* use --max-concurrent 3 or less"):
        search.concurrency_limit(config, 64, cpus=2, cpus_per_trial=1)


def test_trial_beyond_memory_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "available_memory_bytes", lambda: 16 * 10**9)
    config = GATYS2016.replace(size=4096)
    with pytest.raises(InputError, match=r"one trial at size 4096 needs about .* GB, but only 16.0 GB"):
        search.concurrency_limit(config, None, cpus=2, cpus_per_trial=1)


def test_concurrency_default_fits_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "available_memory_bytes", lambda: 64 * 10**9)
    config = GATYS2016.replace(size=64)
    assert search.concurrency_limit(config, None, cpus=2, cpus_per_trial=1) == 2
    assert search.concurrency_limit(config, None, cpus=2, cpus_per_trial=2) == 1


def test_largest_trial_worst_sampled_settings() -> None:
    from ray import tune

    base = GATYS2016.replace(optimizer="adam", size=64)
    space = {
        "size": tune.choice([96, 256, 128]),
        "history_size": tune.randint(10, 300),
        "optimizer_settings": tune.choice([{"optimizer": "adam", "lr": 0.01}, {"optimizer": "lbfgs", "lr": 1.0}]),
        "content_weight": tune.loguniform(1e-5, 1e-1),
    }

    largest = search.largest_trial(space, base)

    assert largest.size == 256
    assert largest.history_size == 300
    assert largest.optimizer == "lbfgs"
    assert search.largest_trial({"pooling": tune.choice(["avg", "max"])}, base) == base


def test_concurrency_default_fits_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    config = GATYS2016.replace(size=64)
    estimate = search.trial_memory_estimate(config)
    # 80% of 2.6 trial estimates leaves room for 2 trials.
    monkeypatch.setattr(search, "available_memory_bytes", lambda: int(2.6 * estimate))
    assert search.concurrency_limit(config, None, cpus=8, cpus_per_trial=1) == 2


def test_resume_rejects_folder_without_search(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["search", "--resume", str(tmp_path)]) == 2
    assert "search.yaml is missing" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--samples", "3"], "--samples was given; drop it,"),
        (["--size", "32", "--scheduler", "fifo"], "--scheduler, --size were given; drop them,"),
        (["--data-dir", "elsewhere"], "--data-dir was given"),
        (["--samples=8"], "--samples was given"),  # the default value, which would still be ignored
    ],
)
def test_resume_rejects_other_options(
    tmp_path: Path, capsys: pytest.CaptureFixture, options: list[str], named: str
) -> None:
    # Checked before the folder is read: the options would be ignored, not applied.
    assert main(["search", "--resume", str(tmp_path), *options]) == 2
    error = capsys.readouterr().err
    assert named in error
    assert "search.yaml is missing" not in error


# ---------------------------------------------------------------------- real Ray


@pytest.mark.slow
def test_asha_search_stops_trials_early(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    code = main(["search", "--space", "paper", *TINY_SEARCH, "--output", str(experiment), "--data-dir", str(data_dir)])
    assert code == 0

    trials = trial_folders(experiment)
    assert len(trials) == 4
    last_steps = [result_rows(trial)[-1][keys.TUNE_STEP] for trial in trials]
    assert min(last_steps) < 12, "ASHA stopped no trial early"
    assert max(last_steps) == 12
    for trial in trials:
        rows = result_rows(trial)
        assert all(isinstance(row[keys.TUNE_MAE], float) for row in rows)
        finite = [row for row in rows if "non-finite" not in row.get("stop_reason", "")]
        assert all(set(keys.TUNE_REPORTED) <= set(row) for row in finite)
        if finite and finite[-1][keys.TUNE_STEP] == 12:
            # The final report adds SSIM and PSNR, which only some evaluations compute.
            assert set(keys.TUNE_FINAL) <= set(finite[-1])
        assert {row["node_ip"] for row in rows} == {"127.0.0.1"}
        assert list((trial / "tensorboard").glob("events.out.tfevents.*"))
        if rows[-1][keys.TUNE_STEP] == 12:
            # ASHA stops a trial at max_t; it must still have finished its run first.
            assert rows[-1]["stop_reason"] == "max steps"
            assert (trial / "metrics.json").is_file()
        if rows[-1][keys.TUNE_MAE] < 1:
            # image.png shows the image that the last reported MAE describes, also when
            # ASHA stopped the trial between image steps (up to the PNG's rounding).
            mae = png_mae(trial / "image.png", data_dir / REFERENCE)
            assert mae == pytest.approx(rows[-1][keys.TUNE_MAE], abs=2e-3)

    with open(experiment / RESULTS_FILE, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4
    maes = [float(row["final_mae"]) for row in table]
    assert maes == sorted(maes)
    assert any(row["stop_reason"].startswith("stopped early") for row in table)
    assert (experiment / "contact_sheet.png").is_file()
    assert (experiment / "best.png").is_file()
    best = load_yaml(experiment / "best_config.yaml")
    assert best.size == 32
    assert best.accelerator == "auto"  # trials without a GPU ran on the CPU, but re-runs may use one
    # The trial's config records its thread count, and a re-run with it reaches the same MAE.
    assert best.threads == 1
    rerun = run_transfer(best.replace(steps=int(table[0]["steps_run"])), tmp_path / "rerun", progress_bar=False)
    assert rerun[keys.METRIC_MAE] == pytest.approx(float(table[0]["final_mae"]), abs=1e-6)

    # The report regenerates from the folder alone.
    (experiment / RESULTS_FILE).unlink()
    (experiment / "contact_sheet.png").unlink()
    summary = write_report(experiment)
    assert "4 trials" in summary
    with open(experiment / RESULTS_FILE, newline="") as handle:
        assert list(csv.DictReader(handle)) == table

    # A reader that stops early (`stylemodule report DIR | head`) ends the command quietly.
    report = subprocess.Popen([sys.executable, "-m", "stylemodule.cli", "report", str(experiment)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report.stdout.close()
    stderr = report.communicate()[1]
    assert "Error" not in stderr
    assert report.returncode == 1


@pytest.mark.slow
def test_relative_paths_work_from_any_folder(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "photo.jpg").write_bytes((data_dir / "Tuebingen_Neckarfront_gatys_paper_002.jpg").read_bytes())
    monkeypatch.chdir(tmp_path)
    # A storage folder contains the whole experiment, named after --output.
    code = main(
        ["search", "--space", "paper", "--samples", "1", "--size", "32", "--steps", "3", "--eval-every", "3",
         "--scheduler", "fifo", "--content", "inputs/photo.jpg", "--output", "relative-experiment",
         "--storage", "store", "--data-dir", str(data_dir)]
    )
    assert code == 0
    experiment = tmp_path / "store" / "relative-experiment"
    (trial,) = trial_folders(experiment)
    assert result_rows(trial)[-1][keys.TUNE_STEP] == 3
    saved = search.load_search_file(experiment)[1]
    assert saved.content == str(inputs / "photo.jpg")
    assert (experiment / RESULTS_FILE).is_file()
    assert not (tmp_path / "relative-experiment").exists()


@pytest.mark.slow
def test_optuna_search_runs(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    code = main(
        ["search", "--space", "paper", "--searcher", "optuna", "--samples", "2", "--size", "32", "--steps", "3",
         "--eval-every", "3", "--scheduler", "fifo", "--output", str(experiment), "--data-dir", str(data_dir)]
    )
    assert code == 0
    trials = trial_folders(experiment)
    assert len(trials) == 2
    for trial in trials:
        assert result_rows(trial)  # ran and reported (max pooling can diverge within 3 steps)
        weights = load_yaml(trial / "config.yaml").style_layer_weights
        assert math.isclose(sum(weights), 1.0)
    with open(experiment / RESULTS_FILE, newline="") as handle:
        columns = csv.DictReader(handle).fieldnames
    assert "style_layer_weights" in columns
    assert "0" not in columns  # Optuna's raw simplex draws


@pytest.mark.slow
def test_nonfinite_trial_counts_as_worst(tmp_path: Path, data_dir: Path) -> None:
    space = tmp_path / "space.yaml"
    # Adam with an absurd learning rate overflows the image within a few steps.
    space.write_text("lr: {choice: [1.0e+30]}\noptimizer: adam\n")
    experiment = tmp_path / "experiment"
    code = main(
        ["search", "--space", str(space), "--samples", "1", "--size", "32", "--steps", "9", "--eval-every", "3",
         "--scheduler", "fifo", "--output", str(experiment), "--data-dir", str(data_dir)]
    )
    assert code == 0
    (row,) = collect_trials(experiment)
    assert row.final_mae == search.WORST_MAE
    assert row.stop_reason.startswith("non-finite loss at step")
    # With no finite trial there is no best image or config to offer.
    assert "no trial reached a finite MAE" in write_report(experiment)
    assert not (experiment / "best_config.yaml").exists()
    with open(experiment / RESULTS_FILE, newline="") as handle:
        (table_row,) = list(csv.DictReader(handle))
    assert table_row["final_mae"] == "inf"  # not the 1e9 that ranks it last for ASHA


@pytest.mark.slow
def test_resume_after_driver_kill(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    command = [sys.executable, "-m", "stylemodule.cli", "search", "--space", "paper", *TINY_SEARCH,
               "--scheduler", "fifo", "--steps", "30", "--output", str(experiment), "--data-dir", str(data_dir)]
    # A Ray folder of its own marks the processes of this driver's Ray. Its path is short,
    # because Ray's Unix socket paths must stay under 108 bytes.
    ray_folder = Path(tempfile.mkdtemp(prefix="ray-test-", dir="/tmp"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_folder)}
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Wait until some trial has reported a checkpoint, then kill the driver and its Ray.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if list(experiment.glob("trial_*/checkpoint_*")) and list(experiment.glob("experiment_state-*.json")):
                break
            time.sleep(0.5)
        else:
            pytest.fail("no trial checkpoint within 180 s")
        time.sleep(2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    # Stop the Ray processes the killed driver started (its session lives on otherwise), and
    # only those: `ray stop` would also end every other Ray on the machine.
    kill_processes_using(ray_folder)
    shutil.rmtree(ray_folder, ignore_errors=True)
    steps_before = {
        trial.name: result_rows(trial)[-1][keys.TUNE_STEP] for trial in trial_folders(experiment)
        if (trial / "result.json").is_file() and result_rows(trial)
    }
    assert any(step < 30 for step in steps_before.values()), "every trial finished before the kill"
    # FIFO stops no trial, so the report calls an unfinished trial interrupted.
    write_report(experiment)
    assert "interrupted at step" in (experiment / RESULTS_FILE).read_text()

    # Tune deletes a trial's older checkpoint as soon as it saves a new one, but it saves
    # the experiment state only at intervals, so a killed driver can leave a state some
    # checkpoints behind. The test recreates that by moving a checkpoint two names ahead.
    unfinished = [trial for trial in trial_folders(experiment)
                  if list(trial.glob("checkpoint_*")) and "stop_reason" not in result_rows(trial)[-1]]
    assert unfinished, "no unfinished trial with a checkpoint"
    # A driver killed while Tune saved a checkpoint can leave the older one beside it.
    *older, newest = sorted(unfinished[0].glob("checkpoint_*"))
    for checkpoint in older:
        shutil.rmtree(checkpoint)
    index = int(newest.name.removeprefix("checkpoint_"))
    newest.rename(newest.with_name(f"checkpoint_{index + 2:06d}"))

    assert main(["search", "--resume", str(experiment)]) == 0

    trials = trial_folders(experiment)
    assert len(trials) == 4
    for trial in trials:
        steps = [row[keys.TUNE_STEP] for row in result_rows(trial)]
        assert steps[-1] == 30
        if trial.name in steps_before:
            # Continued from its checkpoint: no second run from step 3.
            assert steps.count(3) == 1, f"{trial.name} restarted from scratch: {steps}"
    with open(experiment / RESULTS_FILE, newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    for trial in trials:
        # A trial continued from its checkpoint, or restarted from scratch with its earlier
        # logs removed, shows each evaluation once.
        events = EventAccumulator(str(trial / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        mae_steps = [event.step for event in events.Scalars(keys.METRIC_MAE)]
        assert len(mae_steps) == len(set(mae_steps)), f"{trial.name}: {mae_steps}"


@pytest.mark.slow
def test_interrupted_search_exits_130(tmp_path: Path, data_dir: Path) -> None:
    experiment = tmp_path / "experiment"
    # ASHA stops no trial before step 30, so every trial still runs when Ctrl-C comes.
    command = [sys.executable, "-m", "stylemodule.cli", "search", "--space", "paper", *TINY_SEARCH,
               "--grace-period", "30", "--steps", "60", "--output", str(experiment), "--data-dir", str(data_dir)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(experiment.glob("trial_*/checkpoint_*")):
            assert time.monotonic() < deadline, "no trial checkpoint within 180 s"
            time.sleep(0.5)
        # Ctrl-C: Ray stops the experiment gracefully and Tuner.fit() returns.
        driver.send_signal(signal.SIGINT)
        _, stderr = driver.communicate(timeout=180)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    assert driver.returncode == 130, stderr[-2000:]
    assert f"continue with: stylemodule search --resume {experiment}" in stderr
    table = (experiment / RESULTS_FILE).read_text()
    assert "interrupted at step" in table
    assert "stopped early" not in table  # under ASHA too, a trial cut short is not one ASHA stopped
