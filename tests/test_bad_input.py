"""Bad input through the command line: one clear message and exit code 2, before any
work starts (no Ray, no output files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stylemodule.cli import EXIT_BAD_INPUT, main


def run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == EXIT_BAD_INPUT
    return capsys.readouterr().err


def test_unknown_search_space(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = run_error(["search", "--space", "papers", "--output", str(tmp_path / "x")], capsys)
    assert "unknown search space 'papers'" in error
    assert "paper, tutorial-grid" in error
    assert not (tmp_path / "x").exists()


def test_invalid_tune_domain_in_space_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("content_weight: {logarithmic: [1.0e-6, 1.0e-2]}\n")
    error = run_error(["search", "--space", str(space), "--output", str(tmp_path / "x")], capsys)
    assert "content_weight: unknown domain" in error
    assert "loguniform" in error
    assert not (tmp_path / "x").exists()


def test_too_many_concurrent_trials(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = run_error(
        ["search", "--size", "256", "--max-concurrent", "500", "--output", str(tmp_path / "x")], capsys
    )
    assert "--max-concurrent 500 needs about" in error
    assert "or a smaller --size" in error
    assert not (tmp_path / "x").exists()


def test_wrong_type_in_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("steps: many\n")
    error = run_error(["transfer", "--config", str(config), "--output", str(tmp_path / "run")], capsys)
    assert "invalid value 'many' for steps: expected an integer" in error
    assert str(config) in error


def test_existing_experiment_needs_resume_or_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "search.yaml").write_text("settings: {}\n")
    error = run_error(["search", "--output", str(folder)], capsys)
    assert "already contains an experiment" in error
    assert f"--resume {folder}" in error


def test_data_file_with_wrong_sha256(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = b"not the photo"
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "name\turl\tsha256\tsize\n"
        f"photo.jpg\thttp://127.0.0.1:9/photo.jpg\t{'0' * 64}\t{len(payload)}\n"
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "photo.jpg").write_bytes(payload)
    error = run_error(["data", "verify", "--manifest", str(manifest), "--data-dir", str(data_dir)], capsys)
    assert "photo.jpg" in error
    assert "sha256 mismatch" in error.lower() or "sha-256" in error.lower()


def test_manifest_name_outside_data_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text(
        "name\turl\tsha256\tsize\n"
        f"../escape.jpg\thttp://127.0.0.1:9/escape.jpg\t{'0' * 64}\t10\n"
    )
    error = run_error(["data", "fetch", "--manifest", str(manifest), "--data-dir", str(tmp_path / "d")], capsys)
    assert "'../escape.jpg' would write outside the data folder" in error
    assert not (tmp_path / "escape.jpg").exists()


class Payload:
    """A pickled object whose unpickling creates folder `marker`; a weights_only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_checkpoint_with_code_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    checkpoint = tmp_path / "evil.ckpt"
    marker = tmp_path / "unpickled-code-ran"
    torch.save({"state_dict": {}, "payload": Payload(marker)}, checkpoint)
    error = run_error(["transfer", "--resume", str(checkpoint), "--output", str(tmp_path / "run")], capsys)
    assert f"cannot read checkpoint {checkpoint}" in error
    assert not marker.exists()


def test_local_ray_binds_loopback_without_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import ray_constants

    from stylemodule import search

    calls = []
    monkeypatch.setattr(search.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(search.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    search.start_ray(search.SearchSettings())
    (kwargs,) = calls
    assert kwargs["include_dashboard"] is False
    assert "address" not in kwargs
    assert ray_constants.ENABLE_RAY_CLUSTER is False  # node address resolves to 127.0.0.1


def test_gpus_per_trial_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    error = run_error(["search", "--gpus-per-trial", "0.5", "--output", str(tmp_path / "x")], capsys)
    assert "--gpus-per-trial 0.5 needs a GPU, but this machine has none" in error
    assert not (tmp_path / "x").exists()


def test_search_missing_content_before_ray(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = run_error(
        ["search", "--content", str(tmp_path / "no-photo.jpg"), "--output", str(tmp_path / "x")], capsys
    )
    assert "content image not found" in error
    assert "no-photo.jpg" in error
    assert not (tmp_path / "x").exists()


def test_gpu_accelerator_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    error = run_error(["transfer", "--accelerator", "gpu", "--output", str(tmp_path / "run")], capsys)
    assert "--accelerator gpu needs a CUDA GPU" in error


@pytest.mark.slow
def test_resume_into_other_run_rejected(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--size", "32", "--steps", "2", "--no-progress", "--data-dir", str(data_dir)]
    assert main(["transfer", *tiny, "--output", str(tmp_path / "a")]) == 0
    assert main(["transfer", *tiny, "--output", str(tmp_path / "b")]) == 0
    before = (tmp_path / "b" / "image.png").read_bytes()
    error = run_error(
        ["transfer", "--resume", str(tmp_path / "a"), "--steps", "4", "--output", str(tmp_path / "b"),
         "--no-progress", "--data-dir", str(data_dir)],
        capsys,
    )
    assert "already contains a run" in error
    assert (tmp_path / "b" / "image.png").read_bytes() == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--reduction-factor", "nan"], "invalid --reduction-factor nan"),
        (["--eval-every", "10"], "--eval-every 10 leaves no evaluation before the last step (6)"),
    ],
    ids=["reduction-factor", "eval-every"],
)
def test_asha_settings_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    error = run_error(["search", "--size", "32", "--steps", "6", *options, "--output", str(tmp_path / "x")], capsys)
    assert message in error
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("options", "space", "message"),
    [
        (["--reference", ""], None, "--reference is empty"),
        ([], "steps: {choice: [10, 20]}\n", "the search space samples steps"),
        (["--searcher", "optuna", "--eval-every", "2"], "content_weight: {grid: [1.0e-3, 1.0e-4]}\n", "--searcher optuna cannot sample grid values"),
        (["--max-concurrent", "0"], None, "invalid --max-concurrent 0"),
        (["--gpus-per-trial", "-1"], None, "invalid --gpus-per-trial -1.0; it must be 0 or more"),
        (["--cpus-per-trial", "4096"], None, "--cpus-per-trial 4096.0 is more than this machine's"),
        ([], "pooling: {choice: [avg, max]}\nreference: null\n", "the search space sets an empty reference"),
        ([], "bundle: {grid: [{steps: 4, lr: 0.5}, {steps: 8, lr: 0.5}]}\n", "the search space samples steps"),
        ([], "pair: {choice: [{content: absent.jpg, lr: 0.5}]}\n", "content image not found"),
    ],
    ids=[
        "no-reference", "sampled-steps", "optuna-grid", "max-concurrent", "gpus-per-trial", "cpus-per-trial",
        "space-reference", "mapping-steps", "mapping-content",
    ],
)
def test_search_plan_rejected(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], space: str | None, message: str
) -> None:
    if space is not None:
        (tmp_path / "space.yaml").write_text(space)
        options = [*options, "--space", str(tmp_path / "space.yaml")]
    error = run_error(["search", "--size", "32", "--steps", "6", *options, "--output", str(tmp_path / "x")], capsys)
    assert message in error
    assert not (tmp_path / "x").exists()


def test_space_file_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "space.yaml"
    folder.mkdir()
    error = run_error(["search", "--space", str(folder), "--output", str(tmp_path / "x")], capsys)
    assert f"cannot read search space file {folder}" in error


def test_overwrite_keeps_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "experiment"
    folder.mkdir()
    (folder / "search.yaml").write_text("settings: {}\n")
    error = run_error(["search", "--output", str(folder), "--overwrite", "--samples", "0"], capsys)
    assert "invalid --samples 0" in error
    assert (folder / "search.yaml").exists()  # removed only once every check has passed


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_fetch_timeout_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    error = run_error(["data", "fetch", "--timeout", timeout, "--data-dir", str(tmp_path / "d")], capsys)
    assert "invalid --timeout" in error
    assert not (tmp_path / "d").exists()


def test_data_dir_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    error = run_error(["data", "verify", "--data-dir", str(not_a_folder)], capsys)
    assert f"data folder {not_a_folder} is a file, not a folder" in error


def test_search_help_states_each_default_once(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: outputs/search-<space>)" in text
    assert ") (default: None)" not in text  # argparse's default after one stated in the help
    assert "(default: asha)" in text


@pytest.mark.parametrize("command", ["transfer", "search"])
def test_config_help_omits_none_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: 0.0008)" in text  # content_weight of the gatys2016 preset


def test_long_style_image_too_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    painting = tmp_path / "long.png"
    Image.new("RGB", (4000, 20), "navy").save(painting)  # 16 pixels high at the content's area
    error = run_error(
        ["transfer", "--style", str(painting), "--style-size", "area", "--size", "32",
         "--output", str(tmp_path / "run")],
        capsys,
    )  # fmt: skip
    assert f"style image {painting} resized to the content's area is" in error
    assert "use style_size content" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["transfer", "search"])
def test_output_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("")
    error = run_error([command, "--output", str(blocker / "run")], capsys)
    assert f"{blocker} is a file; choose another --output" in error


def test_report_on_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "results.csv"
    blocker.write_text("")
    error = run_error(["report", str(blocker)], capsys)
    assert f"{blocker} is a file, not an experiment folder" in error


@pytest.mark.parametrize("command", ["transfer", "search"])
def test_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    absent = tmp_path / "no-data"
    error = run_error([command, "--data-dir", str(absent), "--output", str(tmp_path / "x")], capsys)
    assert f"data folder {absent} not found" in error
    assert f"stylemodule data fetch --data-dir {absent}" in error
    assert not (tmp_path / "x").exists()


def test_resume_missing_experiment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "no-experiment"
    error = run_error(["search", "--resume", str(absent)], capsys)
    assert f"experiment folder {absent} not found" in error


def test_data_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("")
    error = run_error(["transfer", "--data-dir", str(blocker), "--output", str(tmp_path / "x")], capsys)
    assert f"data folder {blocker} is a file, not a folder" in error


@pytest.mark.parametrize("threads", ["-1", "1025", "99999999999"])
def test_threads_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], threads: str) -> None:
    error = run_error(["transfer", "--threads", threads, "--output", str(tmp_path / "x")], capsys)
    assert f"invalid threads {threads}" in error
    assert "up to 1024" in error


def test_resume_unreadable_tune_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stylemodule import search
    from stylemodule.config import GATYS2016

    search.save_search_file(tmp_path, search.SearchSettings(), GATYS2016)
    (tmp_path / "tuner.pkl").write_bytes(b"")  # the file that Tune's can_restore checks for
    state = tmp_path / "experiment_state-2026-12-05_00-00-00.json"
    state.write_text('{"trial_data": [["unterminated')
    error = run_error(["search", "--resume", str(tmp_path)], capsys)
    assert f"Tune's state file {state} is unreadable" in error
    assert "--overwrite" in error


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("transfer", "--output"), ("transfer", "--preset"), ("transfer", "--config"), ("transfer", "--resume"),
        ("search", "--output"), ("search", "--space"), ("search", "--preset"), ("search", "--config"),
    ],
)
def test_empty_option_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, option: str
) -> None:
    monkeypatch.chdir(tmp_path)  # an empty --output used to mean the working folder
    with pytest.raises(SystemExit) as raised:
        main([command, option, ""])
    assert raised.value.code == EXIT_BAD_INPUT
    assert f"argument {option}: must not be empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["transfer", "search"])
def test_read_only_output_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Root ignores permission bits, so the test marks the folder read-only for os.access,
    # as a read-only file system would make it.
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: Path(path) != locked and access(path, mode, **kwargs))

    error = run_error([command, "--size", "32", "--output", str(locked / "run")], capsys)

    assert f"--output {locked / 'run'} cannot be written: {locked} is read-only" in error
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("command", [["report"], ["search", "--resume"]], ids=["report", "resume"])
def test_read_only_experiment_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    experiment = tmp_path / "experiment"
    experiment.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: Path(path) != experiment and access(path, mode, **kwargs))

    error = run_error([*command, str(experiment)], capsys)

    assert f"experiment folder {experiment} is read-only, but `stylemodule {' '.join(command)}` writes into it" in error
    assert list(experiment.iterdir()) == []
