"""The confirmation's verdict: fresh-seed intervals per candidate, paired differences against the presets.

Every figure comes from the confirmation runs alone (never the search-time
run). Per candidate: the mean, standard deviation and t-based 95 % interval of
validation and test IoU over its seeds. Against each preset: the mean of the
per-seed differences in test IoU over the seeds both completed, its t-based
95 % interval and the seeds won; the verdict says "beats" or "is worse than"
only when that interval excludes 0. The confirmed best is the candidate with
the highest fresh-seed mean *validation* IoU: the test half stays out of every
choice. The optimism of the search is its winner's search-time objective minus
that trial's fresh-seed mean validation IoU.

Written as ``confirm_report.{json,md}`` and ``confirm_test_iou.png`` in
``runs/<study>/``, logged to the study's parent MLflow run with
``confirmed/...`` metrics and tags.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from mbu.base.files import atomic_write, write_json
from mbu.evaluate.segmentation import figure_warnings
from mbu.search.running.trial import TRAIN_SEED_ATTR

if TYPE_CHECKING:
    from mbu.search.judging.confirm import Stage

CONFIRM_REPORT_JSON = "confirm_report.json"
CONFIRM_REPORT_MD = "confirm_report.md"
CONFIRM_PLOT = "confirm_test_iou.png"
LEVEL = 0.95  # of every interval
CANDIDATE_ATTR = "candidate_trial"  # Optuna trial attribute of a confirmation run: the search trial it retrains


@dataclass
class Interval:
    """Mean of ``n`` values, their sample standard deviation and the t-based interval (None below 2 values)."""

    n: int
    mean: float | None
    sd: float | None = None
    low: float | None = None
    high: float | None = None


def t_interval(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Student's t interval of the mean: with a handful of seeds the normal one would be too narrow."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Interval(0, None)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(n, mean)
    sd = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def seed_scores(study: optuna.Study, candidate_trial: int) -> dict[int, dict[str, float]]:
    """Seed -> validation and test IoU of a candidate's complete confirmation runs."""
    scores = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get(CANDIDATE_ATTR) == candidate_trial:
            score = {"val_iou": t.value, "test_iou": t.user_attrs["test/iou"]}
            flag = degenerate(t.user_attrs)
            scores[int(t.user_attrs[TRAIN_SEED_ATTR])] = {**score, "collapsed": flag} if flag else score
    return scores


def degenerate(figures: dict[str, Any]) -> str | None:
    """Why a confirmation run's masks mean nothing (the collapse guard ended it, or its figures do not beat the
    all-ones mask: the same flags a search's summary raises); None for a run that holds up."""
    if figures.get("collapsed"):
        return f"collapsed ({figures['collapsed']})"
    notes = figure_warnings(figures)
    return notes[0] if notes else None


def verdict(label: str, preset: str, diff: Interval, wins: int) -> str:
    """One line: beats / is worse than (the interval excludes 0) / not distinguishable."""
    if diff.n == 0:
        return f"{label} and {preset} share no completed seed yet"
    if diff.low is None:
        return f"{label} against {preset}: {diff.mean:+.4f} test IoU on 1 seed, too few for an interval"
    where = f"95% interval [{diff.low:.4f}, {diff.high:.4f}]"
    if diff.low > 0:
        return f"{label} beats {preset} by {diff.mean:.4f} test IoU, {where}, {wins} of {diff.n} seeds"
    if diff.high < 0:
        return f"{label} is worse than {preset} by {-diff.mean:.4f} test IoU, {where}, {wins} of {diff.n} seeds"
    return (
        f"{label} is not distinguishable from {preset} ({diff.mean:+.4f} test IoU, {where} spans 0; "
        f"{wins} of {diff.n} seeds won)"
    )


def confirm_report(stage: Stage) -> dict[str, Any]:
    """The whole verdict as plain data (what ``confirm_report.json`` holds)."""
    rows = []
    for c in stage.candidates:
        scores = seed_scores(stage.study, c.trial)
        rows.append(
            {
                "trial": c.trial,
                "label": c.label,
                "preset": c.preset,
                "params": c.params,
                "search": {"val_iou": c.search_value, "test_iou": c.search_test_iou},
                "seeds": {str(s): scores[s] for s in stage.seeds if s in scores},
                "missing_seeds": [s for s in stage.seeds if s not in scores],
                "val_iou": asdict(t_interval([scores[s]["val_iou"] for s in stage.seeds if s in scores])),
                "test_iou": asdict(t_interval([scores[s]["test_iou"] for s in stage.seeds if s in scores])),
            }
        )
    comparisons = []
    for row in rows:
        for preset in (r for r in rows if r["preset"] is not None and r["trial"] != row["trial"]):
            shared = [s for s in row["seeds"] if s in preset["seeds"]]
            diffs = [row["seeds"][s]["test_iou"] - preset["seeds"][s]["test_iou"] for s in shared]
            diff = t_interval(diffs)
            wins = sum(d > 0 for d in diffs)
            line = verdict(row["label"], preset["label"], diff, wins)
            comparisons.append({"candidate": row["trial"], "preset": preset["trial"], "wins": wins, "verdict": line,
                                "difference": asdict(diff)})  # fmt: skip
    scored = [r for r in rows if r["val_iou"]["n"]]
    best = max(scored, key=lambda r: r["val_iou"]["mean"], default=None)
    winner = rows[0]  # the search's own best trial (candidates start with the top-k by the objective)
    optimism = None
    if winner["val_iou"]["n"]:
        optimism = winner["search"]["val_iou"] - winner["val_iou"]["mean"]
    finished = sum(len(r["seeds"]) for r in rows)
    return {
        "study": stage.config.study.name.rsplit("/", 1)[0],
        "level": LEVEL,
        "seeds": stage.seeds,
        "runs_finished": finished,
        "runs_planned": len(rows) * len(stage.seeds),
        "abandoned": [list(pair) for pair in stage.abandoned],
        "missing_presets": stage.missing_presets,
        "candidates": rows,
        "comparisons": comparisons,
        "confirmed_best": None if best is None else {"trial": best["trial"], "label": best["label"]},
        "optimism": None if optimism is None else {"trial": winner["trial"], "value": optimism},
    }


def _iv(interval: dict[str, Any]) -> str:
    if not interval["n"]:
        return "-"
    if interval["low"] is None:
        return f"{interval['mean']:.4f} (1 seed)"
    return f"{interval['mean']:.4f} ± {interval['sd']:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The verdict in a few lines: the end of ``mbu search``, ``--summary`` and the study report."""
    done, planned = report["runs_finished"], report["runs_planned"]
    lines = [f"confirmation on {len(report['seeds'])} fresh seeds ({done} of {planned} runs finished):"]
    best = report["confirmed_best"]
    if best is not None:
        row = next(r for r in report["candidates"] if r["trial"] == best["trial"])
        lines.append(f"  confirmed best: {best['label']}, test IoU {_iv(row['test_iou'])}")
    lines += [f"  {c['verdict']}" for c in report["comparisons"] if c["candidate"] == (best or {}).get("trial")]
    if report["optimism"] is not None:
        o = report["optimism"]
        lines.append(f"  optimism of the search: trial {o['trial']}'s search-time val IoU exceeds its fresh-seed "
                     f"mean by {o['value']:+.4f}")  # fmt: skip
    lines += [f"  not compared: {why}" for why in report.get("missing_presets", [])]
    lines += [f"  warning: {line}" for line in collapsed_lines(report)]
    return lines


def collapsed_lines(report: dict[str, Any]) -> list[str]:
    """``trial 2, seed 3: collapsed (...)`` for each confirmation run whose masks degenerated."""
    return [
        f"{row['label']}, seed {seed}: {score['collapsed']}"
        for row in report["candidates"]
        for seed, score in row["seeds"].items()
        if score.get("collapsed")
    ]


def confirm_markdown(report: dict[str, Any]) -> str:
    seeds = ", ".join(str(s) for s in report["seeds"])
    lines = [f"# Confirmation of study `{report['study']}`", ""]
    lines += [f"Fresh training seeds {seeds} (the search trained with none of them), the same for every "
              f"candidate; {report['runs_finished']} of {report['runs_planned']} runs finished. Intervals: "
              f"t-based {LEVEL:.0%}, mean ± standard deviation [interval].", ""]  # fmt: skip
    lines += ["## Candidates", "", "| candidate | search val IoU | search test IoU | fresh val IoU | fresh test IoU "
              "| test IoU per seed |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["candidates"]:
        per_seed = ", ".join(f"{s}: {v['test_iou']:.4f}" for s, v in r["seeds"].items()) or "-"
        search_test = r["search"]["test_iou"]
        lines.append(f"| {r['label']} | {r['search']['val_iou']:.4f} | "
                     f"{'-' if search_test is None else f'{search_test:.4f}'} | {_iv(r['val_iou'])} | "
                     f"{_iv(r['test_iou'])} | {per_seed} |")  # fmt: skip
    if report["comparisons"]:
        lines += ["", "## Against the presets (paired by seed)", "",
                  "| candidate | preset | seeds | test IoU difference | wins |", "|---|---|---|---|---|"]  # fmt: skip
        labels = {r["trial"]: r["label"] for r in report["candidates"]}
        for c in report["comparisons"]:
            lines.append(f"| {labels[c['candidate']]} | {labels[c['preset']]} | {c['difference']['n']} | "
                         f"{_iv(c['difference'])} | {c['wins']} |")  # fmt: skip
    lines += ["", "## Verdict", ""] + [f"- {c['verdict']}" for c in report["comparisons"]]
    best, optimism = report["confirmed_best"], report["optimism"]
    if best is not None:
        lines.append(f"- Confirmed best (highest fresh-seed mean validation IoU): **{best['label']}**")
    if optimism is not None:
        lines.append(f"- Optimism of the search: trial {optimism['trial']}'s search-time validation IoU minus its "
                     f"fresh-seed mean: {optimism['value']:+.4f}")  # fmt: skip
    lines += [f"- Not compared: {why}." for why in report.get("missing_presets", [])]
    lines += [f"- Degenerate masks: {line}." for line in collapsed_lines(report)]
    if report["abandoned"]:
        lines.append(f"- Given up after repeated failures (trial, seed): {report['abandoned']}")
    lines += ["", f"![test IoU per candidate]({CONFIRM_PLOT})"]
    return "\n".join(lines) + "\n"


def plot_confirmation(report: dict[str, Any], path: Path) -> None:
    """Test IoU per candidate: one point per seed, the mean and its interval marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["candidates"]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(rows)), 3.5))
    for x, r in enumerate(rows):
        values = [v["test_iou"] for v in r["seeds"].values()]
        axes.scatter([x] * len(values), values, color="tab:blue", alpha=0.7, zorder=2)
        iv = r["test_iou"]
        if iv["low"] is not None:
            axes.errorbar([x + 0.15], [iv["mean"]], yerr=[[iv["mean"] - iv["low"]], [iv["high"] - iv["mean"]]],
                          fmt="D", color="black", capsize=4, zorder=3)  # fmt: skip
        elif iv["n"]:
            axes.scatter([x + 0.15], [iv["mean"]], marker="D", color="black", zorder=3)
    axes.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=15)
    axes.set_ylabel("test IoU (fresh seeds)")
    axes.set_title(f"{report['study']}: points are seeds; diamonds, mean and {LEVEL:.0%} interval")
    axes.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(figure)


def write_confirm_report(stage: Stage, study_dir: Path) -> tuple[dict[str, Any], list[Path]]:
    """The report files in the study's folder; the report and the paths written."""
    report = confirm_report(stage)
    json_path, md_path, plot = study_dir / CONFIRM_REPORT_JSON, study_dir / CONFIRM_REPORT_MD, study_dir / CONFIRM_PLOT
    write_json(json_path, report)
    text = confirm_markdown(report)
    atomic_write(md_path, lambda tmp: tmp.write_text(text))
    plot_confirmation(report, plot)
    return report, [json_path, md_path, plot]


def parent_figures(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """``confirmed/...`` metrics and tags for the study's parent run."""
    best = report["confirmed_best"]
    tags = {"confirmed/state": "complete" if report["runs_finished"] == report["runs_planned"] else "partial"}
    metrics: dict[str, float] = {}
    if best is not None:
        row = next(r for r in report["candidates"] if r["trial"] == best["trial"])
        tags |= {"confirmed/best_trial": str(best["trial"]), "confirmed/best": best["label"]}
        for key in ("val_iou", "test_iou"):
            for part in ("mean", "sd", "low", "high"):
                if row[key][part] is not None:
                    metrics[f"confirmed/{key}_{part}"] = row[key][part]
        lines = [c["verdict"] for c in report["comparisons"] if c["candidate"] == best["trial"]]
        if lines:
            tags["confirmed/verdict"] = "; ".join(lines)[:5000]
    if report["optimism"] is not None:
        metrics["confirmed/optimism"] = report["optimism"]["value"]
    return metrics, tags


def confirmation_lines(study_dir: Path, study_file: Path) -> list[str]:
    """The verdict lines from the study's confirmation report, or how to confirm when there is none."""
    path = study_dir / CONFIRM_REPORT_JSON
    if path.is_file():
        return summary_lines(json.loads(path.read_text()))
    return [f"not confirmed: mbu confirm {study_file} retrains the best trial on fresh seeds"]
