"""Ray Tune search over StyleConfig with ASHA early stopping.

A search space is a mapping from config fields to Ray Tune domains; fields it does not
name keep the base config's value. Two extra forms are understood by the trainable:
`style_layer_weights_simplex` (one uniform(0, 1) draw per style layer, mapped to a
uniform point on the simplex) and any parameter whose value is a mapping of config
fields, which is merged into the config (so a `tune.choice` of mappings couples
settings such as the optimiser and its learning rate).

Every trial runs `stylemodule.run.run_transfer` in its own trial folder, so
`tensorboard --logdir EXPERIMENT` compares all trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.pytorch_lightning import TuneReportCheckpointCallback

from stylemodule import keys
from stylemodule.config import PATH_FIELDS, StyleConfig, absolute_file_setting, yaml_problem
from stylemodule.config import _YAMLLoader as YAMLLoader
from stylemodule.data import resolve_data_dir
from stylemodule.errors import ConfigError, InputError, NonFiniteLossError, short_repr
from stylemodule.files import atomic_copytree

log = logging.getLogger(__name__)

SEARCH_FILE = "search.yaml"
SIMPLEX_KEY = keys.SIMPLEX_KEY
CONFIG_KEYS = {field.name for field in StyleConfig.fields()}
# The fields that trial_memory_estimate reads.
MEMORY_FIELDS = frozenset({"size", "exact_size", "optimizer", "history_size"})
WORST_MAE = keys.WORST_MAE
TRIAL_CHECKPOINT = "checkpoint.ckpt"

# YAML domain names -> (ray.tune function, number of arguments).
DOMAINS = {
    "uniform": ("uniform", 2),
    "quniform": ("quniform", 3),
    "loguniform": ("loguniform", 2),
    "qloguniform": ("qloguniform", 3),
    "randn": ("randn", 2),
    "randint": ("randint", 2),
    "qrandint": ("qrandint", 3),
    "lograndint": ("lograndint", 2),
    "choice": ("choice", 1),
    "grid": ("grid_search", 1),
}


# ---------------------------------------------------------------------- search spaces


def tenths_compositions(parts: int = 5) -> list[list[float]]:
    """List every way to write 1 as `parts` positive multiples of 0.1, in lexicographic order."""
    combos = []
    for cuts in itertools.combinations(range(1, 10), parts - 1):
        bounds = (0, *cuts, 10)
        combos.append([round((b - a) / 10, 1) for a, b in zip(bounds, bounds[1:])])
    return combos


def paper_space() -> dict[str, Any]:
    """Around the gatys2016 preset: the factors that tutorials do not expose."""
    weights = ["caffe"]
    if torchvision_weights_cached():
        weights.append("torchvision")
    return {
        # alpha/beta with beta = 1: several decades around the paper's 8e-4.
        "content_weight": tune.loguniform(1e-7, 1e-1),
        "pooling": tune.choice(["avg", "max"]),
        "init": tune.choice(["noise", "content"]),
        "normalize": tune.choice([True, False]),
        "weights": tune.choice(weights),
        SIMPLEX_KEY: [tune.uniform(0.0, 1.0) for _ in range(5)],
        "seed": tune.randint(0, 10_000),
    }


def tutorial_grid_space(stride: int = 10) -> dict[str, Any]:
    """The tutorial's grid: style-layer weights in tenths (every `stride`-th of the 126
    compositions), three content weights, and the optimiser with its learning rate."""
    if stride < 1:
        raise ConfigError(f"invalid grid stride {stride}; use 1 (all 126 combinations) or more")
    return {
        "style_layer_weights": tune.grid_search(tenths_compositions()[::stride]),
        "content_weight": tune.grid_search([1.0, 1e-2, 1e2]),
        "optimizer_settings": tune.choice(
            [
                {"optimizer": "adam", "lr": 0.003},
                {"optimizer": "adam", "lr": 0.01},
                {"optimizer": "lbfgs", "lr": 1.0},
            ]
        ),
        "init": "content",
    }


SPACES = {"paper": ("gatys2016", paper_space), "tutorial-grid": ("tutorial", tutorial_grid_space)}


def torchvision_weights_cached() -> bool:
    import torch
    from torchvision.models import VGG19_Weights

    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG19_Weights.IMAGENET1K_V1.url).name
    return cache.is_file()


def load_space_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML search space: `field: value` fixes a field, `field: {DOMAIN: args}` searches it.

    DOMAIN is one of uniform, quniform, loguniform, qloguniform, randn, randint,
    qrandint, lograndint (with their numeric arguments as a list), choice or grid
    (with a list of values). `style_layer_weights_simplex` takes a list of domains, one
    uniform(0, 1) draw per style layer, as in the `paper` space.
    """
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=YAMLLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"search space file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"cannot read search space file {path} ({type(error).__name__}); give a YAML text file"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in search space file {path}: {yaml_problem(error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"search space file {path} must hold a mapping of setting: domain")

    space: dict[str, Any] = {}
    for key, spec in raw.items():
        if is_domain_spec(spec):
            space[key] = parse_domain(path, key, spec)
        elif key == SIMPLEX_KEY:
            if not isinstance(spec, list) or not spec or not all(is_unit_uniform(item) for item in spec):
                raise ConfigError(
                    f"{path}: {key}: give a list of draws, one per style layer, each {{uniform: [low, high]}} "
                    f"with 0 <= low < high <= 1, such as [{{uniform: [0, 1]}}, {{uniform: [0, 1]}}]; "
                    f"got {short_repr(spec)}"
                )
            space[key] = [parse_domain(path, key, item) for item in spec]
        elif isinstance(spec, dict) and not (spec and set(spec) <= CONFIG_KEYS):
            domains = ", ".join(DOMAINS)
            raise ConfigError(
                f"{path}: {key}: unknown domain {short_repr(spec)}; write a fixed value, a mapping of config "
                f"fields to set together, or one of {{DOMAIN: arguments}} with DOMAIN in: {domains}"
            )
        else:
            space[key] = spec
    return space


def is_unit_uniform(spec: Any) -> bool:
    """Return whether `spec` is `{uniform: [low, high]}` with 0 <= low < high <= 1."""
    bounds = spec.get("uniform") if isinstance(spec, dict) and len(spec) == 1 else None
    return (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(bound, (int, float)) and not isinstance(bound, bool) for bound in bounds)
        and 0 <= bounds[0] < bounds[1] <= 1
    )


def is_domain_spec(spec: Any) -> bool:
    return isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS


def parse_domain(path: Path, key: str, spec: dict[str, Any]) -> Any:
    """Build the Tune domain of a `{DOMAIN: arguments}` entry of space file `path`."""
    (name, args), = spec.items()
    function, count = DOMAINS[name]
    if count == 1:
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: {key}: {name} needs a non-empty list of values, got {short_repr(args)}")
        return getattr(tune, function)(args)
    if not isinstance(args, list) or len(args) != count or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args
    ):
        raise ConfigError(f"{path}: {key}: {name} needs a list of {count} finite numbers, got {short_repr(args)}")
    if name == "randn" and args[1] <= 0:
        raise ConfigError(f"{path}: {key}: randn{args} needs a standard deviation above 0")
    if name != "randn" and not args[0] < args[1]:
        raise ConfigError(f"{path}: {key}: {name}{args} needs a lower bound below the upper bound")
    if count == 3 and args[2] <= 0:
        raise ConfigError(f"{path}: {key}: {name}{args} needs a quantisation step q above 0")
    try:
        return getattr(tune, function)(*args)
    except (ValueError, TypeError, AssertionError) as error:
        raise ConfigError(f"{path}: {key}: invalid {name}{short_repr(args)}: {error}") from None


def resolve_space(name_or_path: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """Return (base preset name, space) for a space name or a YAML file path."""
    if name_or_path in SPACES:
        preset_name, factory = SPACES[name_or_path]
        return preset_name, factory(**options) if name_or_path == "tutorial-grid" else factory()
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).expanduser().exists():
        return "gatys2016", load_space_file(Path(name_or_path).expanduser())
    raise ConfigError(
        f"unknown search space '{name_or_path}'; choose one of: {', '.join(SPACES)}, or give a YAML file"
    )


def is_grid(domain: Any) -> bool:
    return isinstance(domain, Mapping) and "grid_search" in domain


def space_values(domain: Any) -> list[Any]:
    """Return the values a space entry can take: a choice's categories, a grid's values or
    a fixed value. A numeric domain or a missing entry gives an empty list."""
    from ray.tune.search.sample import Categorical, Domain

    if isinstance(domain, Categorical):
        return list(domain.categories)
    if is_grid(domain):
        return list(domain["grid_search"])
    if domain is None or isinstance(domain, (Domain, Mapping)):
        return []
    return [domain]


def space_mappings(space: Mapping[str, Any]) -> Iterator[tuple[Mapping[str, Any], bool]]:
    """Yield each mapping of config fields that trials merge in, and whether the space
    samples it (from a choice or grid) rather than fixing it."""
    for domain in space.values():
        if isinstance(domain, Mapping) and not is_grid(domain):
            yield domain, False
            continue
        for option in space_values(domain):
            if isinstance(option, Mapping):
                yield option, True


def setting_values(space: Mapping[str, Any], name: str) -> list[Any]:
    """Return every value that the space can give config field `name`: under its own key,
    or inside a mapping (fixed, or a choice or grid of mappings) that the trials merge in."""
    values = []
    if name in space:
        values += [None] if space[name] is None else space_values(space[name])
    values += [mapping[name] for mapping, _ in space_mappings(space) if name in mapping]
    return values


def samples_through_mapping(space: Mapping[str, Any], name: str) -> bool:
    """Return whether a choice or grid of mappings can set config field `name`."""
    return any(sampled and name in mapping for mapping, sampled in space_mappings(space))


def absolute_space_paths(space: Mapping[str, Any], data_dir: Path) -> dict[str, Any]:
    """Return the space with every image and weights path it fixes or chooses made absolute.

    Each trial runs in its own folder, so relative paths from a space file are resolved
    here, as the base config's are: in the working folder if they exist there, else in
    the data folder.
    """
    from ray.tune.search.sample import Categorical

    def absolute(key: str, value: Any) -> Any:
        if isinstance(value, Mapping) and not is_grid(value):
            # A mapping is merged into the config, so each of its keys is a setting.
            return {name: absolute_file_setting(name, item, data_dir) for name, item in value.items()}
        return absolute_file_setting(key, value, data_dir)

    resolved = {}
    for key, domain in space.items():
        if isinstance(domain, Categorical):
            values = [absolute(key, value) for value in domain.categories]
            if values != list(domain.categories):
                domain = tune.choice(values)
        elif is_grid(domain):
            domain = tune.grid_search([absolute(key, value) for value in domain["grid_search"]])
        elif key != SIMPLEX_KEY:
            domain = absolute(key, domain)
        resolved[key] = domain
    return resolved


# ---------------------------------------------------------------------- trial configs


def simplex_point(draws: list[float]) -> list[float]:
    """Map i.i.d. uniform(0, 1) draws to a uniform point on the simplex (Dirichlet(1, ..., 1)).

    -log(u) is exponentially distributed, and normalised exponentials are Dirichlet(1).
    """
    exponentials = [-math.log(max(u, 1e-12)) for u in draws]
    total = sum(exponentials)
    return [e / total for e in exponentials]


def trial_config(params: Mapping[str, Any], base: StyleConfig) -> StyleConfig:
    """Build the config of one trial from its sampled parameters."""
    values: dict[str, Any] = {}
    for key, value in params.items():
        if key == SIMPLEX_KEY:
            draws = list(value.values()) if isinstance(value, Mapping) else list(value)
            values["style_layer_weights"] = simplex_point(draws)
        elif isinstance(value, Mapping):
            values.update(value)
        else:
            values[key] = value
    return StyleConfig.from_dict(values, base=base)


def check_space(space: Mapping[str, Any], base: StyleConfig, samples: int = 3) -> None:
    """Validate a space before Ray starts: every choice and grid value, then a few samples."""
    from ray.tune.search.sample import Categorical, Float, Integer, Quantized
    from ray.tune.search.variant_generator import generate_variants

    try:
        for key, domain in space.items():
            if not isinstance(domain, Categorical) and not is_grid(domain):
                continue
            for value in space_values(domain):
                trial_config({key: value}, base)
        for key, domain in space.items():
            # Both ends of a numeric range must give a valid config, because a few samples can miss one.
            if key in CONFIG_KEYS and isinstance(domain, (Float, Integer)):
                # randint excludes its upper bound, but qrandint can round up to it (checked with Ray 2.60).
                exclusive = isinstance(domain, Integer) and not isinstance(domain.get_sampler(), Quantized)
                upper = domain.upper - 1 if exclusive else domain.upper
                for value in (domain.lower, upper):
                    if math.isfinite(value):  # randn has no bounds
                        trial_config({key: value}, base)
        rng = random.Random(0)
        variants = generate_variants(dict(space), random_state=rng.randint(0, 2**31))
        for _, variant in itertools.islice(variants, samples):
            trial_config(variant, base)
    except (ConfigError, ValueError, TypeError, ZeroDivisionError) as error:
        # Tune's domains raise ValueError for bounds such as loguniform(high, low) and
        # ZeroDivisionError for q = 0, and a choice of mappings can hold a value of the wrong type.
        raise ConfigError(f"the search space gives an invalid config: {error}") from None


# ---------------------------------------------------------------------- trainable


class StepReportCallback(TuneReportCheckpointCallback):
    """Tune's Lightning callback, reporting the optimisation step that ASHA counts in.

    `keys.TUNE_REPORTED` go to Tune at every evaluation before the last step, but a
    checkpoint only every `checkpoint_every` steps, because an L-BFGS checkpoint contains
    the whole history (29 MB at 128x96 pixels with 100 entries).
    """

    def __init__(self, checkpoint_every: int, max_steps: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint_every = checkpoint_every
        self.max_steps = max_steps
        self.saved_period = 0  # step // checkpoint_every at the last checkpoint

    def checkpoint_due(self, step: int) -> bool:
        """Tell whether the report at `step` carries a checkpoint: the first report at or
        after each multiple of `checkpoint_every`, which need not be an evaluation step."""
        period = step // self.checkpoint_every
        if period <= self.saved_period:
            return False
        self.saved_period = period
        return True

    def _get_report_dict(self, trainer: Any, pl_module: Any) -> dict[str, Any] | None:
        if trainer.global_step >= self.max_steps:
            # The trial's final report follows once the run has written its image and
            # metrics. A report here would let ASHA stop the trial at max_t before that.
            return None
        # SSIM and PSNR go only with the evaluations that computed them, because the
        # callback metrics keep an earlier evaluation's values. Tune's hooks pass
        # pl_module as None, so the module comes from the trainer.
        names = keys.TUNE_FINAL if trainer.lightning_module.image_quality_due() else keys.TUNE_REPORTED
        metrics = trainer.callback_metrics
        report = {name: float(metrics[key]) for name, key in names.items() if key in metrics}
        report[keys.TUNE_STEP] = trainer.global_step
        return report

    @contextlib.contextmanager
    def _get_checkpoint(self, trainer: Any) -> Iterator[Any]:
        if self.checkpoint_due(trainer.global_step):
            with super()._get_checkpoint(trainer) as checkpoint:
                yield checkpoint
        else:
            yield None


def trial_accelerator(config: StyleConfig, gpu_ids: list[Any]) -> str:
    """Return the Lightning accelerator of a trial: the CPU when Tune gave it no GPU and
    the config's accelerator is auto.

    Ray leaves the GPUs visible to a trial that asked for none, so Lightning's auto
    would put every such trial on the first GPU without Ray counting it. The trial's
    config keeps auto, so that its config.yaml re-runs on a GPU where there is one.
    """
    if config.accelerator == "auto" and not gpu_ids:
        return "cpu"
    return config.accelerator


def train_trial(params: dict[str, Any], base: dict[str, Any], threads: int = 1) -> None:
    """Ray Tune function trainable: one style transfer run in the trial's folder."""
    from stylemodule.run import TENSORBOARD_DIR, run_transfer

    # Tune's table is the progress display; Lightning's start-up notes would repeat per trial.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    config = trial_config(params, StyleConfig.from_dict(base))
    if not config.threads:
        # CPU results change with the thread count, so the trial's config records it for re-runs.
        config = config.replace(threads=threads)
    trial_dir = Path(tune.get_context().get_trial_dir())

    resume = None
    checkpoint = tune.get_checkpoint()
    logs = trial_dir / TENSORBOARD_DIR
    if checkpoint is None and logs.exists():
        # Tune restarted this trial before its first checkpoint: the run starts over, so its
        # earlier curves would repeat the same steps in TensorBoard.
        log.info("trial restarted from scratch; removing its earlier logs in %s", logs)
        shutil.rmtree(logs)
    if checkpoint is not None:
        # Tune restarted this trial: continue from its last reported checkpoint.
        with checkpoint.as_directory() as folder:
            resume = trial_dir / "resume.ckpt"
            shutil.copyfile(Path(folder) / TRIAL_CHECKPOINT, resume)
        log.info("resuming trial from %s", resume)

    report = StepReportCallback(
        config.checkpoint_every,
        config.steps,
        filename=TRIAL_CHECKPOINT,
        on="validation_end",
    )
    try:
        record = run_transfer(
            config,
            trial_dir,
            resume=resume,
            progress_bar=False,
            callbacks=[report],
            checkpoints=False,
            accelerator=trial_accelerator(config, ray.get_gpu_ids()),
        )
    except NonFiniteLossError as error:
        # Count the trial as worst, so that ASHA ranks it below every finite run.
        tune.report(
            {
                keys.TUNE_MAE: WORST_MAE,
                keys.TUNE_STEP: error.step,
                "stop_reason": f"non-finite loss at step {error.step}",
            }
        )
        return
    finally:
        if resume is not None:
            # A copy of Tune's checkpoint, as large as the L-BFGS history: the fit has read it.
            resume.unlink(missing_ok=True)
    final = {name: record[metric] for name, metric in keys.TUNE_FINAL.items() if metric in record}
    final.setdefault(keys.TUNE_MAE, WORST_MAE)
    tune.report({**final, keys.TUNE_STEP: record["steps"], "stop_reason": record["stop_reason"]})


# ---------------------------------------------------------------------- resources


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo, or total physical memory where that file is missing."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def trial_memory_estimate(config: StyleConfig) -> int:
    """Estimated peak host memory of one trial in bytes.

    An estimate, not a measurement: about 1.5 GB for the Python process, torch,
    Lightning and VGG19's weights, about 5 KB per pixel for VGG19's activations and
    their gradients up to relu5_1, and the L-BFGS history (two float32 vectors of the
    image's size per entry). Pixels are bounded by size^2 (the true aspect ratio is
    known only once the image is read).
    """
    pixels = config.max_image_pixels
    history = 2 * config.history_size * 3 * 4 if config.optimizer == "lbfgs" else 3 * 3 * 4
    return int(1.5e9 + pixels * (5_000 + history))


def concurrency_limit(config: StyleConfig, requested: int | None, cpus: float, cpus_per_trial: float) -> int:
    """Trials to run at once: what the CPUs and the memory allow, or the request if it fits."""
    by_memory = int(available_memory_bytes() * 0.8 // trial_memory_estimate(config))
    if by_memory < 1:
        raise InputError(
            f"one trial at {config.size_setting} needs about {trial_memory_estimate(config) / 1e9:.1f} GB, but only "
            f"{available_memory_bytes() / 1e9:.1f} GB is available; use a smaller size (--size, or the "
            "sizes in the search space), or join a cluster with --address"
        )
    by_cpus = max(1, int(cpus // cpus_per_trial))
    if requested is None:
        return min(by_memory, by_cpus)
    if requested > by_memory:
        gigabytes = trial_memory_estimate(config) / 1e9
        raise InputError(
            f"--max-concurrent {requested} needs about {requested * gigabytes:.1f} GB "
            f"({gigabytes:.1f} GB per trial at size {config.size}), but only "
            f"{available_memory_bytes() / 1e9:.1f} GB is available; use --max-concurrent "
            f"{by_memory} or less, or a smaller --size"
        )
    return requested


# ---------------------------------------------------------------------- driver


@dataclasses.dataclass
class SearchSettings:
    """Settings of a search, saved in the experiment folder for --resume and report."""

    space: str = "paper"
    samples: int = 8
    scheduler: str = "asha"
    searcher: str = "random"
    sampler_seed: int = 0
    grace_period: int | None = None  # None: a sixth of the steps
    reduction_factor: float = 2.0
    grid_stride: int = 10
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_failures: int = 2
    address: str | None = None
    storage: str | None = None
    dashboard: bool = False


SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna")


def save_search_file(folder: Path, settings: SearchSettings, base: StyleConfig) -> None:
    from stylemodule.files import atomic_write_text

    document = {"settings": dataclasses.asdict(settings), "base": base.to_dict()}
    atomic_write_text(folder / SEARCH_FILE, yaml.safe_dump(document, sort_keys=False))


def load_search_file(folder: Path) -> tuple[SearchSettings, StyleConfig]:
    path = folder / SEARCH_FILE
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "not found"
        raise InputError(
            f"experiment folder {folder} {problem}; give the --output folder of an earlier `stylemodule search`"
        )
    if not path.is_file():
        raise InputError(
            f"{folder} is not a stylemodule experiment: {SEARCH_FILE} is missing; "
            "give the --output folder of an earlier `stylemodule search`"
        )
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        return SearchSettings(**document["settings"]), StyleConfig.from_dict(document["base"])
    except (yaml.YAMLError, TypeError, KeyError) as error:
        raise InputError(
            f"invalid {path} ({error}); restore it from a backup or start a new search with --overwrite"
        ) from None


def build_scheduler(settings: SearchSettings, base: StyleConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    if settings.grace_period < 1 or settings.grace_period > base.steps:
        raise InputError(
            f"invalid --grace-period {settings.grace_period}; use 1 to --steps ({base.steps})"
        )
    if not (math.isfinite(settings.reduction_factor) and settings.reduction_factor > 1):
        raise InputError(f"invalid --reduction-factor {settings.reduction_factor}; it must be a number above 1")
    if base.eval_every >= base.steps:
        raise InputError(
            f"--eval-every {base.eval_every} leaves no evaluation before the last step ({base.steps}), "
            "and ASHA stops trials only at evaluations; lower --eval-every or use --scheduler fifo"
        )
    # ASHA compares trials at the same optimisation step, reported with every evaluation.
    return ASHAScheduler(
        time_attr=keys.TUNE_STEP,
        max_t=base.steps,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )


def build_searcher(settings: SearchSettings, limit: int | None) -> Any:
    """Random or grid sampling (seeded), or Optuna's TPE; both run at most `limit` trials at
    once, or as many as Ray's resources allow when `limit` is None."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if settings.searcher == "random":
        return BasicVariantGenerator(random_state=settings.sampler_seed, max_concurrent=limit or 0)
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401 - OptunaSearch needs it at run time
    except ImportError:
        raise InputError(
            "--searcher optuna needs Optuna: pip install 'stylemodule[optuna]', or use --searcher random"
        ) from None
    searcher = OptunaSearch(seed=settings.sampler_seed)
    return searcher if limit is None else ConcurrencyLimiter(searcher, max_concurrent=limit)


def optuna_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """Return the space in a form Optuna takes: named parameters and no grid.

    Tune names Optuna's parameters by their path in the space, which a list index breaks,
    so the simplex draws become a mapping with names 0 to 4.
    """
    grids = [key for key, domain in space.items() if isinstance(domain, Mapping) and "grid_search" in domain]
    if grids:
        raise InputError(
            f"--searcher optuna cannot sample grid values ({', '.join(grids)}); "
            "use --searcher random, or a space with choice domains"
        )
    converted = dict(space)
    if isinstance(converted.get(SIMPLEX_KEY), list):
        converted[SIMPLEX_KEY] = {str(index): draw for index, draw in enumerate(converted[SIMPLEX_KEY])}
    return converted


def start_ray(settings: SearchSettings) -> None:
    """Join a cluster (--address) or start a local Ray bound to the loopback address."""
    if ray.is_initialized():
        return
    if settings.address:
        ray.init(address=settings.address, log_to_driver=True)
        return
    # Ray turns 127.0.0.1 into the machine's reachable address unless cluster mode is
    # off, as it is on macOS and Windows; a local search needs no other host.
    # NOTE: this sets a private Ray constant, checked against ray 2.60.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        num_gpus=torch_cuda_count(),
        include_dashboard=settings.dashboard,
        dashboard_host="127.0.0.1",
        configure_logging=False,
    )


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


def make_trainable(settings: SearchSettings, base: StyleConfig) -> Any:
    threads = max(1, int(settings.cpus_per_trial))
    trainable = tune.with_parameters(train_trial, base=base.to_dict(), threads=threads)
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    return tune.with_resources(trainable, resources)


def run_config(settings: SearchSettings, folder: Path, space: Mapping[str, Any]) -> Any:
    from ray.tune import CheckpointConfig, CLIReporter, FailureConfig, RunConfig

    reporter = CLIReporter(
        parameter_columns=[key for key in space if key != SIMPLEX_KEY],
        metric_columns=[keys.TUNE_MAE, keys.TUNE_STEP],
        sort_by_metric=True,
        max_report_frequency=30,
    )
    storage = settings.storage or str(folder.parent.resolve())
    return RunConfig(
        name=folder.name,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        failure_config=FailureConfig(max_failures=settings.max_failures),
        progress_reporter=reporter,
        verbose=1,
    )


def check_inputs(space: Mapping[str, Any], base: StyleConfig) -> None:
    """Load the base config's images, every image and every weight source the space can
    choose, so that a missing file or unavailable weights fail here and not in every trial."""
    from stylemodule.run import load_inputs
    from stylemodule.vgg import WEIGHT_SOURCES, load_state_dict

    load_inputs(base)
    for key in PATH_FIELDS:
        for value in setting_values(space, key):
            if value != getattr(base, key):
                load_inputs(trial_config({key: value}, base))
    sources = {base.weights, *(str(value) for value in setting_values(space, "weights"))}
    for source in sorted(sources):
        if source in WEIGHT_SOURCES or Path(source).suffix:
            load_state_dict(source)


def trial_folder_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


@dataclasses.dataclass(frozen=True)
class SearchOutcome:
    """Outcome of a `tuner.fit()`: trials in error and whether Ctrl-C cut it short."""

    errors: int  # trials that ended in an error after their retries
    interrupted: bool  # Ctrl-C stopped the experiment before every trial finished


def fit_tuner(tuner: tune.Tuner) -> SearchOutcome:
    """Run `tuner.fit()` and tell whether Ctrl-C interrupted it.

    Tune (checked with Ray 2.60) replaces the SIGINT handler during fit(). On the first
    Ctrl-C it stops the experiment, saves its state, puts the previous handler back and
    returns normally, so a handler of ours that is back after fit() marks the interrupt.
    """
    watch = threading.current_thread() is threading.main_thread() and not int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
    )
    previous = signal.getsignal(signal.SIGINT)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if watch:
        signal.signal(signal.SIGINT, interrupt)
    try:
        results = tuner.fit()
        interrupted = watch and signal.getsignal(signal.SIGINT) is interrupt
    finally:
        if watch:
            signal.signal(signal.SIGINT, previous)
    return SearchOutcome(errors=results.num_errors, interrupted=interrupted)


def samples_anything(space: Mapping[str, Any]) -> bool:
    """Return whether the space has a domain, a grid or the style-weight simplex."""
    from ray.tune.search.sample import Domain

    return any(isinstance(value, Domain) or is_grid(value) or key == SIMPLEX_KEY for key, value in space.items())


def fixed_values(space: Mapping[str, Any], base: StyleConfig) -> StyleConfig:
    """Return the base config with the values that the space fixes, as every trial gets them."""
    from ray.tune.search.sample import Domain

    fixed = {
        key: value
        for key, value in space.items()
        if not isinstance(value, (Domain, list)) and not (isinstance(value, Mapping) and "grid_search" in value)
    }
    return trial_config(fixed, base)


def largest_trial(space: Mapping[str, Any], base: StyleConfig) -> StyleConfig:
    """Return the trial config the space can sample that needs the most memory, for the
    memory estimate.

    It tries every combination of the chosen values of the fields that the estimate reads,
    also inside mappings, with each numeric domain of `size` or `history_size` at its upper
    bound.
    """
    from ray.tune.search.sample import Categorical, Domain

    options = []
    for key, domain in space.items():
        if key in ("size", "history_size") and isinstance(domain, Domain) and hasattr(domain, "upper"):
            values = [int(domain.upper)]
        elif isinstance(domain, Categorical) or is_grid(domain):
            values = space_values(domain)
        else:
            continue  # a fixed value is already in `base`
        relevant = [
            value for value in values
            if key in MEMORY_FIELDS or (isinstance(value, Mapping) and not MEMORY_FIELDS.isdisjoint(value))
        ]
        if relevant:
            options.append([(key, value) for value in relevant])
    candidates = (trial_config(dict(combination), base) for combination in itertools.product(*options))
    return max(candidates, key=trial_memory_estimate)


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """A search that passed every check: its settings, space, scheduler and searcher."""

    settings: SearchSettings
    space: dict[str, Any]
    scheduler: Any
    searcher: Any


def plan_search(settings: SearchSettings, base: StyleConfig, data_dir: Path | None = None) -> SearchPlan:
    """Check a search's settings, space and inputs before anything is written or started.

    Relative paths in the space resolve in `data_dir` when they are not in the working
    folder. With None, they resolve in the default data folder.
    """
    if settings.scheduler not in SCHEDULERS:
        raise InputError(f"invalid --scheduler '{settings.scheduler}'; choose one of: {', '.join(SCHEDULERS)}")
    if settings.searcher not in SEARCHERS:
        raise InputError(f"invalid --searcher '{settings.searcher}'; choose one of: {', '.join(SEARCHERS)}")
    if settings.samples < 1:
        raise InputError(f"invalid --samples {settings.samples}; it must be 1 or more")
    if not 0 < settings.cpus_per_trial < math.inf:
        raise InputError(f"invalid --cpus-per-trial {settings.cpus_per_trial}; it must be a number above 0")
    if not 0 <= settings.sampler_seed < 2**32:
        # numpy's and Optuna's samplers take seeds in this range.
        raise InputError(f"invalid --sampler-seed {settings.sampler_seed}; use 0 to 2**32 - 1")
    cpus = os.cpu_count() or 1
    if not settings.address and settings.cpus_per_trial > cpus:
        # The local Ray has this machine's CPUs, so every trial would wait forever.
        raise InputError(
            f"--cpus-per-trial {settings.cpus_per_trial} is more than this machine's {cpus} CPUs; "
            f"use {cpus} or less, or join a cluster with --address"
        )
    if not 0 <= settings.gpus_per_trial < math.inf:
        raise InputError(f"invalid --gpus-per-trial {settings.gpus_per_trial}; it must be 0 or more")
    if settings.max_failures < 0:
        raise InputError(f"invalid --max-failures {settings.max_failures}; use 0 or more")
    if settings.max_concurrent is not None and settings.max_concurrent < 1:
        raise InputError(f"invalid --max-concurrent {settings.max_concurrent}; it must be 1 or more")
    if not base.reference:
        raise InputError("a search ranks its trials by MAE against the reference image, but --reference is empty; give one")
    _, space = resolve_space(settings.space, **({"stride": settings.grid_stride} if settings.space == "tutorial-grid" else {}))
    space = absolute_space_paths(space, resolve_data_dir(data_dir))
    sampled_steps = "steps" in space and not isinstance(space["steps"], (int, float))
    if sampled_steps or samples_through_mapping(space, "steps"):
        raise InputError(
            "the search space samples steps, but ASHA needs one step count for every trial; "
            "fix steps in the space or with --steps"
        )
    if any(not value for value in setting_values(space, "reference")):
        raise InputError(
            "a search ranks its trials by MAE against the reference image, but the search space "
            "sets an empty reference; remove it from the space"
        )
    if not samples_anything(space):
        raise InputError(
            f"the search space {settings.space} samples nothing, so every trial would run the same "
            "config; give at least one setting a domain, such as {choice: [...]} or {loguniform: [low, high]}"
        )
    check_space(space, base)
    fixed = fixed_values(space, base)
    check_inputs(space, fixed)
    if settings.grace_period is None:
        settings = dataclasses.replace(settings, grace_period=max(1, fixed.steps // 6))
    scheduler = build_scheduler(settings, fixed)

    if settings.gpus_per_trial > 0 and fixed.accelerator == "cpu":
        raise InputError("--gpus-per-trial is set but --accelerator is cpu; drop one of them")
    if settings.gpus_per_trial == 0 and fixed.accelerator == "gpu":
        raise InputError("--accelerator gpu needs --gpus-per-trial above 0, so that Tune gives each trial a GPU")
    if settings.gpus_per_trial > 0 and not settings.address and torch_cuda_count() == 0:
        # Tune would keep every trial pending, waiting for a GPU that never comes.
        raise InputError(
            f"--gpus-per-trial {settings.gpus_per_trial} needs a GPU, but this machine has none; "
            "drop the option, or join a cluster with GPUs with --address"
        )
    if settings.address:
        limit = settings.max_concurrent  # the cluster's resources decide, not this machine's
    else:
        limit = concurrency_limit(largest_trial(space, fixed), settings.max_concurrent, cpus, settings.cpus_per_trial)
    if settings.searcher == "optuna":
        space = optuna_space(space)
    searcher = build_searcher(settings, limit)
    return SearchPlan(settings, space, scheduler, searcher)


def run_search(
    settings: SearchSettings, base: StyleConfig, folder: Path, plan: SearchPlan | None = None
) -> SearchOutcome:
    """Run a search into `folder` and return its outcome; `plan` is the search's checked plan
    when the caller has made it already."""
    # Tune's classic progress table shows the hyperparameters beside the MAE.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Tune warns when trials checkpoint more often than every 5 s, as small ones do.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    plan = plan or plan_search(settings, base)
    settings = plan.settings
    # Ray first: a cluster that cannot be joined leaves no experiment file behind.
    start_ray(settings)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_search_file(folder, settings, base)
        tuner = tune.Tuner(
            make_trainable(settings, base),
            param_space=plan.space,
            tune_config=tune.TuneConfig(
                metric=keys.TUNE_MAE,
                mode="min",
                scheduler=plan.scheduler,
                search_alg=plan.searcher,
                num_samples=settings.samples,
                trial_dirname_creator=trial_folder_name,
            ),
            run_config=run_config(settings, folder, plan.space),
        )
        outcome = fit_tuner(tuner)
    finally:
        if not settings.address:
            ray.shutdown()
    return outcome


def cover_deleted_checkpoints(folder: Path) -> None:
    """Put each unfinished trial's newest checkpoint where Tune's saved state expects it.

    Tune keeps one checkpoint per trial (num_to_keep) and deletes the older one as soon
    as a new one is saved, but it saves the experiment state only at intervals. A driver
    killed in between leaves a state that names a deleted checkpoint, and Tune then
    cannot restore that trial (checked with Ray 2.60). A copy of the trial's newest
    checkpoint under the named path lets the trial continue from there.

    NOTE: this reads the state with Tune's own private helpers, as pinned Ray writes it.
    """
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.experiment.trial import Trial

    state_file = _find_newest_experiment_checkpoint(str(folder.resolve()))
    if state_file is None:
        return
    try:
        state = json.loads(Path(state_file).read_text(encoding="utf-8"))
        trials = []
        for trial_state, run_metadata in state["trial_data"]:
            trial = Trial.from_json_state(trial_state, stub=True)
            trial.restore_run_metadata(run_metadata)
            trials.append(trial)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"cannot restore {folder}: Tune's state file {state_file} is unreadable ({error}); "
            "start a new search into it with --overwrite"
        ) from None
    for trial in trials:
        if trial.status == Trial.TERMINATED or trial.checkpoint is None:
            continue
        named = folder / trial.storage.trial_dir_name / Path(trial.checkpoint.path).name
        newest = max(named.parent.glob("checkpoint_[0-9]*"), default=None)
        if newest is not None and not named.exists():
            log.info("copying %s to %s, which Tune's saved state names", newest, named.name)
            atomic_copytree(newest, named)


def resume_search(folder: Path) -> SearchOutcome:
    """Restore an interrupted experiment: unfinished trials continue, errored ones are retried."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    settings, base = load_search_file(folder)
    path = str(folder.resolve()) if not settings.storage else f"{settings.storage.rstrip('/')}/{folder.name}"
    if not tune.Tuner.can_restore(path):
        raise InputError(
            f"cannot restore {path}: it contains no Tune experiment state; start a new search "
            "into it with --overwrite"
        )
    if not settings.storage:
        cover_deleted_checkpoints(folder)
    start_ray(settings)
    try:
        tuner = tune.Tuner.restore(
            path, trainable=make_trainable(settings, base), resume_unfinished=True, resume_errored=True
        )
        outcome = fit_tuner(tuner)
    finally:
        if not settings.address:
            ray.shutdown()
    return outcome
