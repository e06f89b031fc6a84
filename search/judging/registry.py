"""The study's champion in the MLflow Model Registry, under the alias ``champion``.

The champion is the confirmed best (``confirm_report.json``) once a
confirmation has all its runs, else the best trial, tagged ``unconfirmed``.
Its search-time trial run gets the model (``evaluate.packaged``: weights,
config and validation-chosen threshold) in its ``model/`` artifacts, a new
version of ``[study].registered_model`` (default: the study's name) points at
it, and the alias moves there. A launch whose champion is the one the alias
already names (same run, same confirmation state) changes nothing.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.exceptions import MlflowException

from mbu.base.run_files import CHECKPOINT_FILE, REPORT_FILE, RUN_FILE
from mbu.base.urls import missing_sqlite_file
from mbu.evaluate.model_save import log_model_package
from mbu.evaluate.packaged import MODEL_ARTIFACT, SETTINGS_FILE, WEIGHTS_BYTES, WEIGHTS_FILE
from mbu.search.judging.confirm_report import CONFIRM_REPORT_JSON
from mbu.search.judging.race import best_run_folder, incumbent, seed_count
from mbu.search.judging.race_report import race_summary
from mbu.search.running.trial import trial_dir
from mbu.search.studyfile.study_file import StudyConfig
from mbu.train.tracking import Recorder

ALIAS = "champion"


@dataclass
class Champion:
    """The trial whose weights the study publishes, and the figures its model version carries."""

    trial: int
    run_id: str
    folder: Path
    threshold: float
    confirmed: bool
    tags: dict[str, str]
    description: str


def registered_name(config: StudyConfig) -> str:
    """The Model Registry name (``""``: the study registers nothing)."""
    name = config.study.registered_model
    return config.study.name if name is None else name


PARTIAL = "partial"  # a confirmation with runs still to finish: the champion waits for it


def confirmed_best(study_dir: Path) -> tuple[int, dict[str, Any]] | str | None:
    """(trial, candidate entry) of a finished confirmation's confirmed best, ``PARTIAL``, or None (no report)."""
    path = study_dir / CONFIRM_REPORT_JSON
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    best = report.get("confirmed_best")
    if not best or report.get("runs_finished") != report.get("runs_planned"):
        return PARTIAL  # e.g. a stopped top-up, or another worker still training the last run
    entry = next(c for c in report["candidates"] if c["trial"] == best["trial"])
    return int(best["trial"]), entry


def choose_champion(study: optuna.Study, config: StudyConfig) -> Champion | None:
    """The champion of a study with a complete trial (None before, or while a confirmation is partial)."""
    confirmation = confirmed_best(config.study_dir)
    if confirmation == PARTIAL:
        return None
    if confirmation is None:
        best = incumbent(study)  # a racing study's: the configuration holding the crown
        if best is None:
            return None
        number = best.number
    else:
        number = confirmation[0]
    folder = best_run_folder(study, number, config.study_dir) or trial_dir(config, number)
    run_id = json.loads((folder / RUN_FILE).read_text())["run_id"]
    metrics = json.loads((folder / REPORT_FILE).read_text())["metrics"]
    threshold, test_iou = float(metrics["val/threshold_best"]), float(metrics["test/iou"])
    tags = {
        "study": config.study.name,
        "trial": str(number),
        "mlflow_run": run_id,
        "threshold": f"{threshold:.2f}",
        "test_iou": f"{test_iou:.4f}",
        "data": config.data_root or f"synthetic, {config.synthetic.size} px",
        "confirmed": "false" if confirmation is None else "true",
    }
    race = race_summary(study) if seed_count(study) > 1 else None
    raced = next((r for r in race.ranked if r.trial == number), None) if race is not None else None
    if raced is not None:
        iv = raced.test_interval
        tags["race_seeds"] = ",".join(str(seed) for seed in raced.seeds)
        tags["race_test_iou"] = f"{iv.mean:.4f}" + ("" if iv.low is None else f" [{iv.low:.4f}, {iv.high:.4f}]")
    if confirmation is None and raced is not None:
        tags["unconfirmed"] = "true"
        figure = (
            f"mean test IoU over its race's seeds {tags['race_seeds']}: {tags['race_test_iou']} (95% interval); "
            f"this seed's {test_iou:.4f}; not confirmed on fresh seeds: mbu confirm {config.path}"
        )
    elif confirmation is None:
        tags["unconfirmed"] = "true"
        figure = f"search-time test IoU {test_iou:.4f} (one seed, not confirmed: mbu confirm {config.path})"
    else:
        fresh = confirmation[1]["test_iou"]
        interval = "" if fresh["low"] is None else f" [{fresh['low']:.4f}, {fresh['high']:.4f}]"  # None: 1 seed
        tags["confirmed_test_iou"] = f"{fresh['mean']:.4f}{interval}"
        within = f", 95% interval{interval}" if interval else " (one seed: no interval)"
        figure = f"test IoU on {fresh['n']} fresh seed(s) {fresh['mean']:.4f}{within}; search-time {test_iou:.4f}"
    description = (
        f"Champion of study {config.study.name}: trial {number}, {figure}; mask threshold {threshold:.2f} "
        f"(chosen on validation); data: {tags['data']}; MLflow run {run_id}."
    )
    return Champion(number, run_id, folder, threshold, confirmation is not None, tags, description)


def current_version(client: mlflow.MlflowClient, name: str) -> Any | None:
    """The version the alias names, or None (no such model or alias yet)."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise  # a server that fails is not "no champion yet": registering now would duplicate it


def has_model(client: mlflow.MlflowClient, run_id: str) -> bool:
    """The run holds a whole model: both files, the weights of the size the settings file records (an upload
    cut short leaves its MLmodel without the weights, or part of them)."""
    folder = f"{MODEL_ARTIFACT}/artifacts"
    sizes = {item.path: item.file_size for item in client.list_artifacts(run_id, folder)}
    weights, settings = f"{folder}/{WEIGHTS_FILE}", f"{folder}/{SETTINGS_FILE}"
    if weights not in sizes or settings not in sizes:
        return False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            recorded = json.loads(Path(client.download_artifacts(run_id, settings, tmp)).read_text())
    except (ValueError, MlflowException):  # a settings file cut short: the model is logged again
        return False
    expected = recorded.get(WEIGHTS_BYTES)
    return expected is None or sizes[weights] == expected  # None: a model written before sizes were recorded


def refresh_figures(client: mlflow.MlflowClient, name: str, version: Any, champion: Champion) -> None:
    """Bring the version's tags and description up to the champion's current figures."""
    for key, value in champion.tags.items():
        if version.tags.get(key) != value:
            client.set_model_version_tag(name, version.version, key, value)
    if version.description != champion.description:
        client.update_model_version(name, version.version, description=champion.description)


def other_owner(client: mlflow.MlflowClient, name: str, study_name: str) -> str | None:
    """Another study whose champions registered model ``name`` already holds (its versions' ``study`` tag)."""
    versions = client.search_model_versions(f"name = '{name}'")
    owners = sorted({v.tags.get("study") for v in versions} - {study_name, None})
    return owners[0] if owners else None


def publish_champion(study: optuna.Study, config: StudyConfig, tracking_uri: str) -> str | None:
    """Register the study's champion (if it changed) and point the alias at it; the line to print, or None.

    A registered model that holds another study's champions is refused (ValueError): its alias would
    flip between the two studies at every launch.
    """
    name = registered_name(config)
    champion = choose_champion(study, config) if name else None
    if champion is None:
        return None
    client = mlflow.MlflowClient(tracking_uri)
    owner = other_owner(client, name, config.study.name)
    if owner is not None:
        raise ValueError(
            f"registered model {name!r} holds the champions of study {owner!r}; give study "
            f'{config.study.name!r} its own [study].registered_model ("" registers nothing)'
        )
    uri = f"models:/{name}@{ALIAS}"
    state = "confirmed" if champion.confirmed else "unconfirmed"
    current = current_version(client, name)
    if (
        current is not None
        and current.run_id == champion.run_id
        and current.tags.get("confirmed") == str(champion.confirmed).lower()
    ):
        refresh_figures(client, name, current, champion)  # a confirmation topped up: same model, new figures
        return f"champion: {uri} (version {current.version}, trial {champion.trial}, {state}; unchanged)"
    if not has_model(client, champion.run_id):
        settings = {"study": config.study.name, "trial": champion.trial, "run_id": champion.run_id}
        recorder = Recorder.of_run(tracking_uri, champion.run_id)
        log_model_package(recorder, champion.folder / CHECKPOINT_FILE, champion.threshold, settings)
    try:
        client.create_registered_model(name, description=f"Champions of study {config.study.name} (mbu).")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(champion.run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = client.create_model_version(
        name, source, run_id=champion.run_id, tags=champion.tags, description=champion.description
    )
    client.set_registered_model_alias(name, ALIAS, version.version)
    return f"champion: {uri} (version {version.version}, trial {champion.trial}, {state})"


def champion_line(config: StudyConfig, tracking_uri: str) -> str | None:
    """``mbu search --summary``'s line naming the registered champion; None when the study registers none."""
    name = registered_name(config)
    if not name:
        return None
    if missing_sqlite_file(tracking_uri) is not None:  # reading would create an empty store
        return f"champion: none registered yet (no MLflow store at {tracking_uri})"
    version = current_version(mlflow.MlflowClient(tracking_uri), name)
    if version is None:
        return f"champion: none registered yet (models:/{name}@{ALIAS})"
    state = "confirmed" if version.tags.get("confirmed") == "true" else "unconfirmed"
    trial = version.tags.get("trial", "?")
    return f"champion: models:/{name}@{ALIAS} (version {version.version}, trial {trial}, {state})"
