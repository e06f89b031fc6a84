"""The report of a whole study: trials ranked, the best trial's report, parameter importances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from data.files import atomic_write
from evaluate.report import MARKDOWN_FILE
from evaluate.segmentation import REPORT_FILE, figure_warnings
from train.checkpoint import write_json

STUDY_REPORT_JSON = "study_report.json"
STUDY_REPORT_MD = "study_report.md"
# Below this many complete trials, importances are mostly the sampler's noise: shown, but flagged.
FEW_TRIALS_FOR_IMPORTANCE = 10


def importance_caveat(study: optuna.Study) -> str | None:
    """A warning when the importances come from too few complete trials to mean much."""
    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if complete < FEW_TRIALS_FOR_IMPORTANCE:
        return (
            f"computed from {complete} complete trials: too few to mean much "
            f"(read them from about {FEW_TRIALS_FOR_IMPORTANCE} on)"
        )
    return None


def param_importances(study: optuna.Study) -> dict[str, float] | str:
    """Optuna's importances, or why there are none yet."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return f"needs at least 2 complete trials, the study has {len(complete)}"
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError) as err:  # e.g. every trial shares the same parameters
        return f"not computable: {err}"


def ranked_trials(study: optuna.Study) -> list[dict[str, Any]]:
    """Complete trials, best validation IoU first, with their test figures."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    rows = []
    for t in sorted(complete, key=lambda t: t.value, reverse=reverse):
        attrs = t.user_attrs
        rows.append(
            {
                "trial": t.number,
                "val/iou_best": t.value,
                "val/threshold_best": attrs.get("val/threshold_best"),
                "test/iou": attrs.get("test/iou"),
                "test/iou_oracle": attrs.get("test/iou_oracle"),
                "baseline/iou_all_ones": attrs.get("baseline/iou_all_ones"),
                "mlflow_run_id": attrs.get("mlflow_run_id"),
                "params": dict(t.params),
            }
        )
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def study_markdown(
    name: str,
    rows: list[dict[str, Any]],
    importances: dict[str, float] | str,
    states: dict,
    caveat: str | None = None,
    best_warnings: list[str] | None = None,
) -> str:
    lines = [f"# Study `{name}`", "", "Trials by state: " + ", ".join(f"{v} {k}" for k, v in sorted(states.items()))]
    lines += ["", "## Trials ranked by validation IoU", ""]
    if rows:
        params = sorted({p for r in rows for p in r["params"]})
        lines.append("| trial | val IoU | threshold | test IoU | oracle | all-ones | " + " | ".join(params) + " |")
        lines.append("|" + "---|" * (6 + len(params)))
        for r in rows:
            cells = [str(r["trial"])] + [
                _fmt(r[k])
                for k in ("val/iou_best", "val/threshold_best", "test/iou", "test/iou_oracle", "baseline/iou_all_ones")
            ]
            cells += [f"{r['params'][p]:.4g}" if p in r["params"] else "-" for p in params]
            lines.append("| " + " | ".join(cells) + " |")
        best = rows[0]["trial"]
        lines += ["", f"Best trial: #{best}; its report: [trial-{best}/{MARKDOWN_FILE}](trial-{best}/{MARKDOWN_FILE})."]
        lines += [f"\n> **Warning (best trial):** {note}." for note in best_warnings or []]
    else:
        lines.append("No trial has completed yet.")
    lines += ["", "## Parameter importances (Optuna)", ""]
    if isinstance(importances, dict):
        if caveat:
            lines += [f"> **Warning:** {caveat}.", ""]
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        lines.append(f"None yet: {importances}.")
    return "\n".join(lines) + "\n"


def write_study_report(study: optuna.Study, study_dir: Path) -> list[Path]:
    """Write the study's report files into ``study_dir``; returns their paths."""
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    rows = ranked_trials(study)
    importances = param_importances(study)
    best_report = None
    if rows:
        path = study_dir / f"trial-{rows[0]['trial']}" / REPORT_FILE
        best_report = json.loads(path.read_text())["metrics"] if path.is_file() else None
    best_warnings = figure_warnings(best_report or rows[0]) if rows else []
    caveat = importance_caveat(study) if isinstance(importances, dict) else None
    data = {
        "study": study.study_name,
        "states": states,
        "trials": rows,
        "importances": importances,
        "importance_warning": caveat,
        "best_trial_report": best_report,
        "best_trial_warnings": best_warnings,
    }
    json_path, md_path = study_dir / STUDY_REPORT_JSON, study_dir / STUDY_REPORT_MD
    write_json(json_path, data)
    text = study_markdown(study.study_name, rows, importances, states, caveat, best_warnings)
    atomic_write(md_path, lambda tmp: tmp.write_text(text))
    return [json_path, md_path]
