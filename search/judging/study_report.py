"""What a study has found: its summary, its ranked trials, parameter importances and Optuna's plots.

One summary type (:class:`StudySummary`) serves the line printed at the end of
``mbu search``, ``mbu search --summary`` and ``study_report.{md,json}``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import optuna

from mbu.base.files import atomic_write, write_json
from mbu.base.run_files import MARKDOWN_FILE, REPORT_FILE
from mbu.data.files import disk_used, human_bytes
from mbu.evaluate.segmentation import figure_warnings
from mbu.search.judging.confirm_report import CONFIRM_REPORT_JSON, CONFIRM_REPORT_MD, summary_lines
from mbu.search.judging.race import best_run_folder, incumbent, seed_count
from mbu.search.judging.race_report import RaceSummary, cost_line, incumbent_lines, race_markdown, race_summary
from mbu.search.launching.storage import count_states
from mbu.search.running.tracking import ui_command
from mbu.search.studyfile.study_file import trial_name

STUDY_REPORT_JSON = "study_report.json"
STUDY_REPORT_MD = "study_report.md"
SUMMARY_METRICS = ("val/iou_best", "val/threshold_best", "test/iou", "test/iou_oracle", "baseline/iou_all_ones")
# Below this many complete trials, importances are mostly the sampler's noise: shown, but flagged.
FEW_TRIALS_FOR_IMPORTANCE = 10
# Optuna's plots (matplotlib backend), file name -> (function name, title in the report).
PLOTS = {
    "optimization_history.png": ("plot_optimization_history", "Optimization history"),
    "parallel_coordinate.png": ("plot_parallel_coordinate", "Parameters against the objective"),
    "param_importances.png": ("plot_param_importances", "Parameter importances"),
    "slice.png": ("plot_slice", "Objective against each parameter"),
}


@dataclass
class StudySummary:
    """Trials by state and the best trial, read from the storage."""

    study_name: str
    storage: str
    tracking_uri: str
    states: dict[str, int]  # trial count by state
    best_params: dict[str, float] = field(default_factory=dict)
    best_number: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)  # the best trial's report metrics
    wall_seconds: float = 0.0
    failed: list[tuple[int, str]] = field(default_factory=list)  # this launch's failed trials: (number, error)
    stopped_on_failures: bool = False  # the launch gave up after max_failures failed trials in a row
    stopped_by: str | None = None  # a stop was asked (a signal): its trials were checkpointed and queued to resume
    target: int = 0  # the finished trials the launch aimed at (its resolved n_trials)
    confirmation: list[str] = field(default_factory=list)  # the verdict on fresh seeds, or how to get one
    confirm_problem: str | None = None  # the confirmation ended short (failed runs), said on stderr
    race: RaceSummary | None = None  # a racing study's configurations and cost

    @classmethod
    def of(cls, study: optuna.Study, storage: str, tracking_uri: str) -> StudySummary:
        summary = cls(study.study_name, storage, tracking_uri, count_states(study))
        summary.race = race_summary(study) if seed_count(study) > 1 else None
        best = incumbent(study)  # a racing study's: the configuration holding the crown
        if best is not None:
            summary.best_number = best.number
            summary.best_params = dict(best.params)
            summary.best_metrics = {k: v for k, v in best.user_attrs.items() if isinstance(v, float)}
        return summary

    def format(self) -> str:
        lines = [f"study {self.study_name}: " + ", ".join(f"{n} {s}" for s, n in sorted(self.states.items()))]
        if self.race is not None:
            lines += [cost_line(self.race), *incumbent_lines(self.race)]
        if self.best_number is None:
            if self.race is None:
                lines.append("no trial has completed yet")
        else:
            if self.race is not None:
                lines.append(f"trial {self.best_number}'s parameters, and its figures averaged over its seeds:")
            else:
                lines.append(f"best trial: #{self.best_number}")
            shown = [k for k in SUMMARY_METRICS if k in self.best_metrics]
            width = max(len(k) for k in [*self.best_params, *shown])
            for key, value in sorted(self.best_params.items()):
                lines.append(f"  {key:<{width}}  {value:.6g}")
            for key in shown:
                lines.append(f"  {key:<{width}}  {self.best_metrics[key]:.4f}")
            lines += [f"warning: {note}" for note in figure_warnings(self.best_metrics)]
        if self.best_number is not None:  # with no complete trial there is nothing to confirm yet
            lines += self.confirmation
        lines.append(f"optuna storage: {self.storage}")
        lines.append(f"compare trials: {ui_command(self.tracking_uri)}")
        if self.wall_seconds:
            lines.append(f"wall time: {self.wall_seconds:.0f} s")
        return "\n".join(lines)


@contextmanager
def optuna_quiet() -> Iterator[None]:
    """Within: Optuna's plotting and importance code keep their warnings to themselves, unless Optuna logs INFO.

    They say what the report says better ("There are no complete trials.", importances from too few
    trials); ``mbu search -v`` leaves Optuna at INFO and shows them.
    """
    if optuna.logging.get_verbosity() <= optuna.logging.INFO:
        yield
        return
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # ExperimentalWarning is one too
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def param_importances(study: optuna.Study) -> dict[str, float] | str:
    """Optuna's importances, or why there are none yet."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return f"needs at least 2 complete trials, the study has {len(complete)}"
    try:
        with optuna_quiet():
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as err:  # e.g. every trial shares the same parameters
        return f"not computable: {err}"


def importance_caveat(study: optuna.Study) -> str | None:
    """A warning when the importances come from too few complete trials to mean much."""
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if complete < FEW_TRIALS_FOR_IMPORTANCE:
        return (
            f"computed from {complete} complete trials: too few to mean much "
            f"(read them from about {FEW_TRIALS_FOR_IMPORTANCE} on)"
        )
    return None


def summary_text(study: optuna.Study, storage: str, tracking_uri: str, study_dir: Path) -> str:
    """``mbu search --summary``: the summary, importances (flagged when too few) and where the reports are."""
    lines = [StudySummary.of(study, storage, tracking_uri).format(), "parameter importances:"]
    importances = param_importances(study)
    if isinstance(importances, dict):
        caveat = importance_caveat(study)
        lines += [f"  warning: {caveat}"] if caveat else []
        lines += [f"  {name:<12} {value:.3f}" for name, value in importances.items()]
    else:
        lines.append(f"  none yet: {importances}")
    lines.append(f"reports: {study_dir}/{STUDY_REPORT_MD} and {study_dir}/trial-<n>/{MARKDOWN_FILE}")
    return "\n".join(lines)


def ranked_trials(study: optuna.Study) -> list[dict[str, Any]]:
    """Complete trials, best validation IoU first, with their test figures."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = []
    for t in sorted(complete, key=lambda t: t.value, reverse=reverse):
        attrs = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                **{key: (t.value if key == "val/iou_best" else attrs.get(key)) for key in SUMMARY_METRICS},
                "mlflow_run_id": attrs.get("mlflow_run_id"),
                "params": dict(t.params),
            }
        )
    return rows


def write_plots(study: optuna.Study, study_dir: Path) -> list[Path]:
    """Optuna's plots as PNG files in ``study_dir``; a plot the study cannot draw yet is left out."""
    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    objective = (study.metric_names or ["objective"])[0]  # axis labels name the objective, not "Objective Value"
    written = []
    for name, (function, _) in PLOTS.items():
        try:
            with optuna_quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and empty-plot warnings
                axes = getattr(optuna_plots, function)(study, target_name=objective)
        except (ValueError, RuntimeError):  # e.g. importances with fewer than 2 complete trials
            continue
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        path = study_dir / name
        atomic_write(path, lambda tmp, figure=figure: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
        plt.close(figure)
        written.append(path)
    return written


def study_markdown(
    name: str,
    rows: list[dict[str, Any]],
    importances: dict[str, float] | str,
    states: dict,
    caveat: str | None = None,
    best_warnings: list[str] | None = None,
    plots: list[Path] | None = None,
    confirmation: list[str] | None = None,
    disk: str = "",
    race: list[str] | None = None,
    best_link: str | None = None,
) -> str:
    lines = [f"# Study `{name}`", "", "Trials by state: " + ", ".join(f"{v} {k}" for k, v in sorted(states.items()))]
    if disk:
        lines += ["", f"Disk used by the study's runs: {disk}."]
    if race:
        lines += ["", *race]
    title = "Configurations by their race (mean over seeds)" if race else "Trials ranked by validation IoU"
    lines += ["", f"## {title}", ""]
    if rows:
        params = sorted({p for r in rows for p in r["params"]})
        lines.append("| trial | val IoU | threshold | test IoU | oracle | all-ones | " + " | ".join(params) + " |")
        lines.append("|" + "---|" * (6 + len(params)))
        for r in rows:
            cells = [str(r["trial"])] + [_fmt(r[k]) for k in SUMMARY_METRICS]
            cells += [f"{r['params'][p]:.4g}" if p in r["params"] else "-" for p in params]
            lines.append("| " + " | ".join(cells) + " |")
        best = rows[0]["trial"]
        link = best_link or f"{trial_name(best)}/{MARKDOWN_FILE}"
        if best_link is None and race:
            lines += ["", "No configuration has finished all its seeds yet: the race has no incumbent."]
        else:
            lines += ["", f"Best trial: #{best}; its report: [{link}]({link})."]
            lines += [f"\n> **Warning (best trial):** {note}." for note in best_warnings or []]
    else:
        lines.append("No trial has completed yet.")
    if confirmation:
        lines += ["", "## Confirmation on fresh seeds", "", "```", *confirmation, "```", ""]
        lines.append(
            f"Per candidate and seed, with the paired comparisons: [{CONFIRM_REPORT_MD}]({CONFIRM_REPORT_MD})."
        )
    lines += ["", "## Parameter importances (Optuna)", ""]
    if isinstance(importances, dict):
        if caveat:
            lines += [f"> **Warning:** {caveat}.", ""]
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        lines.append(f"None yet: {importances}.")
    if plots:
        lines += ["", "## Plots (Optuna)", ""]
        lines += [f"### {PLOTS[p.name][1]}\n\n![{PLOTS[p.name][1]}]({p.name})\n" for p in plots]
    return "\n".join(lines) + "\n"


def _relative(path: Path, start: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(start).resolve()))
    except ValueError:
        return str(path)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def write_study_report(study: optuna.Study, study_dir: Path) -> list[Path]:
    """Write the study's report files and plots into ``study_dir``; returns their paths (JSON, Markdown, PNGs)."""
    states = count_states(study)
    rows = ranked_trials(study)
    race = race_summary(study) if seed_count(study) > 1 else None
    if race is not None:  # the incumbent first, then by mean over the seeds each ran
        order = {r.trial: i for i, r in enumerate(race.ranked)}
        rows.sort(key=lambda r: (r["trial"] != (race.incumbent.trial if race.incumbent else None), order[r["trial"]]))
    importances = param_importances(study)
    best_report, best_link = None, None
    if rows and (race is None or race.incumbent is not None):
        folder = best_run_folder(study, rows[0]["trial"], study_dir) or study_dir / trial_name(rows[0]["trial"])
        path = folder / REPORT_FILE
        best_report = json.loads(path.read_text())["metrics"] if path.is_file() else None
        best_link = _relative(folder / MARKDOWN_FILE, study_dir)
    best_warnings = figure_warnings(best_report or rows[0]) if rows else []
    caveat = importance_caveat(study) if isinstance(importances, dict) else None
    plots = write_plots(study, study_dir)
    confirm_file = study_dir / CONFIRM_REPORT_JSON
    confirmation = summary_lines(json.loads(confirm_file.read_text())) if confirm_file.is_file() else None
    data = {
        "study": study.study_name,
        "objective": (study.metric_names or ["objective"])[0],
        "states": states,
        "trials": rows,
        "importances": importances,
        "importance_warning": caveat,
        "best_trial_report": best_report,
        "best_trial_warnings": best_warnings,
        "plots": [p.name for p in plots],
        "confirmation": confirmation,
        "disk_bytes": disk_used(study_dir),
        "race": race.to_dict() if race is not None else None,
    }
    json_path, md_path = study_dir / STUDY_REPORT_JSON, study_dir / STUDY_REPORT_MD
    write_json(json_path, data)
    disk = f"{human_bytes(data['disk_bytes'])} under {study_dir}"
    race_lines = race_markdown(race) if race is not None else None
    text = study_markdown(
        study.study_name, rows, importances, states, caveat, best_warnings, plots, confirmation, disk, race_lines,
        best_link,
    )  # fmt: skip
    atomic_write(md_path, lambda tmp: tmp.write_text(text))
    return [json_path, md_path, *plots]
