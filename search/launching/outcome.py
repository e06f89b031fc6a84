"""How a launch ends for its user, the same in ``mbu search``, a ``--workers`` process and a SLURM task:
the exit code and its stderr lines, then the champion published; and the libraries kept quiet meanwhile."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from mbu.base.command import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, first_line
from mbu.search.studyfile.study_file import StudyConfig
from mbu.train.stop import StopSignal, finish_or_stop

if TYPE_CHECKING:  # Optuna, MLflow and plotting: imported by whoever launched
    from mbu.search.judging.study_report import StudySummary
    from mbu.search.launching.launch import LaunchOptions


def quiet_libraries() -> None:
    """Keep Optuna's INFO lines, MLflow's database messages and experimental-API warnings off the terminal."""
    import logging
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def exit_code(
    summary: StudySummary, config: StudyConfig, launch: str = "the launch", again: str = "", prog: str = "mbu search"
) -> int:
    """How a launch ended, said on stderr: 0 at the target; 75 stopped by a signal; 1 on failures or short.

    ``again`` is the command that goes on (:func:`relaunch_command`); ``prog`` starts each message.
    """
    again = again or f"mbu search {config.path}"
    if summary.stopped_by:
        print(
            f"{prog}: stopped by {summary.stopped_by}: the trials in flight were checkpointed and queued "
            f"to resume; launch the study again to go on: {again}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if summary.stopped_on_failures:
        print(
            f"{prog}: stopped: {config.study.max_failures} trials failed in a row ([study].max_failures); "
            "failed trials of this launch:",
            file=sys.stderr,
        )
        for number, error in summary.failed:
            print(f"  trial {number}: {error}", file=sys.stderr)
        return EXIT_FAILED
    finished = summary.states.get("COMPLETE", 0) + summary.states.get("PRUNED", 0)
    if finished < summary.target:
        print(
            f"{prog}: {launch} ended with {finished} of {summary.target} trials finished (the logs say "
            f"why); queued retries resume from their checkpoints when the study is launched again: {again}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if summary.confirm_problem:
        print(f"{prog}: {summary.confirm_problem}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def end_launch(
    summary: StudySummary,
    config: StudyConfig,
    options: LaunchOptions,
    again: str,
    prog: str = "mbu search",
    launch: str = "the launch",
    late_stop: str | None = None,
) -> int:
    """The end of every launch: its summary printed, how it ended said (:func:`exit_code`), the champion
    registered (:func:`publish`); the exit code. ``again`` is the command that goes on; ``late_stop``, a
    signal that came after the trials' last look at their stop request (the champion is then not published).

    The trials are all recorded by now, so SIGTERM or Ctrl-C here ends the process with the documented exit
    code, the publish's temporary folders removed, and the command that registers the champion later.
    """

    def end() -> int:
        print(summary.format(), flush=True)
        code = exit_code(summary, config, launch, again, prog)
        if code == EXIT_OK and late_stop is not None:
            raise StopSignal(late_stop)
        return publish(config, options, code, prog)

    return finish_or_stop(
        end,
        lambda where: (
            f"{prog}: {where} at the end of the launch, before the champion was registered; every trial "
            f"is recorded; launch the study again to register it: {again}"
        ),
    )


def publish(config: StudyConfig, options: LaunchOptions, code: int, prog: str = "mbu search") -> int:
    """After a launch that reached its target: the champion registered (``search.judging.registry``); ``code`` back.

    Every worker that ends at the target publishes, one at a time (the launch lock): the first registers,
    the others find the alias already on the champion.
    """
    if code != EXIT_OK:
        return code
    from mlflow.exceptions import MlflowException

    from mbu.base.urls import resolve_tracking_uri
    from mbu.search.cluster.workers import launch_lock
    from mbu.search.judging.registry import publish_champion
    from mbu.search.launching.storage import load_existing_study

    study = load_existing_study(config.study.name, options.storage or config.study.storage)
    tracking_uri = resolve_tracking_uri(options.tracking_uri or config.study.tracking_uri)
    try:
        with launch_lock(config.study_dir):
            line = publish_champion(study, config, tracking_uri)
    except (MlflowException, OSError, ValueError, KeyError) as err:  # the trials are safe either way
        print(f"{prog}: the champion was not registered ({type(err).__name__}: {first_line(err)})", file=sys.stderr)
        return code
    if line:
        print(line)
    return code
