"""Results of a search: results.csv, a contact sheet of every trial, the best image and
the best config, regenerated at any time from the experiment folder alone."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont

from stylemodule import keys
from stylemodule.config import StyleConfig, dump_yaml
from stylemodule.errors import InputError
from stylemodule.files import atomic_path, atomic_write_text

RESULTS_FILE = "results.csv"
CONTACT_SHEET = "contact_sheet.png"
BEST_IMAGE = "best.png"
BEST_CONFIG = "best_config.yaml"
# Settings shown under each thumbnail of the contact sheet, when a trial varies them.
SHEET_FIELDS = ("content_weight", "pooling", "init", "normalize", "weights", "optimizer", "lr", "seed")


@dataclasses.dataclass
class TrialRow:
    """One trial of an experiment, as read back from its folder."""

    trial_id: str
    folder: Path
    params: dict[str, Any]
    config: StyleConfig | None
    final_mae: float
    best_mae: float
    steps: int
    stop_reason: str

    @property
    def image(self) -> Path | None:
        path = self.folder / "image.png"
        return path if path.is_file() else None


def read_results(folder: Path) -> list[dict[str, Any]]:
    """Return the rows of a trial's result.json, without those of a run it left behind."""
    path = folder / "result.json"
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a crash: keep what came before it
            step = row.get(keys.TUNE_STEP)
            if isinstance(step, (int, float)):
                # A trial resumed from an older checkpoint repeats steps: the run it left
                # behind from that step on no longer counts.
                rows = [earlier for earlier in rows if not earlier.get(keys.TUNE_STEP, -1) >= step]
            rows.append(row)
    return rows


def _failures(folder: Path) -> tuple[int, str, float | None]:
    """(number of failures Tune recorded for a trial, the last failure's first line, and
    its time as a Unix timestamp, or None where the header cannot be read)."""
    path = folder / "error.txt"
    if not path.is_file():
        return 0, "", None
    text = path.read_text(encoding="utf-8", errors="replace")
    blocks = text.split("Failure # ")[1:]
    last = blocks[-1].splitlines() if blocks else []
    when = None
    match = re.search(r"occurred at (\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)", last[0]) if last else None
    if match:
        # Tune writes the local time, as the results' timestamps count it.
        when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d_%H-%M-%S").timestamp()
    # Ray colours the names in its tracebacks with terminal escape codes.
    detail = re.sub(r"\x1b\[[0-9;]*m", "", last[1]).strip()[:100] if len(last) > 1 else ""
    return max(1, len(blocks)), detail, when


# Tune's statuses of a trial that has not finished.
UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def _trial_statuses(experiment: Path) -> dict[str, str]:
    """Return Tune's status of each trial id, from the newest experiment state file.

    NOTE: the file's layout is Tune's own, read here as Ray 2.60 writes it. Where it
    differs, this returns nothing, and the stop reasons come from the results alone.
    """
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return {}
    try:
        document = json.loads(states[-1].read_text(encoding="utf-8"))
        trials = [json.loads(entry[0]) for entry in document["trial_data"]]
        return {trial["trial_id"]: trial["status"] for trial in trials}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return {}


def _stop_reason(
    folder: Path,
    results: list[dict[str, Any]],
    planned_steps: int | None,
    early_stopping: bool = True,
    status: str | None = None,
) -> str:
    last = results[-1] if results else {}
    step = last.get(keys.TUNE_STEP, 0)
    failures, detail, failed_at = _failures(folder)
    # A trial that Tune retried and that reported again ran on from its checkpoint.
    ran_on = failed_at is not None and last.get("timestamp", 0) > failed_at
    if isinstance(last.get("stop_reason"), str):
        reason = last["stop_reason"]
    elif planned_steps is not None and step >= planned_steps:
        reason = "max steps"
    elif failures and (status == "ERROR" or not ran_on):
        return f"error after {failures} failures: {detail}"
    elif not results and (folder / "config.yaml").is_file():
        # The trainable writes its config first, so the trial ran but reported nothing.
        return "interrupted before its first evaluation"
    elif not results:
        return "not started"
    elif planned_steps is not None and early_stopping and status not in UNFINISHED:
        reason = f"stopped early at step {step}"
    elif planned_steps is not None:
        # Tune had not finished this trial, or a FIFO search, which stops no trial, ended first.
        reason = f"interrupted at step {step}"
    else:
        reason = "unknown"
    if failures:
        reason += f" (retried after {failures} failure{'s' if failures > 1 else ''})"
    return reason


def _scheduler(experiment: Path) -> str | None:
    """Return the scheduler named in the experiment's search.yaml, or None without one."""
    try:
        document = yaml.safe_load((experiment / "search.yaml").read_text(encoding="utf-8"))
        return document["settings"]["scheduler"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return None


def collect_trials(experiment: Path) -> list[TrialRow]:
    """Read every trial folder (one holding Tune's params.json) of an experiment."""
    rows = []
    early_stopping = _scheduler(experiment) != "fifo"
    statuses = _trial_statuses(experiment)
    for params_file in sorted(experiment.glob("*/params.json")):
        folder = params_file.parent
        params = json.loads(params_file.read_text(encoding="utf-8"))
        config = None
        if (folder / "config.yaml").is_file():
            from stylemodule.config import load_yaml

            config = load_yaml(folder / "config.yaml")
        results = read_results(folder)
        maes = [r[keys.TUNE_MAE] for r in results if isinstance(r.get(keys.TUNE_MAE), (int, float))]
        finite = [m for m in maes if math.isfinite(m)]
        steps = max((r.get(keys.TUNE_STEP, 0) for r in results), default=0)
        rows.append(
            TrialRow(
                trial_id=(results[-1].get("trial_id") if results else None) or folder.name,
                folder=folder,
                params=params,
                config=config,
                final_mae=maes[-1] if maes else math.inf,
                best_mae=min(finite) if finite else math.inf,
                steps=steps,
                stop_reason=_stop_reason(
                    folder,
                    results,
                    config.steps if config else None,
                    early_stopping,
                    statuses.get(folder.name.removeprefix("trial_")),
                ),
            )
        )
    return rows


def _flat_params(row: TrialRow) -> dict[str, Any]:
    """Return a trial's sampled parameters as config fields, mappings merged in."""
    flat = {}
    for key, value in row.params.items():
        if key == keys.SIMPLEX_KEY:
            # The raw draws (a list, or a mapping under Optuna) mean nothing to a reader.
            if row.config is not None:
                flat["style_layer_weights"] = [round(weight, 4) for weight in row.config.style_layer_weights]
        elif isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _mae_cell(mae: float) -> float:
    """Return the MAE for the table, with the worst-MAE marker of a non-finite trial as inf."""
    return math.inf if mae >= keys.WORST_MAE else mae


def write_results_csv(rows: list[TrialRow], path: Path) -> None:
    param_keys = sorted({key for row in rows for key in _flat_params(row)})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    # `steps_run`, not `steps`: a space that fixes `steps` makes it a parameter column too.
    writer.writerow(["rank", "trial_id", *param_keys, "final_mae", "best_mae", "steps_run", "stop_reason", "folder"])
    for rank, row in enumerate(rows, start=1):
        flat = _flat_params(row)
        writer.writerow(
            [rank, row.trial_id, *(flat.get(key, "") for key in param_keys),
             _mae_cell(row.final_mae), _mae_cell(row.best_mae), row.steps, row.stop_reason, row.folder.name]
        )
    atomic_write_text(path, buffer.getvalue())


def _caption(row: TrialRow, rank: int) -> list[str]:
    if row.final_mae >= keys.WORST_MAE:
        lines = [f"#{rank} MAE worst (loss not finite)"]
    elif math.isfinite(row.final_mae):
        lines = [f"#{rank} MAE {row.final_mae:.4f}"]
    else:
        lines = [f"#{rank} MAE n/a"]
    if row.config is not None:
        values = [f"{name}={getattr(row.config, name):.3g}" if isinstance(getattr(row.config, name), float)
                  else f"{name}={getattr(row.config, name)}" for name in SHEET_FIELDS]
        lines += [" ".join(values[i:i + 2]) for i in range(0, len(values), 2)]
    lines.append(row.stop_reason[:40])
    return lines


def write_contact_sheet(rows: list[TrialRow], path: Path, thumb: int = 256, columns: int = 4) -> None:
    """Tile every trial's image, best first, with its rank, MAE and key settings below.

    Images are scaled up or down, keeping their aspect, to fit a `thumb` x 3/4 `thumb` box.
    """
    font = ImageFont.load_default()
    caption_height = 13 * 7
    thumb_height = thumb * 3 // 4
    cell_width, cell_height = thumb + 16, thumb_height + caption_height + 8
    rows_count = max(1, math.ceil(len(rows) / columns))
    sheet = Image.new("RGB", (cell_width * min(columns, max(1, len(rows))), cell_height * rows_count), "white")
    draw = ImageDraw.Draw(sheet)
    for index, row in enumerate(rows):
        x, y = (index % columns) * cell_width + 8, (index // columns) * cell_height + 4
        if row.image is not None:
            with Image.open(row.image) as image:
                scale = min(thumb / image.width, thumb_height / image.height)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                sheet.paste(image.convert("RGB").resize(size, Image.Resampling.LANCZOS), (x, y))
        else:
            draw.rectangle([x, y, x + thumb, y + thumb_height], outline="grey")
            draw.text((x + 8, y + 8), "no image", fill="grey", font=font)
        for line_number, line in enumerate(_caption(row, index + 1)):
            draw.text((x, y + thumb_height + 4 + 13 * line_number), line, fill="black", font=font)
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")


def write_report(experiment: str | Path) -> str:
    """Write the report files into the experiment folder; returns a short text summary."""
    experiment = Path(experiment)
    if experiment.is_file():
        raise InputError(f"{experiment} is a file, not an experiment folder; give the --output folder of a search")
    if not experiment.is_dir():
        raise InputError(f"experiment folder not found: {experiment}; give the --output folder of a search")
    rows = collect_trials(experiment)
    if not rows:
        raise InputError(
            f"{experiment} contains no trials (no */params.json); give the --output folder of a search"
        )
    rows.sort(key=lambda row: (row.final_mae, row.best_mae))
    write_results_csv(rows, experiment / RESULTS_FILE)
    write_contact_sheet(rows, experiment / CONTACT_SHEET)

    best = rows[0]
    if not best.final_mae < keys.WORST_MAE:
        # Every trial went non-finite, errored or never reported: there is no best to copy.
        lines = [f"{len(rows)} trials in {experiment}; no trial reached a finite MAE"]
        lines.append(f"table: {experiment / RESULTS_FILE}; contact sheet: {experiment / CONTACT_SHEET}")
        return "\n".join(lines)
    lines = [f"{len(rows)} trials in {experiment}; best final MAE {best.final_mae:.4f} ({best.trial_id})"]
    if best.image is not None:
        with atomic_path(experiment / BEST_IMAGE) as temporary:
            temporary.write_bytes(best.image.read_bytes())
    if best.config is not None:
        best_config = experiment / BEST_CONFIG
        atomic_write_text(best_config, dump_yaml(best.config))
        lines.append(f"best config: {best_config} (re-run: stylemodule transfer --config {best_config})")
    lines.append(f"table: {experiment / RESULTS_FILE}; contact sheet: {experiment / CONTACT_SHEET}")
    for rank, row in enumerate(rows[:5], start=1):
        lines.append(f"  #{rank} mae={_mae_cell(row.final_mae):.4f} steps={row.steps} {row.stop_reason} {row.folder.name}")
    return "\n".join(lines)
