"""Command line: `stylemodule transfer|search|report|data`.

The options of `transfer` and `search` come from the fields of `StyleConfig`: their
names, types, defaults and help text. Each command is `main(argv)`-testable; bad
input ends with one line on stderr and exit code 2, a failed run with exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import stylemodule
from stylemodule import config as config_module
from stylemodule.config import PRESETS, StyleConfig, field_type, load_yaml, preset
from stylemodule.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, InputError, StyleModuleError

log = logging.getLogger("stylemodule")

# Files and folders of a run; --overwrite removes exactly these.
RUN_OUTPUTS = ("image.png", "config.yaml", "metrics.json", "tensorboard", "checkpoints")
CHECKPOINT_DIR = "checkpoints"
DEFAULT_PRESET = "gatys2016"


# ---------------------------------------------------------------------- config options


def _none_or(convert: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("", "none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def non_empty(convert: Any) -> Any:
    """Wrap an argparse type so that an empty value is an error, not a silent default."""

    def parse(text: str) -> Any:
        if not text.strip():
            raise argparse.ArgumentTypeError("must not be empty; leave the option out to use its default")
        return convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show an option's default in its help, unless it is None or False (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per config field; options not given stay absent so presets show through."""
    group = parser.add_argument_group("settings (defaults: the gatys2016 preset)")
    for f in StyleConfig.fields():
        base, optional = field_type(f)
        option = "--" + f.name.replace("_", "-")
        default = getattr(config_module.GATYS2016, f.name)
        # A None default means "not set", and the field's help describes that case.
        help_text = f.metadata["help"] if default is None else f"{f.metadata['help']} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if base is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        elif base is list:
            item = float if f.name == "style_layer_weights" else str
            group.add_argument(option, nargs="+", type=item, metavar="VALUE", **kwargs)
        else:
            convert = _none_or(base) if optional else base
            choices = f.metadata.get("choices")
            if choices:
                kwargs["choices"] = choices  # argparse shows them as the metavar
            else:
                kwargs["metavar"] = base.__name__.upper()
            group.add_argument(option, type=convert, **kwargs)


def config_from_args(args: argparse.Namespace, base: StyleConfig) -> StyleConfig:
    """Apply the config options given on the command line on top of `base`."""
    changes = {f.name: getattr(args, f.name) for f in StyleConfig.fields() if hasattr(args, f.name)}
    return StyleConfig.from_dict(changes, base=base)


def base_config(args: argparse.Namespace) -> StyleConfig:
    """Build the base config: the preset, then the config file (if any), before the options."""
    base = preset(args.preset or DEFAULT_PRESET)
    if args.config:
        base = load_yaml(args.config, base=base)
    return base


def add_data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="folder of the reference images (default: $STYLEMODULE_DATA, else the project's data/)",
    )


def check_output_dir(path: Path, overwrite: bool, resuming_from: Path | None = None) -> list[Path]:
    """Reject an output folder that already contains a run, unless overwriting it or
    resuming the run it contains (`resuming_from` is that run's folder).

    Returns the files and folders that `--overwrite` will remove, so that the caller can
    remove them once every other check has passed.
    """
    check_folder_path(path, "--output")
    existing = [name for name in RUN_OUTPUTS if (path / name).exists()]
    if not existing:
        return []
    if resuming_from is not None and path.resolve() == resuming_from.resolve():
        return []
    if not overwrite:
        raise InputError(
            f"output folder {path} already contains a run ({', '.join(existing)}); "
            "pass --overwrite to replace it, --resume to continue it, or choose another --output"
        )
    return [path / name for name in existing]


def check_folder_path(path: Path, option: str) -> None:
    """Reject a folder path that is, or lies under, an existing file, or that cannot be
    created or written (a read-only folder or file system)."""
    for folder in (path, *path.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                raise InputError(f"{option} {path} cannot be a folder: {folder} is a file; choose another {option}")
            if not is_writable(folder):
                raise InputError(f"{option} {path} cannot be written: {folder} is read-only; choose another {option}")
            return


def is_writable(folder: Path) -> bool:
    """Return whether files can be created in `folder` (False on a read-only file system)."""
    return os.access(folder, os.W_OK | os.X_OK)


def check_experiment_writable(folder: Path, command: str) -> None:
    """Reject an experiment folder that `command` would write into but cannot."""
    if folder.is_dir() and not is_writable(folder):
        raise InputError(
            f"experiment folder {folder} is read-only, but `{command}` writes into it; "
            "copy it to a writable folder and run the command there"
        )


def remove_paths(paths: list[Path]) -> None:
    for target in paths:
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()


# ---------------------------------------------------------------------- transfer


def transfer_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "transfer",
        help="run one style transfer",
        description="Generate one stylised image. Settings: preset < --config file < options.",
    )
    parser.add_argument(
        "--preset", type=non_empty(str), help=f"named settings: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})"
    )
    parser.add_argument("--config", type=non_empty(str), help="YAML config file, such as a run's config.yaml")
    parser.add_argument("--output", type=non_empty(Path), help="output folder (default: outputs/<preset>)")
    parser.add_argument(
        "--resume",
        type=non_empty(Path),
        help="checkpoint to continue from (a .ckpt file or a run folder); its config is the base",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_data_dir_option(parser)
    add_config_options(parser)
    parser.set_defaults(handler=run_transfer_command)


def check_accelerator(accelerator: str, cluster: bool = False) -> None:
    """Reject a GPU accelerator on a machine without CUDA before any work starts; on a
    cluster (`cluster`) the workers' GPUs count, not this machine's."""
    import torch

    if accelerator in ("gpu", "cuda") and not cluster and not torch.cuda.is_available():
        raise InputError(
            f"--accelerator {accelerator} needs a CUDA GPU, but torch finds none; use auto or cpu"
        )


def resolve_resume(path: Path) -> Path:
    if path.is_dir():
        return path / "checkpoints" / "last.ckpt"
    return path


def images_data_dir(option: str | None) -> Path:
    """Return the data folder that relative image paths resolve in; a given --data-dir must exist."""
    from stylemodule.data import data_command, resolve_data_dir

    folder = resolve_data_dir(option)
    if option and not folder.is_dir():
        if folder.exists():
            raise InputError(f"data folder {option} is a file, not a folder; give the folder that contains the images")
        raise InputError(
            f"data folder {option} not found; give the folder that contains the images, or download "
            f"them into it with `{data_command('fetch', option)}`"
        )
    return folder


def run_transfer_command(args: argparse.Namespace) -> int:
    from stylemodule.run import build_module, check_resume, load_inputs, read_checkpoint, run_transfer

    resume = resolve_resume(args.resume) if args.resume else None
    checkpoint = read_checkpoint(resume) if resume is not None else {}
    if resume is not None and not args.config:
        if args.preset is not None:
            raise InputError(
                f"--preset {args.preset} does not apply with --resume, because the checkpoint's own "
                "config is the base; drop --preset, or give --config to resume with a config file"
            )
        # The checkpoint's own config is the base, so `--resume CKPT --steps N` extends it.
        base = StyleConfig.from_dict(checkpoint["hyper_parameters"])
    else:
        base = base_config(args)
    config = config_from_args(args, base).with_absolute_paths(images_data_dir(args.data_dir))

    if args.output is not None:
        output = args.output
    elif resume is not None:
        if resume.resolve().parent.name != CHECKPOINT_DIR:
            raise InputError(
                f"checkpoint {resume} is not in a run's {CHECKPOINT_DIR}/ folder, so its run folder "
                "is unknown; pass --output for the resumed run"
            )
        output = resume.resolve().parent.parent
    else:
        output = Path("outputs") / (args.preset or DEFAULT_PRESET)
    replaced = check_output_dir(output, args.overwrite, resume.resolve().parent.parent if resume is not None else None)

    # Every check comes before --overwrite removes anything: the accelerator, the images,
    # the checkpoint, then the weights and the normalisation while the module is built.
    check_accelerator(config.accelerator)
    inputs = load_inputs(config)
    if resume is not None:
        check_resume(checkpoint, config, (1, 3, *inputs.content.shape[-2:]), resume)
    module = build_module(config, inputs)
    remove_paths(replaced)

    try:
        record = run_transfer(config, output, resume=resume, progress_bar=not args.no_progress, module=module)
    except KeyboardInterrupt:
        if (output / CHECKPOINT_DIR / "last.ckpt").is_file():
            hint = f"continue with: stylemodule transfer --resume {output}"
        else:
            hint = f"no checkpoint was saved; start again with --output {output} --overwrite"
        print(f"stylemodule transfer: interrupted; {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    summary = ", ".join(
        f"{key} {value:.4g}"
        for key, value in record.items()
        if isinstance(value, float) and (key == "final_loss" or key.startswith("metric/"))
    )
    print(f"wrote {output / 'image.png'} after {record['steps']} steps ({record['stop_reason']}); {summary}")
    return 0


# ---------------------------------------------------------------------- data


def data_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "data",
        help="download or check the reference images",
        description="Download (fetch) or check (verify) the images listed in data/manifest.tsv.",
    )
    parser.add_argument("action", choices=("fetch", "verify"))
    parser.add_argument("--force", action="store_true", help="fetch: download even files that verify")
    parser.add_argument("--timeout", type=float, default=30.0, help="fetch: timeout in seconds for connecting and for each read")
    parser.add_argument("--manifest", type=Path, help="manifest file (default: the project's data/manifest.tsv)")
    add_data_dir_option(parser)
    parser.set_defaults(handler=run_data_command)


def run_data_command(args: argparse.Namespace) -> int:
    from stylemodule import data

    data_dir = data.resolve_data_dir(args.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise InputError(f"data folder {data_dir} is a file, not a folder; give a folder with --data-dir")
    entries = data.read_manifest(args.manifest) if args.manifest else data.read_manifest()
    if args.action == "fetch":
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise InputError(f"invalid --timeout {args.timeout}; give a positive number of seconds")
        statuses = data.fetch(data_dir, entries, timeout=args.timeout, force=args.force, progress=print)
    else:
        statuses = data.verify(data_dir, entries)
    for status in statuses:
        print(f"{status.state:>16}  {status.path}")
    if not all(status.ok for status in statuses):
        data.check(data_dir, entries)  # raises DataError listing each bad file and the fix
    return 0


# ---------------------------------------------------------------------- search and report


def search_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "search",
        formatter_class=DefaultsHelpFormatter,
        help="search hyperparameters with Ray Tune and ASHA",
        description=(
            "Run many style transfer trials with Ray Tune and rank them by MAE against the "
            "reference. Config options set fixed values for every trial."
        ),
    )
    parser.add_argument(
        "--space", type=non_empty(str), default="paper", help="search space: paper, tutorial-grid or a YAML file"
    )
    parser.add_argument("--samples", type=int, default=8, help="trials to sample (per grid point for grids)")
    parser.add_argument("--output", type=non_empty(Path), help="experiment folder (default: outputs/search-<space>)")
    parser.add_argument(
        "--resume", type=non_empty(Path), metavar="EXPERIMENT", help="restore an interrupted experiment folder"
    )
    parser.add_argument(
        "--preset", type=non_empty(str), help="base settings (default: gatys2016, tutorial for tutorial-grid)"
    )
    parser.add_argument("--config", type=non_empty(str), help="YAML config file with the base settings")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default="asha", help="trial scheduler")
    parser.add_argument("--searcher", choices=("random", "optuna"), default="random",
                        help="random/grid sampling, or Optuna's TPE (needs the optuna extra)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="seed of the sampler")
    parser.add_argument("--grace-period", type=int, help="ASHA: steps before a trial can be stopped (default: steps/6)")
    parser.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/N of the trials at each rung")
    parser.add_argument("--grid-stride", type=int, default=10, help="tutorial-grid: take every N-th style weight combination")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (also torch threads)")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions share a GPU")
    parser.add_argument("--max-concurrent", type=int, help="trials at once (default: what CPUs and memory allow)")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial from its checkpoint")
    parser.add_argument("--address", help="join a Ray cluster: auto or ray://HOST:PORT (default: start a local Ray)")
    parser.add_argument(
        "--storage",
        help="where Ray stores the experiment: a folder (the experiment goes to STORAGE/<name of "
        "--output>) or a URI Ray supports (search.yaml stays in --output, the trials go to the URI)",
    )
    parser.add_argument("--dashboard", action="store_true", help="start Ray's dashboard with the local Ray")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="remove the experiment folder in --output, with everything in it, and start anew",
    )
    add_data_dir_option(parser)
    add_config_options(parser)
    parser.set_defaults(handler=run_search_command)


def check_resume_alone(args: argparse.Namespace) -> None:
    """Reject every option but --resume in `search --resume`, even one at its default value.

    A restored experiment runs with the settings saved in its folder, so other options
    would be ignored without a word.
    """
    typed_options = {token.split("=", 1)[0] for token in args.argv if token.startswith("--") and token != "--"}
    other_options = sorted(typed_options - {"--resume"})
    if other_options:
        raise InputError(
            f"search --resume restores {args.resume} with the settings saved in its "
            f"search.yaml, so it takes no other options, but {', '.join(other_options)} "
            f"{'was' if len(other_options) == 1 else 'were'} given; "
            f"drop {'it' if len(other_options) == 1 else 'them'}, or start a new search with another --output"
        )


def run_search_command(args: argparse.Namespace) -> int:
    from stylemodule import search

    if args.resume is not None:
        check_resume_alone(args)
        folder = args.resume
        check_experiment_writable(folder, "stylemodule search --resume")
        outcome = search.resume_search(folder)
    else:
        space_preset = search.SPACES.get(args.space, ("gatys2016",))[0]
        args.preset = args.preset or space_preset
        data_dir = images_data_dir(args.data_dir)
        config = config_from_args(args, base_config(args)).with_absolute_paths(data_dir)
        folder = args.output or Path("outputs") / f"search-{Path(args.space).stem}"
        storage = args.storage
        if storage and "://" not in storage:
            # A storage folder contains the experiment itself, named after --output.
            folder, storage = Path(storage) / folder.name, None
        check_folder_path(folder, "--storage" if args.storage and storage is None else "--output")
        exists = (folder / search.SEARCH_FILE).exists()
        if exists and not args.overwrite:
            raise InputError(
                f"output folder {folder} already contains an experiment; pass --resume {folder} "
                "to continue it, --overwrite to replace it, or choose another --output"
            )
        settings = search.SearchSettings(
            # A space file becomes absolute, so that --resume works from any folder.
            space=str(Path(args.space).resolve()) if Path(args.space).is_file() else args.space,
            samples=args.samples,
            scheduler=args.scheduler,
            searcher=args.searcher,
            sampler_seed=args.sampler_seed,
            grace_period=args.grace_period,
            reduction_factor=args.reduction_factor,
            grid_stride=args.grid_stride,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            max_concurrent=args.max_concurrent,
            max_failures=args.max_failures,
            address=args.address,
            storage=storage,
            dashboard=args.dashboard,
        )
        check_accelerator(config.accelerator, cluster=args.address is not None)
        plan = search.plan_search(settings, config, data_dir)
        if exists:
            # Every check has passed, so the old experiment can go.
            shutil.rmtree(folder)
        outcome = search.run_search(plan.settings, config, folder, plan)

    return finish_search(folder, outcome)


def finish_search(folder: Path, outcome: Any) -> int:
    """Print the report of a finished or interrupted search and return the exit code."""
    from stylemodule import search
    from stylemodule.report import write_report

    settings, _ = search.load_search_file(folder)
    if settings.storage:
        # NOTE: the report reads the trial folders from disk; a URI storage keeps them remote.
        print(
            f"the trials are in {settings.storage.rstrip('/')}/{folder.name}; copy that folder "
            f"here and run `stylemodule report` on it for results.csv and the contact sheet"
        )
    else:
        try:
            print(write_report(folder))
        except InputError as error:
            # A search stopped before any trial started has nothing to report.
            if not outcome.interrupted:
                raise
            print(f"no report: {error}", file=sys.stderr)
    if outcome.interrupted:
        # Ray stops the experiment gracefully on Ctrl-C and fit() returns.
        print(f"stylemodule search: interrupted; continue with: stylemodule search --resume {folder}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.errors:
        print(
            f"stylemodule search: {outcome.errors} trials ended in an error; see {folder / 'results.csv'}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


def report_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the results table and contact sheet of a search",
        description="Regenerate results.csv, contact_sheet.png, best.png and best_config.yaml of a search.",
    )
    parser.add_argument("experiment", type=Path, help="experiment folder written by `stylemodule search`")
    parser.set_defaults(handler=run_report_command)


def run_report_command(args: argparse.Namespace) -> int:
    from stylemodule.report import write_report

    check_experiment_writable(args.experiment, "stylemodule report")
    print(write_report(args.experiment))
    return 0


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylemodule", description=" ".join(stylemodule.__doc__.split()))
    subparsers = parser.add_subparsers(dest="command", required=True)
    transfer_parser(subparsers)
    search_parser(subparsers)
    report_parser(subparsers)
    data_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        print("stylemodule: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # pytorch-lightning 2.6 builds a pytree LeafSpec that torch 2.14 deprecates.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe fails here, not in Python's shutdown
        return code
    except BrokenPipeError:
        # The process reading stdout has exited (`stylemodule report DIR | head`): discard the rest.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except InputError as error:
        print(f"stylemodule {args.command}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except StyleModuleError as error:
        print(f"stylemodule {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"stylemodule {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
