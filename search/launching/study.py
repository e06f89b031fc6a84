"""Opening a study: created or found again, refused when its file was edited, its presets queued,
and its run folder bound to it.

A study remembers what it was made with (search space, fixed training settings,
data) as a fingerprint; a relaunch whose study file changed any of those is
refused, since its trials would not be comparable. ``runs/<study>/study.json``
records the storage and the study's id, so another study of the same name never
writes into its folder.
"""

from __future__ import annotations

import json
import uuid
import warnings

import optuna

from mbu.base.files import write_json
from mbu.base.urls import missing_sqlite_file, storage_identity
from mbu.search.judging.race import CROWN_SEEDS_ATTR, RACE_SEEDS_ATTR, is_racing
from mbu.search.launching.sampler import make_pruner, make_sampler
from mbu.search.launching.storage import count_finished, make_storage
from mbu.search.running.tracking import RetryLostTrial
from mbu.search.running.trial import OBJECTIVE_KEY
from mbu.search.studyfile.study_file import StudyConfig, StudyFileError, runs_point
from mbu.train.config import free_between_launches

STUDY_UID_ATTR = "mbu_study_uid"  # Optuna study attribute: tells a study from a recreated one of the same name
STUDY_RECORD = "study.json"  # in runs/<study>/: the storage and study uid the folder belongs to
TRACKING_ATTR = "mbu_tracking_uri"  # Optuna study attribute: the MLflow store all its runs go to
FINGERPRINT_ATTR = "mbu_fingerprint"  # Optuna study attribute: the space, fixed settings and data it was made with
# Fixed settings that change how a trial runs or logs, not what it learns: free to edit between launches.
FREE_TRAIN_KEYS = free_between_launches()


def fingerprint(config: StudyConfig) -> dict:
    """What makes two launches' trials comparable: the search space, fixed settings and data."""
    value = {
        "space": {name: [r.low, r.high, r.log] for name, r in sorted(config.space.items())},
        "train": config.train,
        "data": config.data_root if config.synthetic is None else vars(config.synthetic),
    }
    if config.race is not None:  # absent for a study without [race], so that its stored fingerprint still matches
        value["race"] = vars(config.race)
    return comparable(json.loads(json.dumps(value, sort_keys=True, default=str)))


def comparable(stored: dict) -> dict:
    """A fingerprint without the ``[train]`` keys free to change between launches: applied to the stored one as
    well, so that a key made free since the study was created (``skip_bad``) no longer counts. A race stored
    before the crown stage existed raced without one: its crown keys read as 0, so the refusal names them."""
    value = {**stored, "train": {k: v for k, v in stored.get("train", {}).items() if k not in FREE_TRAIN_KEYS}}
    if "race" in value:
        race = {"crown_seeds": 0, "crown_confidence": 0.0} | value["race"]
        free = {"side_by_side"}  # where seeds train, not what they learn
        if int(race.get("seeds", 1)) <= 1:
            free |= {"crown_seeds", "crown_confidence"}  # no race, no crown
        value["race"] = {key: v for key, v in race.items() if key not in free}
    return value


def open_study(config: StudyConfig) -> optuna.Study:
    """Create or load the study, refuse a study file whose space changed, queue the presets."""
    settings = config.study
    storage = make_storage(settings, RetryLostTrial(settings.max_retry, settings.tracking_uri))
    study = optuna.create_study(
        study_name=settings.name,
        storage=storage,
        direction=settings.direction,
        sampler=make_sampler(settings.sampler, settings.seed),
        pruner=make_pruner(settings.pruner),
        load_if_exists=True,
    )
    current, stored = fingerprint(config), study.user_attrs.get(FINGERPRINT_ATTR)
    stored = None if stored is None else comparable(stored)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, current)
    elif stored != current:
        changed = sorted(k for k in current.keys() | stored.keys() if current.get(k) != stored.get(k))
        raise StudyFileError(
            f"{config.path}: study {settings.name!r} in {settings.storage} was created with a different "
            f"{' and '.join(changed)} (stored: {json.dumps({k: stored.get(k) for k in changed})}, "
            f"now: {json.dumps({k: current.get(k) for k in changed})}); its trials would "
            "not be comparable. Restore the file, or give [study].name a new name for a new study."
        )
    if study.metric_names is None:  # plots and optuna-dashboard then say what the value is
        with warnings.catch_warnings(category=optuna.exceptions.ExperimentalWarning, action="ignore"):
            study.set_metric_names([OBJECTIVE_KEY])
    if is_racing(config) and RACE_SEEDS_ATTR not in study.user_attrs:
        study.set_user_attr(RACE_SEEDS_ATTR, config.race.seeds)
        study.set_user_attr(CROWN_SEEDS_ATTR, config.race.crown_seeds)
    if STUDY_UID_ATTR not in study.user_attrs:
        study.set_user_attr(STUDY_UID_ATTR, uuid.uuid4().hex)
    if TRACKING_ATTR not in study.user_attrs:
        study.set_user_attr(TRACKING_ATTR, storage_identity(settings.tracking_uri))
    record_study_folder(config, study)
    queue_presets(study, config.enqueue, settings.max_retry, settings.n_trials)
    return study


def queue_presets(study: optuna.Study, points: list[dict[str, float]], max_retry: int, n_trials: int) -> None:
    """Queue each enqueued point that has no live trial; one whose trials failed is queued again, ``max_retry`` times.

    So a preset interrupted by Ctrl-C, a crash or a lost worker still runs on a later launch. A study that
    already has its ``n_trials`` finished trials runs no more, so nothing is queued there (it would wait
    forever); a point it never ran, added to the study file since, is named with how to run it.
    """
    trials = study.get_trials(deepcopy=False)
    finished = count_finished(study) >= n_trials
    new = [(i, point) for i, point in enumerate(points) if not any(runs_point(t, point) for t in trials)]
    for index, point in new if finished else []:
        print(
            f"[[enqueue]] point #{index + 1} ({json.dumps(point)}) is new to study {study.study_name!r}, which "
            f"has its {n_trials} trials already: not queued; launch it with --n-trials {n_trials + len(new)} to run "
            f"{'it' if len(new) == 1 else f'the {len(new)} new points'}",
            flush=True,
        )
    for point in [] if finished else points:
        same = [t for t in trials if runs_point(t, point)]
        failures = sum(t.state == optuna.trial.TrialState.FAIL for t in same)
        if len(same) == failures and failures <= max_retry:
            study.enqueue_trial(point)


def check_study_folder(config: StudyConfig) -> None:
    """Refuse a run folder that holds another study's trials (same name, other storage, or recreated).

    Runs before anything is written, so the other study's checkpoints and reports stay as they are.
    """
    record = config.study_dir / STUDY_RECORD
    if not record.is_file():
        return
    saved = json.loads(record.read_text())
    storage, name = config.study.storage, config.study.name
    advice = f"set [study].runs_dir to another folder (or move {config.study_dir} away) for this study"
    if saved["storage"] != storage_identity(storage):
        raise StudyFileError(
            f"{config.study_dir} holds the trials of study {name!r} in {saved['storage']}, not {storage}; {advice}"
        )
    if missing_sqlite_file(storage) is not None:
        stored = None  # the whole storage file is gone (loading it would create an empty one)
    else:
        try:
            stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(STUDY_UID_ATTR)
        except KeyError:
            stored = None  # the study was deleted from the storage
    if stored != saved["uid"]:
        raise StudyFileError(
            f"{config.study_dir} holds the trials of an earlier study {name!r} in {storage} that no longer "
            f"exists there; {advice}"
        )


def check_tracking_store(config: StudyConfig) -> None:
    """Refuse a launch that would log the study's runs to another MLflow store than its earlier launches.

    One study's parent and trial runs live in one store; a top-up elsewhere would split them.
    """
    settings = config.study
    if missing_sqlite_file(settings.storage) is not None:
        return  # a new storage: nothing logged anywhere yet
    try:
        stored = optuna.load_study(study_name=settings.name, storage=settings.storage).user_attrs.get(TRACKING_ATTR)
    except KeyError:
        return  # a new study
    current = storage_identity(settings.tracking_uri)
    if stored is not None and stored == current and missing_sqlite_file(settings.tracking_uri) is not None:
        raise StudyFileError(
            f"study {settings.name!r} in {settings.storage} logged its runs to the MLflow store {stored}, whose "
            f"file {missing_sqlite_file(settings.tracking_uri)} no longer exists: restore it (a new empty store "
            "would hold none of the study's runs), or give [study].name a new name for a new study"
        )
    if stored is not None and stored != current:
        raise StudyFileError(
            f"{config.path}: study {settings.name!r} in {settings.storage} logs its runs to the MLflow store "
            f"{stored}, not {current}; launch it with --tracking-uri {stored} (or that [study].tracking_uri), "
            "or give [study].name a new name for a study in the new store"
        )


def record_study_folder(config: StudyConfig, study: optuna.Study) -> None:
    """Write which storage and study the run folder belongs to (checked by :func:`check_study_folder`)."""
    record = config.study_dir / STUDY_RECORD
    if not record.is_file():
        uid = study.user_attrs[STUDY_UID_ATTR]
        write_json(record, {"storage": storage_identity(config.study.storage), "study": config.study.name, "uid": uid})
