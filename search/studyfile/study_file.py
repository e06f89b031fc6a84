"""Study files (TOML): parsed into typed configs and checked before anything runs, each error naming its key.

Layout::

    [study]            name, direction, n_trials, sampler, seed, pruner, storage, tracking_uri, runs_dir,
                       heartbeat_interval, grace_period, max_retry, max_failures, population,
                       keep_checkpoints, registered_model
    [data]             root = "DIR"   or   [data.synthetic] size, n_train, n_test, seed
    [train]            fixed training settings (the ``mbu train`` flag names)
    [space.NAME]       low, high, log: one table per sampled parameter
    [[enqueue]]        parameter values to try first (e.g. the published presets)
    [slurm]            partition, tasks, gpus_per_task, cpus_per_task, mem_gb, time_min, signal_delay_s,
                       max_requeue, single_node, sbatch, setup: ``mbu search --slurm`` (see ``search.cluster.slurm``)
    [confirm]          top_k, seeds, presets: retrain the best trials on fresh seeds (see ``search.judging.confirm``)
    [race]             seeds, margin, collapse_guard, collapse_margin, collapse_marked: race configurations
                       over paired seeds and end collapsed runs early (see ``search.judging.race``)
"""

from __future__ import annotations

import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mbu.data.images import MIN_ANNOTATED, DataError, count_annotated
from mbu.data.synthetic import SynthConfig
from mbu.search.studyfile.confirm_settings import ConfirmSettings, parse_confirm
from mbu.search.studyfile.race_settings import RaceSettings, parse_race
from mbu.search.studyfile.slurm_settings import SlurmSettings, slurm_problem
from mbu.search.studyfile.typed_tables import StudyFileError, check_keys, check_types, typed_table
from mbu.train.config import MIN_BATCH, MIN_BATCH_REASON, WEIGHT_NAMES, TrainConfig, study_train_keys
from mbu.train.losses import LossWeights
from mbu.train.step import DeviceError, parse_device

# The one list of sampler and pruner names: the study file's check, search.launching.sampler, the docs test and the
# tests all read it. Each name maps to the Optuna class it builds (optuna.samplers / optuna.pruners).
SAMPLERS = {"tpe": "TPESampler", "cmaes": "CmaEsSampler", "gp": "GPSampler", "random": "RandomSampler"}
PRUNERS = {"none": "NopPruner", "median": "MedianPruner", "hyperband": "HyperbandPruner"}
DIRECTIONS = ("maximize", "minimize")
TRAIN_KEYS = study_train_keys()  # the rest (root, out, load, gpu) the study sets for each trial
FLOAT_PARAMS = {"lr", "disclr", *WEIGHT_NAMES}
TABLES = ("study", "data", "train", "space", "enqueue", "slurm", "confirm", "race")  # the study file's top-level tables
SEED_LIMIT = 2**32  # samplers take seeds in [0, 2**32)
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a folder name anywhere, never a path
NAMING = "use letters, digits, '.', '_' and '-' (starting with a letter or digit, at most 100)"


def runs_point(trial: Any, point: dict[str, float]) -> bool:
    """Whether an Optuna trial ran that (possibly partial) ``[[enqueue]]`` point: its fixed or sampled values match."""
    params = trial.system_attrs.get("fixed_params") or trial.params
    return all(params.get(name) == value for name, value in point.items())


def trial_name(number: int) -> str:
    """``trial-<n>``: a trial's run folder under ``runs/<study>/`` and its MLflow run name."""
    return f"trial-{number}"


@dataclass
class StudySettings:
    name: str  # Optuna study name, MLflow experiment name, runs/<name>/ folder
    direction: str = "maximize"  # of the objective, validation best-threshold IoU
    n_trials: int = 10  # finished trials (complete or pruned) the study should reach
    sampler: str = "tpe"  # tpe, cmaes, gp or random; all seeded
    seed: int = 0  # sampler seed
    pruner: str = "none"  # none, median or hyperband (on validation IoU every eval_every iterations)
    storage: str = "sqlite:///optuna.db"  # Optuna storage URL
    tracking_uri: str = ""  # MLflow tracking URI; empty: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db
    runs_dir: str = "runs"  # trial folders go to runs_dir/<name>/trial-<n>/
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats in the storage
    grace_period: int = 300  # a trial silent this long is failed (its worker died) and retried
    max_retry: int = 2  # retries of a trial whose worker died (or a preset that failed); resumes from its checkpoint
    max_failures: int = 3  # a launch stops after this many failed trials in a row (exit code 1)
    population: int = 1  # trials one worker process trains at once on its device (see docs/scaling.md, "Populations")
    keep_checkpoints: int = 0  # full checkpoints for the N best complete trials, weights only for the rest; 0: all
    registered_model: str | None = None  # Model Registry name of the study's champion; None: the study's name; "": off


@dataclass
class ParamRange:
    low: float  # smallest value sampled
    high: float  # largest value sampled
    log: bool = False  # sample uniformly in log space


@dataclass
class StudyConfig:
    path: Path
    study: StudySettings
    data_root: str | None  # a prepared data root, or None for synthetic data
    synthetic: SynthConfig | None  # the synthetic data to generate, or None
    train: dict[str, Any] = field(default_factory=dict)  # fixed training settings
    space: dict[str, ParamRange] = field(default_factory=dict)  # sampled parameters
    enqueue: list[dict[str, float]] = field(default_factory=list)  # first trials
    slurm: SlurmSettings = field(default_factory=SlurmSettings)  # mbu search --slurm
    confirm: ConfirmSettings | None = None  # [confirm]: None, no confirmation stage
    race: RaceSettings | None = None  # [race]: None, one seed per configuration and no collapse guard
    experiment: str = ""  # MLflow experiment of the runs; empty: the study's name (set for a confirmation)
    queued_only: bool = False  # trials are only the queued ones, never sampled (a confirmation's runs)

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.study.name

    @property
    def study_dir(self) -> Path:
        return Path(self.study.runs_dir) / self.study.name

    def resolved_data_root(self) -> Path:
        if self.data_root is not None:
            return Path(self.data_root)
        return self.study_dir / f"synthetic-{self.synthetic.size}px-seed{self.synthetic.seed}"

    def sample_at_lows(self) -> TrainConfig:
        """A trial's config with every sampled parameter at its low end: the fixed settings, checked whole."""
        return self.trial_config({name: r.low for name, r in self.space.items()}, self.study_dir / "check")

    def trial_config(self, params: dict[str, float], out: Path) -> TrainConfig:
        """Fixed settings plus one trial's sampled values, as a training config."""
        values = {**self.train, **params}
        weights = {k: values.pop(k) for k in list(values) if k in WEIGHT_NAMES}
        base_weights = TrainConfig().weights
        merged = {f.name: weights.get(f.name, getattr(base_weights, f.name)) for f in fields(base_weights)}
        # Absolute paths: the run folder's config then works from any directory (mbu eval --run ...).
        root, out = self.resolved_data_root().resolve(), Path(out).resolve()
        return TrainConfig(root=str(root), out=str(out), weights=merged, **values)


def _check_scorable(path: Path, root: str) -> None:
    """A data root whose annotated test A images cannot fill a validation and a test half is refused."""
    try:
        count = count_annotated(Path(root))
    except DataError as err:
        raise StudyFileError(f"{path}: [data].root: {err}") from err
    if count is not None and count < MIN_ANNOTATED:
        raise StudyFileError(
            f"{path}: [data].root {root} has {count} test A image(s) with a mask in testA_masks/, fewer than "
            f"{MIN_ANNOTATED}: every trial is scored on a validation half (choosing the threshold) and a test half"
        )


def _check_tables(raw: dict[str, Any], path: Path) -> None:
    """Only the known tables at the top level; a stray key there (outside any table) is named as such."""
    for name in sorted(set(raw) - set(TABLES)):
        known = ", ".join(f"[{t}]" for t in TABLES)
        if isinstance(raw[name], dict | list):
            raise StudyFileError(f"{path}: unknown table [{name}] (known tables: {known})")
        raise StudyFileError(f"{path}: key {name} is outside any table; put it under one of {known}")


def read_toml(path: Path) -> dict[str, Any]:
    """The study file's tables, or one line saying why it cannot be read."""
    if path.is_dir():
        raise StudyFileError(f"study file {path} is a folder; give the .toml file itself (e.g. {path}/NAME.toml)")
    if not path.is_file():
        raise StudyFileError(f"study file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise StudyFileError(
            f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
            "save the study file as UTF-8"
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise StudyFileError(f"{path}: not valid TOML: {err}") from err
    _check_tables(raw, path)
    return raw


def parse_study(raw: dict[str, Any], path: Path) -> StudySettings:
    """``[study]``."""
    if "study" not in raw or "name" not in raw["study"]:
        raise StudyFileError(f"{path}: missing key [study].name")
    study = typed_table(StudySettings, "[study]", raw["study"], path)
    for key, what in (("name", "a folder and an MLflow experiment"), ("registered_model", "a registered model")):
        value = getattr(study, key)
        if (key == "name" or value) and not (isinstance(value, str) and STUDY_NAME.fullmatch(value)):
            raise StudyFileError(f"{path}: [study].{key} {value!r} cannot name {what}: {NAMING}")
    for key, value, allowed in (
        ("direction", study.direction, DIRECTIONS),
        ("sampler", study.sampler, SAMPLERS),
        ("pruner", study.pruner, PRUNERS),
    ):
        if value not in allowed:
            raise StudyFileError(f"{path}: [study].{key} must be one of {tuple(allowed)}, got {value!r}")
    for key in ("n_trials", "heartbeat_interval", "grace_period", "max_failures", "population"):
        value = getattr(study, key)
        if not isinstance(value, int) or value < 1:
            raise StudyFileError(f"{path}: [study].{key} must be a positive integer, got {value!r}")
    if study.grace_period <= study.heartbeat_interval:
        raise StudyFileError(
            f"{path}: [study].grace_period must exceed heartbeat_interval ({study.heartbeat_interval})"
        )
    for key in ("max_retry", "keep_checkpoints"):
        if not isinstance(getattr(study, key), int) or getattr(study, key) < 0:
            raise StudyFileError(f"{path}: [study].{key} must be an integer >= 0, got {getattr(study, key)!r}")
    if not 0 <= study.seed < SEED_LIMIT:
        raise StudyFileError(f"{path}: [study].seed must be an integer in [0, 2**32), got {study.seed!r}")
    return study


def parse_data(raw: dict[str, Any], path: Path) -> tuple[str | None, SynthConfig | None]:
    """``[data]``: a data root (checked to be scorable) or the synthetic set to generate."""
    data = raw.get("data", {})
    check_keys("[data]", data, {"root", "synthetic"}, path)
    if ("root" in data) == ("synthetic" in data):
        raise StudyFileError(f"{path}: [data] needs exactly one of root or synthetic")
    if "root" in data:
        data_root = str(data["root"])
        if not Path(data_root).is_dir():
            raise StudyFileError(f"{path}: [data].root {data_root} is not a folder")
        _check_scorable(path, data_root)
        return data_root, None
    synthetic = typed_table(SynthConfig, "[data.synthetic]", data["synthetic"], path)
    if synthetic.n_test < MIN_ANNOTATED:
        raise StudyFileError(
            f"{path}: [data.synthetic].n_test must be at least {MIN_ANNOTATED}, got {synthetic.n_test}: "
            "every trial is scored on a validation half (choosing the threshold) and a test half of them"
        )
    return None, synthetic


def parse_train(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``[train]``: fixed training settings, by ``mbu train``'s flag names."""
    train = dict(raw.get("train", {}))
    check_keys("[train]", train, TRAIN_KEYS, path)
    check_types({**typing.get_type_hints(TrainConfig), **typing.get_type_hints(LossWeights)}, "[train]", train, path)
    if "device" in train:
        try:
            parse_device(train["device"])  # whether it exists here is checked at launch, on the machine that trains
        except DeviceError as err:
            raise StudyFileError(f"{path}: [train].device: {err}") from err
    return train


def parse_space(raw: dict[str, Any], train: dict[str, Any], path: Path) -> dict[str, ParamRange]:
    """``[space.NAME]``: the sampled parameters, none of them also fixed in ``[train]``."""
    space: dict[str, ParamRange] = {}
    for name, spec in raw.get("space", {}).items():
        if name not in FLOAT_PARAMS:
            raise StudyFileError(
                f"{path}: [space.{name}] is not a searchable parameter (searchable: {', '.join(sorted(FLOAT_PARAMS))})"
            )
        if name in train:
            raise StudyFileError(f"{path}: {name} is both fixed in [train] and sampled in [space.{name}]")
        if not isinstance(spec, dict):
            raise StudyFileError(f"{path}: [space.{name}] must be a table with low, high and log")
        rng = typed_table(ParamRange, f"[space.{name}]", spec, path)
        if not rng.low < rng.high:
            raise StudyFileError(f"{path}: [space.{name}] needs low < high, got low={rng.low}, high={rng.high}")
        if rng.log and rng.low <= 0:
            raise StudyFileError(f"{path}: [space.{name}] is log scale, so low must be > 0, got {rng.low}")
        space[name] = rng
    return space


def parse_enqueue(raw: dict[str, Any], space: dict[str, ParamRange], path: Path) -> list[dict[str, float]]:
    """``[[enqueue]]``: points to try first, each inside the space."""
    enqueue = []
    for i, point in enumerate(raw.get("enqueue", [])):
        where = f"[[enqueue]] #{i + 1}"
        check_keys(where, point, set(space), path)
        check_types(dict.fromkeys(point, float), where, point, path)
        for name, value in point.items():
            if not space[name].low <= value <= space[name].high:
                raise StudyFileError(f"{path}: {where}: {name}={value} is outside [space.{name}]")
        enqueue.append({k: float(v) for k, v in point.items()})
    return enqueue


def parse_slurm(raw: dict[str, Any], path: Path) -> SlurmSettings:
    """``[slurm]``."""
    slurm = typed_table(SlurmSettings, "[slurm]", raw.get("slurm", {}), path)
    problem = slurm_problem(slurm)
    if problem is not None:
        raise StudyFileError(f"{path}: [slurm].{problem[0]} {problem[1]}")
    return slurm


def check_race(config: StudyConfig) -> None:
    """``[race]`` against the rest of the file: it needs a first incumbent, and no pruner may cut a seed run short."""
    race, path = config.race, config.path
    if race is None or race.seeds == 1:
        return
    if not config.enqueue:
        raise StudyFileError(
            f"{path}: [race] needs an [[enqueue]] point: the first one (e.g. the published preset) is the first "
            f"incumbent and trains all {race.seeds} seeds"
        )
    if config.study.pruner != "none":
        raise StudyFileError(
            f"{path}: [race] with seeds = {race.seeds} and [study].pruner = {config.study.pruner!r}: the pruner would "
            'cut seed runs short and the race would compare unfinished runs; set pruner = "none" (the race and '
            "the collapse guard end poor runs early) or seeds = 1"
        )


def check_trial_config(config: StudyConfig) -> None:
    """One trial's config built now, so that a bad fixed value fails here, not after data generation."""
    path = config.path
    try:
        sample = config.sample_at_lows()
    except (TypeError, ValueError) as err:
        raise StudyFileError(f"{path}: [train]: {err}") from err
    if sample.bs < MIN_BATCH:
        raise StudyFileError(f"{path}: [train].bs = {sample.bs}: {MIN_BATCH_REASON}")
    if config.synthetic is not None and config.synthetic.n_train < sample.bs:
        raise StudyFileError(
            f"{path}: [data.synthetic].n_train = {config.synthetic.n_train} is fewer images than the batch "
            f"([train].bs = {sample.bs}); raise n_train or lower bs"
        )


def load_study_file(path: Path | str) -> StudyConfig:
    """The study file parsed, table by table, and checked; the first problem raises :class:`StudyFileError`."""
    path = Path(path)
    raw = read_toml(path)
    study = parse_study(raw, path)
    data_root, synthetic = parse_data(raw, path)
    train = parse_train(raw, path)
    space = parse_space(raw, train, path)
    config = StudyConfig(path, study, data_root, synthetic, train, space, parse_enqueue(raw, space, path))
    config.slurm = parse_slurm(raw, path)
    config.confirm = parse_confirm(raw, path)
    config.race = parse_race(raw, path)
    check_race(config)
    check_trial_config(config)
    return config
