"""Racing configurations over paired seeds: SMAC's rule, the collapse guard, each seed run recorded once."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from helpers import mbu_command, study_runs, tiny_study
from mlflow.entities import Run, ViewType
from mlflow.tracking import MlflowClient
from scipy import stats as scipy_stats
from sklearn.metrics import jaccard_score

from mbu.cli import main
from mbu.evaluate.segmentation import score_masks, validation_split
from mbu.search.judging.race import (
    CROWN_SEEDS_ATTR,
    RACE_SEEDS_ATTR,
    collapse_reason,
    finish_configuration,
    incumbent,
    keeps_racing,
    next_seed,
    record_seed,
    seed_runs,
    takes_crown,
)
from mbu.search.launching.study import queue_presets
from mbu.search.running.tracking import open_seed_runs
from mbu.search.running.tracking import pending_results as seed_runs_pending
from mbu.search.running.trial import suggest_params
from mbu.search.studyfile.race_settings import RaceSettings
from mbu.search.studyfile.study_file import StudyConfig, load_study_file

PRESET = {"lr": 2e-4}
# Two paired seeds, the crown judged on them by the mean; runs end at iters, not at a collapse.
RACE2 = {"seeds": 2, "crown_seeds": 0, "crown_confidence": 0.0, "collapse_guard": False}
STORAGE = "sqlite:///optuna.db"


def trials(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=STORAGE).get_trials()


def plant_incumbent(name: str, value: float, seeds: int = 2) -> None:
    """A complete configuration with ``value`` on every race seed, in the study before its first launch."""
    study = optuna.create_study(study_name=name, storage=STORAGE, direction="maximize")
    runs = {str(seed): {"value": value, "test/iou": value} for seed in range(seeds)}
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 5e-4},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)},
            value=value,
            user_attrs={"seed_runs": runs, "race_outcome": f"all {seeds} seeds"},
        )
    )


def search_until(checkpoints: list[Path]) -> subprocess.Popen:
    """``mbu search s.toml`` in a process of its own, returned once every one of ``checkpoints`` exists (or it
    ended, or 300 s passed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(mbu_command("search", "s.toml", "--no-progress"), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not all(p.is_file() for p in checkpoints) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process


def saved_iteration(folder: Path) -> int:
    return int(torch.load(folder / "checkpoint.pt", weights_only=False)["iteration"])


def seed_run_names(name: str) -> list[str]:
    """Names of the study's finished MLflow seed runs (``trial-<c> seed-<s>``), one entry per run."""
    runs = study_runs(MlflowClient(), name).trials
    return sorted(r.info.run_name for r in runs if "seed" in r.data.tags and r.info.status == "FINISHED")


def test_keeps_racing_is_smacs_rule_on_the_seeds_both_ran() -> None:
    rival = {0: 0.42, 1: 0.30, 2: 0.30}  # mean 0.34 over all three seeds
    # Compared on seed 0 alone: 0.40 < 0.42, raced out although 0.40 beats the rival's overall mean.
    assert keeps_racing({0: 0.40}, rival, margin=0.0) is False
    assert keeps_racing({0: 0.40}, rival, margin=0.03) is True  # a forgiving margin lets it go on
    assert keeps_racing({0: 0.42}, rival, margin=0.0) is True  # a tie is not worse
    assert keeps_racing({0: 0.45, 1: 0.30}, rival, margin=0.0) is True  # 0.375 vs 0.36
    assert keeps_racing({0: 0.45, 1: 0.20}, rival, margin=0.0) is False  # 0.325 vs 0.36
    assert keeps_racing({7: 0.01}, rival, margin=0.0) is True  # no seed in common: no evidence against it
    assert keeps_racing({0: 0.30}, {0: 0.40}, margin=0.0, sign=-1.0) is True  # minimizing: lower is better


def test_the_collapse_guard_reads_the_validation_half_and_its_all_ones_iou_matches_scikit_learn() -> None:
    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(20, 16, 16, dtype=torch.bool)
    for i in range(20):
        top, left = torch.randint(0, 10, (2,), generator=generator).tolist()
        truth[i, top : top + 5, left : left + 6] = True
    names = [f"{i}.png" for i in range(20)]
    settings = RaceSettings()

    perfect = score_masks(truth.float(), truth, names).metrics
    assert collapse_reason(perfect, settings) is None

    everything = score_masks(torch.ones(20, 16, 16), truth, names).metrics
    val, _ = validation_split(20)
    expected = jaccard_score(truth[val].flatten().numpy(), torch.ones(len(val) * 256, dtype=torch.bool).numpy())
    assert everything["baseline/iou_all_ones_val"] == pytest.approx(expected)
    assert everything["val/marked_fraction"] == 1.0
    assert "marks 100.0% of the validation pixels" in collapse_reason(everything, settings)
    assert collapse_reason(everything, RaceSettings(collapse_guard=False)) is None

    # A mask that barely tells content from background: its best threshold marks the content and 95 % of the
    # rest, under the marked share but within the margin of the all-ones IoU.
    uniform = torch.rand(20, 16, 16, generator=generator)
    noisy = torch.where(truth, 0.05 + 0.95 * uniform, uniform)
    metrics = score_masks(noisy, truth, names).metrics
    assert metrics["val/marked_fraction"] < settings.collapse_marked
    reason = collapse_reason(metrics, settings)
    assert reason is not None and "within 0.02 of the all-ones mask's" in reason
    assert collapse_reason(metrics, RaceSettings(collapse_margin=0.0)) is None


def test_a_challenger_that_loses_its_first_seed_trains_one_seed(tmp_path: Path, capsys) -> None:
    (tmp_path / "s.toml").write_text(tiny_study("lose", 2, race=RACE2, enqueue=[PRESET]))
    plant_incumbent("lose", 0.99)  # trial 0: no real run can reach it

    assert main(["search", "s.toml", "--no-progress"]) == 0

    challenger = trials("lose")[1]
    assert challenger.state == optuna.trial.TrialState.COMPLETE
    assert sorted(seed_runs(challenger)) == [0]
    assert challenger.user_attrs["race_outcome"] == "raced out after seed 0 (1 of 2)"
    assert challenger.intermediate_values == {0: challenger.value}
    assert sorted(p.name for p in (tmp_path / "runs/lose/trial-1").glob("seed-*")) == ["seed-0"]
    assert seed_run_names("lose") == ["trial-1 seed-0"]
    out = capsys.readouterr().out
    assert "best configuration: trial 0" in out and "1 raced out" in out
    report = (tmp_path / "runs/lose/study_report.md").read_text()
    assert "raced out after seed 0 (1 of 2)" in report and "**(incumbent)**" in report


def test_a_challenger_that_wins_every_seed_becomes_the_incumbent_and_the_champion(tmp_path: Path, capsys) -> None:
    race = {**RACE2, "crown_seeds": 2}  # after the race's seeds 0 and 1, the crown is judged on seeds 2 and 3
    tables = {"race": race, "enqueue": [PRESET], "study": {"registered_model": "race_champion"}}
    (tmp_path / "s.toml").write_text(tiny_study("win", 2, **tables))
    plant_incumbent("win", 0.0)  # trial 0: every real run beats it

    assert main(["search", "s.toml", "--no-progress"]) == 0

    winner = trials("win")[1]
    assert sorted(seed_runs(winner)) == [0, 1, 2, 3]
    assert winner.user_attrs["race_outcome"] == "all 4 seeds; took the crown from trial 0"
    assert winner.user_attrs["race_crowned"] is True
    values = [seed_runs(winner)[s]["value"] for s in range(4)]
    assert winner.value == pytest.approx(sum(values) / 4)
    out = capsys.readouterr().out
    assert "best configuration: trial 1, mean test IoU over 4 seeds" in out
    assert "(0 saved against 2 + 2 crown seeds each)" in out
    assert seed_run_names("win") == [f"trial-1 seed-{s}" for s in range(4)]
    # The seed runs sit under the configuration's run, which sits under the study's.
    client = MlflowClient()
    runs = study_runs(client, "win")
    config_run = next(r for r in runs.trials if r.info.run_name == "trial-1")
    assert config_run.data.tags["mlflow.parentRunId"] == runs.parents[0].info.run_id
    assert config_run.data.tags["race_crowned"] == "true"
    seeds = [r for r in runs.trials if "seed" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in seeds} == {config_run.info.run_id}
    stages = {int(r.data.tags["seed"]): r.data.tags["stage"] for r in seeds}
    assert stages == {0: "race", 1: "race", 2: "crown", 3: "crown"}
    version = client.get_model_version_by_alias("race_champion", "champion")
    assert version.tags["trial"] == "1" and version.tags["race_seeds"] == "0,1,2,3"
    assert version.run_id in {r.info.run_id for r in seeds}


def test_a_collapsed_run_ends_at_its_first_evaluation_and_a_seeds_edit_is_refused(tmp_path: Path, capsys) -> None:
    # Two iterations leave the tiny model marking every pixel: collapsed at the first evaluation, iteration 2.
    tables = {"race": {"seeds": 2}, "enqueue": [PRESET], "train": {"iters": 6, "eval_every": 2}}
    (tmp_path / "s.toml").write_text(tiny_study("fold", 1, **tables))

    assert main(["search", "s.toml", "--no-progress"]) == 0

    preset = trials("fold")[0]
    runs = seed_runs(preset)
    assert sorted(runs) == [0, 1]  # the first preset, with no incumbent yet, trains every seed
    for run in runs.values():
        assert run["iteration"] == 2 and run["collapsed"].startswith("collapsed at iteration 2: ")
        folder = tmp_path / "runs/fold" / run["dir"]
        assert saved_iteration(folder) == 2
        assert json.loads((folder / "report.json").read_text())["iteration"] == 2
    tagged = [r for r in study_runs(MlflowClient(), "fold").trials if "collapsed" in r.data.tags]
    assert len(tagged) == 2
    assert "Collapsed runs" in (tmp_path / "runs/fold/study_report.md").read_text()

    capsys.readouterr()
    (tmp_path / "s.toml").write_text(tiny_study("fold", 1, **{**tables, "race": {"seeds": 3}}))
    assert main(["search", "s.toml", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was created with a different race" in err[0]
    assert len(trials("fold")) == 1


@pytest.mark.slow
def test_a_stopped_seed_run_resumes_once_in_optuna_and_mlflow(tmp_path: Path) -> None:
    tables = {"race": RACE2, "enqueue": [PRESET], "train": {"iters": 8, "save_iter": 2, "eval_every": 8}}
    (tmp_path / "s.toml").write_text(tiny_study("stop", 1, **tables))
    process = search_until([tmp_path / "runs/stop/trial-0/seed-1/checkpoint.pt"])
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err.decode()

    assert main(["search", "s.toml", "--no-progress"]) == 0

    first, retry = trials("stop")
    assert first.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert sorted(seed_runs(retry)) == [0, 1]
    assert seed_runs(first).keys() == {0}  # seed 0 had finished before the stop; the retry carried it
    runs = study_runs(MlflowClient(), "stop").trials
    assert sorted(r.info.run_name for r in runs) == ["trial-0", "trial-0 seed-0", "trial-0 seed-1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    resumed = next(r for r in runs if r.info.run_name == "trial-0 seed-1")
    assert int(resumed.data.tags["resumed_from_iteration"]) >= 2
    assert seed_runs(retry)[1]["run_id"] == resumed.info.run_id


@pytest.mark.slow
def test_two_workers_record_each_seed_run_once(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(tiny_study("pair", 3, race=RACE2, enqueue=[PRESET]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        mbu_command("search", "s.toml", "--workers", "2", "--no-progress"), env=env, capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode()
    complete = [t for t in trials("pair") if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    expected = sorted(
        f"trial-{t.number} seed-{seed}" for t in complete for seed in seed_runs(t)
    )  # no retries here: a configuration's folder and runs are named after its own trial
    assert seed_run_names("pair") == expected
    ids = [run["run_id"] for t in complete for run in seed_runs(t).values()]
    assert len(ids) == len(set(ids)) == len(expected)


def test_the_simulator_drives_the_search_and_picks_a_clearly_best_preset(tmp_path: Path) -> None:
    objective = tmp_path / "objective.py"
    objective.write_text(
        "import random\n"
        "def value(params, seed):\n"
        "    noise = random.Random(hash((round(params['lr'], 12), seed))).gauss(0, 0.01)\n"
        "    return (0.6 if params['lr'] == 2e-4 else 0.2) + noise\n"
    )
    (tmp_path / "s.toml").write_text(tiny_study("sim", 1, enqueue=[PRESET]))
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    try:
        import racing
    finally:
        sys.path.pop(0)
    out = tmp_path / "out.json"
    args = ["--study", "s.toml", "--objective", str(objective), "--budget", "12", "--repeats", "4", "--json", str(out)]
    assert racing.main([*args, "--seeds", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["preset_true_value"] == pytest.approx(0.6, abs=0.01)
    assert set(result["policies"]) == {"single_seed", "single_seed_confirmed", "racing"}
    race = result["policies"]["racing"]
    assert race["worse_than_preset_rate"] == 0.0 and race["mean_true_value"] == result["preset_true_value"]
    assert race["mean_runs_used"] <= 12 and result["policies"]["single_seed"]["mean_runs_used"] == 12


def test_a_confirmation_after_a_race_trains_the_incumbent_on_the_seeds_after_the_races(tmp_path: Path) -> None:
    tables = {"race": RACE2, "enqueue": [PRESET], "confirm": {"top_k": 1, "seeds": 1}}
    (tmp_path / "s.toml").write_text(tiny_study("after", 2, **tables))

    assert main(["search", "s.toml", "--no-progress"]) == 0

    confirm = optuna.load_study(study_name="after/confirm", storage=STORAGE).get_trials()
    assert confirm and {t.state for t in confirm} == {optuna.trial.TrialState.COMPLETE}
    assert {t.user_attrs["train_seed"] for t in confirm} == {2}  # the race trained seeds 0 and 1
    assert all("seed_runs" not in t.user_attrs for t in confirm)  # plain runs, not races
    report = json.loads((tmp_path / "runs/after/confirm_report.json").read_text())
    assert {seed for row in report["candidates"] for seed in row["seeds"]} == {"2"}


def test_a_population_of_two_races_two_configurations_side_by_side(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(tiny_study("duo", 2, race=RACE2, enqueue=[PRESET], study={"population": 2}))

    assert main(["search", "s.toml", "--no-progress"]) == 0

    complete = [t for t in trials("duo") if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    assert sorted(seed_runs(complete[0])) == [0, 1]  # the preset: no incumbent when it started
    names = sorted(f"trial-{t.number} seed-{seed}" for t in complete for seed in seed_runs(t))
    assert seed_run_names("duo") == names


def _configuration(study: optuna.Study, lr: float, values: dict[int, float], state=None) -> None:
    runs = {str(seed): {"value": value, "test/iou": value} for seed, value in values.items()}
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": lr},
            distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True)},
            value=None if state is not None else sum(values.values()) / len(values),
            state=state or optuna.trial.TrialState.COMPLETE,
            user_attrs={"seed_runs": runs},
        )
    )


def test_the_reference_is_never_a_dead_try_and_confirmation_takes_the_full_configurations(tmp_path: Path) -> None:
    from mbu.search.judging.confirm import candidates
    from mbu.search.judging.race import RACE_SEEDS_ATTR, reference
    from mbu.search.studyfile.study_file import load_study_file

    (tmp_path / "s.toml").write_text(tiny_study("ref", 3, race=RACE2, enqueue=[PRESET], confirm={"top_k": 3}))
    config = load_study_file(tmp_path / "s.toml")
    study = optuna.create_study(direction="maximize")
    study.set_user_attr(RACE_SEEDS_ATTR, 2)
    _configuration(study, 2e-4, {0: 0.99}, optuna.trial.TrialState.FAIL)  # the preset's first try died
    assert reference(study, config) is None  # a challenger races nobody yet, not the dead try
    _configuration(study, 2e-4, {0: 0.30})  # the preset, queued again, raced out by trial 2 below
    assert reference(study, config).number == 1
    _configuration(study, 5e-4, {0: 0.40, 1: 0.38})  # all seeds: the incumbent
    _configuration(study, 7e-4, {0: 0.10})  # raced out
    assert reference(study, config).number == 2
    chosen = candidates(study, config)  # top_k 3, but only one configuration ran both seeds
    assert [(c.trial, c.label) for c in chosen] == [(2, "trial 2"), (1, "preset #1 (trial 1)")]


def test_takes_crown_is_a_one_sided_welch_test_at_the_confidence() -> None:
    holder = [0.37, 0.36, 0.38]
    solid, noisy = [0.42, 0.41, 0.43], [0.45, 0.30, 0.44]

    crowned, p = takes_crown(solid, holder, 0.9)
    # Welch's statistic and Welch-Satterthwaite degrees of freedom, written out; scipy's t distribution.
    a, b = statistics.variance(solid) / 3, statistics.variance(holder) / 3
    t = (statistics.fmean(solid) - statistics.fmean(holder)) / math.sqrt(a + b)
    df = (a + b) ** 2 / (a**2 / 2 + b**2 / 2)
    assert crowned is True and p == pytest.approx(scipy_stats.t.sf(t, df))

    crowned, p = takes_crown(noisy, holder, 0.9)  # a better mean (0.397), but one seed far below the rest
    assert crowned is False and 0.1 < p < 0.5
    assert takes_crown(noisy, holder, 0.0) == (True, None)  # confidence 0: the better mean is enough
    assert takes_crown(holder, holder, 0.0) == (False, None)  # a tie keeps the holder
    assert takes_crown([0.30, 0.31], [0.36, 0.37], 0.9, sign=-1.0)[0] is True  # minimizing: lower is better
    assert takes_crown([0.5], holder, 0.9) == (True, None)  # one value: no test, the mean decides
    assert takes_crown([0.4, 0.4], [0.3, 0.3], 0.9) == (True, None)  # no spread at all: the mean decides


def _racing_study(tmp_path: Path, direction: str = "maximize", **race) -> tuple[optuna.Study, StudyConfig]:
    """An in-memory racing study as a launch opens it (3 race seeds, 3 crown seeds), its preset queued."""
    (tmp_path / "s.toml").write_text(tiny_study("crown", 9, race={"seeds": 3, **race}, enqueue=[PRESET]))
    config = load_study_file(tmp_path / "s.toml")
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_user_attr(RACE_SEEDS_ATTR, 3)
    study.set_user_attr(CROWN_SEEDS_ATTR, config.race.crown_seeds)
    queue_presets(study, config.enqueue, max_retry=0, n_trials=9)
    return study, config


def _race(study: optuna.Study, config: StudyConfig, values: list[float], tell: bool = True):
    """One configuration raced as a slot does: each seed the race grants gets the next of ``values``."""
    trial = study.ask()
    suggest_params(trial, config)
    granted = []
    while (seed := next_seed(study, config, trial)) is not None:
        granted.append(seed)
        record_seed(trial, seed, {"value": values[len(granted) - 1]})
    result = finish_configuration(study, trial, config)
    if tell:
        study.tell(trial, result.value)
    return trial, granted, result


def test_the_crown_is_judged_on_the_seeds_after_the_race_so_a_lucky_fragile_challenger_stays_out(
    tmp_path: Path,
) -> None:
    study, config = _racing_study(tmp_path)

    preset, granted, result = _race(study, config, [0.37, 0.36, 0.38])
    assert granted == [0, 1, 2] and result.crowned and result.outcome == "all 3 seeds; the first incumbent"

    # Fell behind on its last race seed (mean 0.363 against 0.37): out before the crown seeds.
    _, granted, result = _race(study, config, [0.40, 0.39, 0.30])
    assert granted == [0, 1, 2] and not result.crowned
    assert result.outcome == "raced out after seed 2 (3 of 3), before the crown seeds"

    # Won every race seed, then collapsed on its first crown seed: out, though its race seeds beat the preset.
    _, granted, result = _race(study, config, [0.45, 0.44, 0.43, 0.07])
    assert granted == [0, 1, 2, 3] and not result.crowned
    assert result.outcome == "raced out after crown seed 3 (1 of 3)"

    # A better crown mean (0.397 against 0.37) that one poor seed makes a coin toss: the crown stays.
    _, granted, result = _race(study, config, [0.40, 0.39, 0.41, 0.45, 0.30, 0.44])
    assert granted == [0, 1, 2, 3, 4, 5] and not result.crowned
    assert result.outcome.startswith("all 6 seeds; did not beat trial 0 at 90% confidence, one-sided Welch p = 0.")
    assert incumbent(study).number == preset.number

    solid, _, result = _race(study, config, [0.40, 0.41, 0.39, 0.42, 0.41, 0.43])
    assert result.crowned and result.outcome.startswith("all 6 seeds; took the crown from trial 0, one-sided Welch")
    assert incumbent(study).number == solid.number and study.trials[solid.number].user_attrs["race_crowned"]

    # The new incumbent is raced on its race seeds (paired) and judged on its crown seeds (mean 0.42).
    _, granted, _ = _race(study, config, [0.395])
    assert granted == [0]
    _, granted, result = _race(study, config, [0.41, 0.42, 0.40, 0.40])
    assert granted == [0, 1, 2, 3] and result.outcome == "raced out after crown seed 3 (1 of 3)"


def test_two_challengers_crowned_at_once_leave_the_better_judged_mean_the_incumbent(tmp_path: Path) -> None:
    study, config = _racing_study(tmp_path, crown_confidence=0.0)
    _race(study, config, [0.37, 0.36, 0.38])
    # Two workers finish their races before either is told: each took the crown from the preset.
    first, _, one = _race(study, config, [0.40, 0.41, 0.39, 0.42, 0.41, 0.43], tell=False)
    second, _, two = _race(study, config, [0.40, 0.41, 0.39, 0.45, 0.44, 0.46], tell=False)
    assert one.crowned and two.crowned
    study.tell(second, two.value)
    study.tell(first, one.value)
    assert incumbent(study).number == second.number


def test_without_crown_seeds_the_race_seeds_judge_the_crown(tmp_path: Path) -> None:
    study, config = _racing_study(tmp_path, crown_seeds=0, crown_confidence=0.0)
    _race(study, config, [0.37, 0.36, 0.38])
    winner, granted, result = _race(study, config, [0.38, 0.37, 0.39])
    assert granted == [0, 1, 2] and result.outcome == "all 3 seeds; took the crown from trial 0"
    assert incumbent(study).number == winner.number


SIDE = {"seeds": 3, "crown_seeds": 0, "crown_confidence": 0.0, "collapse_guard": False, "side_by_side": True}


def _seed_runs_by_name(name: str, view: ViewType) -> dict[str, Run]:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name).experiment_id
    return {r.info.run_name: r for r in client.search_runs([experiment], run_view_type=view) if "seed" in r.data.tags}


def test_side_by_side_trains_seeds_ahead_together_and_cancels_those_the_race_does_not_grant(tmp_path: Path) -> None:
    tables = {"race": SIDE, "enqueue": [PRESET], "study": {"population": 3}}
    (tmp_path / "s.toml").write_text(tiny_study("ahead", 2, **tables))
    plant_incumbent("ahead", 0.99, seeds=3)  # trial 0: the preset (trial 1) loses its first seed to it

    with pytest.warns(UserWarning, match=r"side_by_side gains nothing here \(on CPU the lanes take turns\)"):
        assert main(["search", "s.toml", "--no-progress"]) == 0

    challenger = trials("ahead")[1]
    assert sorted(seed_runs(challenger)) == [0]
    assert challenger.user_attrs["race_outcome"] == "raced out after seed 0 (1 of 3)"
    assert [p.name for p in (tmp_path / "runs/ahead/trial-1").glob("seed-*")] == ["seed-0"]
    assert sorted(_seed_runs_by_name("ahead", ViewType.ACTIVE_ONLY)) == ["trial-1 seed-0"]
    # Seeds 1 and 2 trained beside seed 0 (started before it ended), then were cancelled: their runs deleted.
    cancelled = _seed_runs_by_name("ahead", ViewType.DELETED_ONLY)
    assert sorted(cancelled) == ["trial-1 seed-1", "trial-1 seed-2"]
    granted = _seed_runs_by_name("ahead", ViewType.ACTIVE_ONLY)["trial-1 seed-0"]
    assert all(run.info.start_time < granted.info.end_time for run in cancelled.values())
    assert not seed_runs_pending(challenger) and not open_seed_runs(challenger)


def test_side_by_side_records_each_granted_seed_once_and_a_stop_resumes_every_lane(tmp_path: Path) -> None:
    tables = {
        "race": {**SIDE, "seeds": 2},
        "enqueue": [PRESET],
        "study": {"population": 2},
        "train": {"iters": 40, "save_iter": 2, "eval_every": 40},  # both seeds in flight when the stop comes
    }
    (tmp_path / "s.toml").write_text(tiny_study("lanes", 1, **tables))
    process = search_until([tmp_path / f"runs/lanes/trial-0/seed-{seed}/checkpoint.pt" for seed in (0, 1)])
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 75, err.decode()
    first = trials("lanes")[0]
    assert first.state == optuna.trial.TrialState.FAIL and not seed_runs(first)  # both seeds were in flight

    # side_by_side is free to change between launches: the retry resumes both seeds one after the other.
    (tmp_path / "s.toml").write_text(
        tiny_study("lanes", 1, **{**tables, "race": {**tables["race"], "side_by_side": False}})
    )
    assert main(["search", "s.toml", "--no-progress"]) == 0

    retry = trials("lanes")[1]
    assert retry.state == optuna.trial.TrialState.COMPLETE and sorted(seed_runs(retry)) == [0, 1]
    runs = _seed_runs_by_name("lanes", ViewType.ALL)
    assert sorted(runs) == ["trial-0 seed-0", "trial-0 seed-1"]  # one run each, reopened by the retry
    assert {run.info.status for run in runs.values()} == {"FINISHED"}
    for seed in (0, 1):
        run = runs[f"trial-0 seed-{seed}"]
        assert int(run.data.tags["resumed_from_iteration"]) >= 2
        assert seed_runs(retry)[seed]["run_id"] == run.info.run_id


def test_when_minimizing_the_crown_stage_and_the_crown_go_to_the_lower_values(tmp_path: Path) -> None:
    study, config = _racing_study(tmp_path, direction="minimize")
    _race(study, config, [0.37, 0.36, 0.38])
    _, granted, result = _race(study, config, [0.30, 0.31, 0.29, 0.45])  # a crown seed far above: out
    assert granted == [0, 1, 2, 3] and result.outcome == "raced out after crown seed 3 (1 of 3)"
    lower, _, result = _race(study, config, [0.30, 0.31, 0.29, 0.30, 0.31, 0.29])
    assert result.crowned and incumbent(study).number == lower.number


def test_open_seed_runs_reads_both_forms_and_the_fingerprint_ignores_what_does_not_change_results() -> None:
    from mbu.search.launching.study import comparable

    def trial_with(attrs: dict) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(value=0.0, user_attrs=attrs)

    assert open_seed_runs(trial_with({"seed_run_open": {"seed": 2, "run_id": "abc"}})) == {2: "abc"}  # one in flight
    assert open_seed_runs(trial_with({"seed_run_open": {"0": "a", "1": "b"}})) == {0: "a", 1: "b"}
    assert open_seed_runs(trial_with({"seed_run_open": None})) == {}

    def race(**keys) -> dict:
        return {"train": {}, "race": {"seeds": 3, "margin": 0.0, **keys}}

    now = race(crown_seeds=3, crown_confidence=0.9, side_by_side=False)
    assert comparable(race()) != comparable(now)  # raced before the crown stage: crown_seeds 0 is named
    assert comparable(race(crown_seeds=0, crown_confidence=0.0)) == comparable(race())
    assert comparable({**now, "race": {**now["race"], "side_by_side": True}}) == comparable(now)
    guard_only = {"train": {}, "race": {"seeds": 1, "crown_seeds": 0, "crown_confidence": 0.9}}
    assert comparable(guard_only) == comparable({"train": {}, "race": {"seeds": 1}})  # no race, no crown


def test_a_slot_counts_every_place_its_lanes_hold(tmp_path: Path) -> None:
    """A lane on a borrowed place holds that place (and, on CUDA, its stream) until it ends, even once the
    lane on the slot's own place is gone: the population must not count it free."""
    from mbu.search.running.population import Population, RacingSlot, SeedLane

    study, _ = _racing_study(tmp_path)
    population = Population.__new__(Population)  # the bookkeeping alone: no device, no data
    population.size, population.side_by_side, population.slots = 3, True, []
    slot = RacingSlot(study, study.ask(), None)
    population.slots.append(slot)
    assert slot.width == 1 and population.lanes_for(slot) == 3 and not population.full

    slot.lanes = [SeedLane(0, None, None, None, False), SeedLane(1, None, None, None, True)]
    assert slot.width == 2 and population.lanes_for(slot) == 3
    slot.lanes = [SeedLane(1, None, None, None, True), SeedLane(2, None, None, None, True)]  # seed 0 granted
    assert slot.width == 3 and population.full and population.lanes_for(slot) == 3
    population.side_by_side = False
    assert population.lanes_for(slot) == 1


def test_a_challenger_that_finishes_before_the_first_preset_has_a_seed_is_not_crowned(tmp_path: Path) -> None:
    study, config = _racing_study(tmp_path)
    preset = study.ask()  # another worker's: trains its first seed while the challenger races
    suggest_params(preset, config)
    _, granted, result = _race(study, config, [0.45, 0.44, 0.43, 0.45, 0.44, 0.46])
    assert granted == [0, 1, 2, 3, 4, 5] and not result.crowned  # no evidence against it, none for it
    assert "no seed of trial 0 (the first preset) to judge it against yet: not crowned" in result.outcome
    assert incumbent(study) is None
    for seed, value in zip((0, 1, 2), (0.37, 0.36, 0.38), strict=True):
        assert next_seed(study, config, preset) == seed
        record_seed(preset, seed, {"value": value})
    assert next_seed(study, config, preset) is None
    verdict = finish_configuration(study, preset, config)
    study.tell(preset, verdict.value)
    assert verdict.crowned and incumbent(study).number == preset.number


@pytest.mark.slow
def test_a_killed_worker_with_two_lanes_in_flight_has_both_resumed_once(tmp_path: Path) -> None:
    tables = {
        "race": {**SIDE, "seeds": 2},
        "enqueue": [PRESET],
        "study": {"population": 2, "heartbeat_interval": 1, "grace_period": 2},
        "train": {"iters": 40, "save_iter": 2, "eval_every": 40},
    }
    (tmp_path / "s.toml").write_text(tiny_study("lost", 1, **tables))
    worker = search_until([tmp_path / f"runs/lost/trial-0/seed-{seed}/checkpoint.pt" for seed in (0, 1)])
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    killed = trials("lost")[0]
    assert killed.state == optuna.trial.TrialState.RUNNING and sorted(open_seed_runs(killed)) == [0, 1]
    time.sleep(3)  # past the grace period: the next worker finds the trial lost

    with pytest.warns(UserWarning, match="side_by_side gains nothing here"):  # lanes on a CPU
        assert main(["search", "s.toml", "--no-progress"]) == 0

    lost, retry = trials("lost")
    assert lost.state == optuna.trial.TrialState.FAIL and retry.state == optuna.trial.TrialState.COMPLETE
    assert sorted(seed_runs(retry)) == [0, 1]
    runs = _seed_runs_by_name("lost", ViewType.ALL)
    assert sorted(runs) == ["trial-0 seed-0", "trial-0 seed-1"]  # each lane's run reopened, none started anew
    for seed, run in ((s, runs[f"trial-0 seed-{s}"]) for s in (0, 1)):
        assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_iteration"]) >= 2
        assert seed_runs(retry)[seed]["run_id"] == run.info.run_id
