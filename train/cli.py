"""``mbu train``: the reference ``mask_train.py`` flags, plus device, seed and MLflow."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mbu.base.run_files import CHECKPOINT_FILE, CONFIG_FILE
from mbu.data.files import check_writable
from mbu.data.images import (
    MIN_ANNOTATED,
    DataError,
    count_annotated,
    list_images,
    load_display_images,
    pair_annotations,
    read_domains,
)
from mbu.train.checkpoint import check_resumable, load_checkpoint
from mbu.train.config import GROUPS, MIN_BATCH, MIN_BATCH_REASON, WEIGHT_NAMES, TrainConfig, declared_settings
from mbu.train.losses import LossWeights
from mbu.train.step import check_step_device, resolve_device

if TYPE_CHECKING:
    from mbu.train.tracking import Recorder

GIVEN = "given_flags"  # Namespace attribute: the destinations of the flags the user actually typed


class _Given(argparse.Action):
    """``store`` that remembers the flag was given, so ``--load`` can tell a typed value from a default."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, GIVEN, set()))
        setattr(namespace, GIVEN, given | {self.dest})


def add_train_arguments(parser: argparse.ArgumentParser, config_type: type[TrainConfig] = TrainConfig) -> None:
    """A flag for each declared setting that has one (``train.config``): every ``mask_train.py`` flag keeps
    its name, default and meaning; numbers are typed."""
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for setting in declared_settings(config_type):
        if setting.flag is None:
            continue
        group = groups[setting.group]
        if setting.type is bool:  # a switch: given when set
            group.add_argument(setting.flag, dest=setting.name, action="store_true", help=setting.help)
            continue
        shown = "" if setting.default in (None, "") else " (default: %(default)s)"
        group.add_argument(
            setting.flag,
            dest=setting.name,
            action=_Given,
            type=None if setting.type is str else setting.type,
            choices=setting.choices,
            default=setting.default,
            help=setting.help + shown,
        )


def config_from_args(args: argparse.Namespace, config_type: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The flags' values as a config; a setting with no flag keeps its default."""
    values = {s.name: getattr(args, s.name) for s in declared_settings(config_type) if s.flag is not None}
    weights = {name: values.pop(name) for name in WEIGHT_NAMES}
    return config_type(weights=LossWeights(**weights), **values)


def typed_flags(args: argparse.Namespace, config_type: type[TrainConfig] = TrainConfig) -> set[str]:
    """The settings the user typed on the command line (not left at their defaults; a switch when set)."""
    switches = {s.name for s in declared_settings(config_type) if s.type is bool and s.flag is not None}
    return set(getattr(args, GIVEN, set())) | {name for name in switches if getattr(args, name, False)}


def resume_config(cfg: TrainConfig, saved: dict, given: set[str]) -> TrainConfig:
    """``cfg`` resuming a checkpoint, by each setting's declared effect (``train.config``).

    ``model`` settings are the checkpoint's (a typed flag that contradicts one is refused); ``machine``
    settings and those with no flag are ``cfg``'s; the rest are ``cfg``'s where typed, else the checkpoint's.
    """
    config_type = type(cfg)
    settings = declared_settings(config_type)
    saved_cfg = config_type.from_dict(saved)

    def value(config: TrainConfig, name: str) -> object:
        return getattr(config.weights, name) if name in WEIGHT_NAMES else getattr(config, name)

    conflicts = [
        f"--{s.name} {value(cfg, s.name)} (checkpoint: {value(saved_cfg, s.name)})"
        for s in settings
        if s.effect == "model" and s.name in given and value(cfg, s.name) != value(saved_cfg, s.name)
    ]
    if conflicts:
        raise ValueError(
            f"--load {cfg.load}: {', '.join(conflicts)} contradicts the checkpoint it resumes; drop the flag "
            "to continue with the checkpoint's settings, or train a new run without --load"
        )
    values = saved_cfg.to_dict()
    for s in settings:
        if s.effect != "model" and (s.effect == "machine" or s.flag is None or s.name in given):
            values[s.name] = getattr(cfg, s.name)
    return config_type.from_dict(values)


def check_run_folder(cfg: TrainConfig, overwrite: bool) -> None:
    """Refuse to train over a run folder that holds a checkpoint, unless resuming it or told to."""
    out = Path(cfg.out)
    resuming_here = bool(cfg.load) and Path(cfg.load).resolve() == out.resolve()
    if overwrite and resuming_here:
        raise ValueError(f"--overwrite would delete the checkpoint that --load {cfg.load} resumes; drop --overwrite")
    if overwrite or not (out / CHECKPOINT_FILE).exists() or resuming_here:
        return
    raise FileExistsError(
        f"{out} already holds a trained run ({out / CHECKPOINT_FILE}): resume it with --load {out}, "
        "choose another --out, or pass --overwrite to replace it"
    )


def clear_run_folder(out: Path) -> None:
    """Delete what an earlier run left in ``out`` (``--overwrite``): its checkpoint, grids and reports.

    The reports of ``mbu eval`` on other masks or data (``eval-*/``) go too: they scored the old model.
    Only the files mbu writes there are deleted; a folder that still holds anything else is kept.
    """
    import shutil

    from mbu.base.run_files import GRIDS_DIR, REPORT_FILES, RUN_FILE, SKIPPED_FILE

    for name in (CHECKPOINT_FILE, CONFIG_FILE, SKIPPED_FILE, RUN_FILE, *REPORT_FILES):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / GRIDS_DIR, ignore_errors=True)
    for folder in out.glob("eval-*"):
        if folder.is_dir() and not folder.is_symlink():
            for name in REPORT_FILES:
                (folder / name).unlink(missing_ok=True)
            if not any(folder.iterdir()):
                folder.rmdir()


def check_resume_iterations(cfg: TrainConfig, state: dict) -> None:
    """Refuse a resume that would train nothing: ``--iters`` at or below the checkpoint's iteration."""
    done = int(state["iteration"])
    if cfg.iters <= done:
        raise ValueError(
            f"--load {cfg.load}: its checkpoint is at iteration {done} and --iters is {cfg.iters}, so there is "
            f"nothing to train; give --iters larger than {done} to train more (or --log-model to log its model)"
        )


def check_training_data(cfg: TrainConfig, progress: bool) -> None:
    """Refuse, before anything is written, data a training would stop on after its run was opened.

    A batch of one, a batch larger than a domain, or an unreadable image (without ``skip_bad``) is an
    error naming the flag, the domain or the file. The domains are decoded here (or found in the
    decode cache) and cached once accepted, so the training reads them back without decoding them
    again; the few display images are decoded too.
    """
    if cfg.bs < MIN_BATCH:
        raise ValueError(f"--bs {cfg.bs}: {MIN_BATCH_REASON}")
    root, domains = Path(cfg.root), ("trainA", "trainB")
    for domain in domains:  # the file count first: no decoding when the batch cannot fit anyway
        _check_batch_fits(cfg, domain, len(list_images(root, domain)), "")
    found = read_domains(root, domains, cfg.resize, progress, cfg.skip_bad)
    for domain, count in found.counts.items():
        _check_batch_fits(cfg, domain, count, "readable ")
    load_display_images(root, cfg.resize, cfg.num_display, cfg.skip_bad)
    found.commit()


def _check_batch_fits(cfg: TrainConfig, domain: str, count: int, kind: str) -> None:
    if count < cfg.bs:
        raise DataError(
            f"--bs {cfg.bs} is more than the {count} {kind}training images of {domain} in {cfg.root}: "
            "lower --bs or add images"
        )


def prepare_config(args: argparse.Namespace) -> tuple[TrainConfig, int | None]:
    """The run's config, checked before anything is written: paths absolute, resume settings applied; and, when
    there is only a model to log (``--load DIR --log-model`` on a run already trained to ``--iters``), the
    iteration of the checkpoint it logs (else None).

    The tracking store and the training data are checked too (:func:`check_training_data`).
    """
    from mbu.base.urls import check_tracking_uri, resolve_tracking_uri

    cfg = config_from_args(args)
    absolute = {name: str(Path(getattr(cfg, name)).resolve()) for name in ("root", "out", "load") if getattr(cfg, name)}
    cfg = replace(cfg, **absolute)
    if cfg.load:
        state = load_checkpoint(Path(cfg.load))
        check_resumable(state, Path(cfg.load))
        cfg = resume_config(cfg, state["config"], typed_flags(args))
    if not cfg.root:
        raise ValueError("--root is required: the data root with trainA/ trainB/ (or trainA.txt ...)")
    check_writable(Path(cfg.out), "--out")
    check_run_folder(cfg, args.overwrite)
    log_only = bool(cfg.load) and args.log_model and int(state["iteration"]) >= cfg.iters
    if log_only:
        check_log_only(cfg)
    elif cfg.load:
        check_resume_iterations(cfg, state)
    check_step_device(cfg, resolve_device(cfg.device, cfg.gpu))
    for domain in ("trainA", "trainB"):
        list_images(Path(cfg.root), domain)  # a missing or empty domain is an error naming it
    if not log_only:  # (a run to log the model of has recorded its own store)
        check_tracking_uri(resolve_tracking_uri())  # a store it cannot open or write fails now, before decoding
    check_log_model(args, cfg)
    if not log_only:
        check_training_data(cfg, progress=not getattr(args, "no_progress", False))
    return cfg, int(state["iteration"]) if log_only else None


def check_log_only(cfg: TrainConfig) -> None:
    """``--load DIR --log-model`` with nothing to train logs DIR's model into DIR's own MLflow run."""
    from mbu.base.run_files import RUN_FILE

    if Path(cfg.load) != Path(cfg.out):
        raise ValueError(
            f"--load {cfg.load} is trained to --iters {cfg.iters} already: to log its model, give --out {cfg.load} "
            "(the model goes into that run); to train further, give a larger --iters"
        )
    if not (Path(cfg.out) / RUN_FILE).is_file():
        raise ValueError(f"--load {cfg.load}: no {RUN_FILE}, so no MLflow run to log the model into")


ModelLogger = Callable[[TrainConfig, "Recorder", str, bool], str]  # (run's config, recorder, device, progress) -> lines


def add_parser(subparsers: argparse._SubParsersAction, log_model: ModelLogger | None = None) -> None:
    """``mbu train``. ``log_model`` does ``--log-model``'s job: scoring and packaging live in the evaluate
    layer, above this one, so the command line on top hands the function in."""
    parser = subparsers.add_parser(
        "train",
        help="train one model (the reference mask_train.py flags)",
        description="Train the mask-based content transfer model on a two-domain data root. "
        "Logs losses to MLflow (default store: sqlite:///mlflow.db, or $MLFLOW_TRACKING_URI). "
        "With --load DIR, training continues from DIR's checkpoint with its own settings.",
    )
    add_train_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a trained run already in --out (its checkpoint and report files); without it such a "
        "folder is refused",
    )
    parser.add_argument("--experiment", default="mbu-train", help="MLflow experiment of the run (default: %(default)s)")
    parser.add_argument(
        "--log-model",
        action="store_true",
        help="once trained, log the run's MLflow model (weights only, config, threshold) under runs:/RUN_ID/model, "
        "for mbu eval/transfer/remove --model, mlflow.pyfunc.load_model and mlflow models serve. Where ROOT has "
        "at least 2 annotated test A images (testA_masks/) the run is scored first, as mbu eval --run scores it, "
        "and the model takes the threshold chosen on the validation half; else 0.5",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=main, model_logger=log_model)


def main(args: argparse.Namespace) -> int:
    from mbu.base.command import EXIT_INTERRUPTED, EXIT_STOPPED
    from mbu.base.files import write_json
    from mbu.base.run_files import RUN_FILE
    from mbu.base.urls import resolve_tracking_uri, storage_identity
    from mbu.train.loop import TrainingStopped, TrainStatus, train
    from mbu.train.stop import StopRequest, signals_stop
    from mbu.train.tracking import Recorder, quiet_store_messages, train_params

    cfg, trained_to = prepare_config(args)  # the tracking store and the data checked too: nothing written before
    quiet_store_messages()
    if trained_to is not None:
        return log_model_of_trained_run(args, cfg, trained_to)
    uri = resolve_tracking_uri()
    status = TrainStatus()
    stop = StopRequest()
    # From here on SIGTERM and Ctrl-C stop between iterations: checkpoint, run KILLED, one line.
    with signals_stop(stop.request, signal.SIGTERM, signal.SIGINT):
        recorder = Recorder.start(uri, args.experiment, run_name=Path(cfg.out).name)
        try:
            if args.overwrite:
                clear_run_folder(Path(cfg.out))
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
            write_json(Path(cfg.out) / RUN_FILE, {"run_id": recorder.run_id, "tracking_uri": storage_identity(uri)})
            recorder.log_params(train_params(cfg))
            result = train(cfg, progress=not args.no_progress, status=status, recorder=recorder, stop=stop)
        except (TrainingStopped, KeyboardInterrupt) as err:  # KeyboardInterrupt: a second Ctrl-C, no waiting
            reason = err.reason if isinstance(err, TrainingStopped) else "SIGINT"
            recorder.set_tags({"stopped": f"{reason} at iteration {status.iteration}"})
            recorder.end("KILLED")
            where = "interrupted" if reason == "SIGINT" else f"stopped by {reason}"
            saved = f"checkpoint at iteration {status.saved} in {cfg.out}" if status.saved else "no checkpoint saved"
            again = f"; resume with: {resume_command(args, cfg)}" if status.saved else ""
            print(f"mbu train: {where} at iteration {status.iteration}; {saved}{again}", file=sys.stderr)
            return EXIT_INTERRUPTED if reason == "SIGINT" else EXIT_STOPPED
        except BaseException as err:
            recorder.set_tags({"error": f"{type(err).__name__}: {err}"[:5000]})
            recorder.end("FAILED")
            raise
        recorder.end("FINISHED")  # still under the handlers above: a Ctrl-C now cannot leave the run RUNNING
    if result.start:
        trained = f"resumed at {result.start}, trained to {result.iterations}; checkpoint in {result.run_dir}"
    else:
        trained = f"trained {result.iterations} iterations; checkpoint in {result.run_dir}"
    if args.log_model:  # after the run is FINISHED: a failure here leaves the trained run as it is
        return log_run_model(args, cfg, recorder, trained, late_stop=stop())
    print(trained)
    return 0


def log_run_model(
    args: argparse.Namespace, cfg: TrainConfig, recorder: Recorder, first: str = "", late_stop: str | None = None
) -> int:
    """``--log-model`` for the trained run (``first``: a line to print before); SIGTERM or Ctrl-C meanwhile, or
    ``late_stop`` (a signal that came after training's last look at its stop request), ends it with the
    documented exit code, its temporary files gone, and the command that logs the model later
    (:func:`log_model_of_trained_run`)."""
    from mbu.train.stop import StopSignal, finish_or_stop

    device = str(resolve_device(cfg.device, cfg.gpu))

    def log() -> int:
        if first:
            print(first, flush=True)
        if late_stop is not None:
            raise StopSignal(late_stop)
        print(args.model_logger(cfg, recorder, device, not args.no_progress))
        return 0

    return finish_or_stop(
        log,
        lambda where: (
            f"mbu train: {where} while logging the model; the run is trained (checkpoint in {cfg.out}); "
            f"log its model with: {resume_command(args, cfg)}"
        ),
    )


def log_model_of_trained_run(args: argparse.Namespace, cfg: TrainConfig, iteration: int) -> int:
    """``--load DIR --out DIR --log-model`` on a run trained to ``--iters``: its model, into its own MLflow run."""
    from mbu.base.run_files import RUN_FILE
    from mbu.base.urls import check_tracking_uri, missing_sqlite_file, recorded_store
    from mbu.train.tracking import Recorder

    record = json.loads((Path(cfg.out) / RUN_FILE).read_text())
    uri = recorded_store(record)
    if missing_sqlite_file(uri) is not None:
        raise ValueError(f"--load {cfg.load}: its MLflow store {uri} no longer exists; restore it to log the model")
    check_tracking_uri(uri)
    print(f"{cfg.out} is trained to iteration {iteration}: logging its model into MLflow run {record['run_id']}")
    return log_run_model(args, cfg, Recorder.of_run(uri, record["run_id"]))


def resume_command(args: argparse.Namespace, cfg: TrainConfig) -> str:
    """``mbu train`` resuming this run, with the flags that the checkpoint does not carry."""
    parts = ["mbu", "train", "--out", cfg.out, "--load", cfg.out]
    if args.experiment != "mbu-train":
        parts += ["--experiment", args.experiment]
    if getattr(args, "log_model", False):
        parts.append("--log-model")
    return shlex.join(parts)


def check_log_model(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """Refuse, before training, a ``--log-model`` that would fail once the run has trained."""
    if not getattr(args, "log_model", False):
        return
    if getattr(args, "model_logger", None) is None:
        raise RuntimeError("--log-model needs the mbu command line, which hands train the evaluate layer's logger")
    count = count_annotated(Path(cfg.root))
    if count is not None and count >= MIN_ANNOTATED:
        pair_annotations(Path(cfg.root))  # masks that match no image: an error now, not after training
