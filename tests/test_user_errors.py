"""A user's mistakes, command by command: one line on stderr naming the culprit, exit 2, nothing written.

Each row runs ``mbu`` in-process from a fresh working directory and compares a
fingerprint of every file there (and of the shared data and run it points at)
before and after: a refused command leaves the disk and the MLflow and Optuna
stores as they were.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import DROP, TINY_SYNTH, changed, tiny_tables, tiny_train_config, toml_text

from mbu.base.run_files import CHECKPOINT_FILE
from mbu.cli import main
from mbu.evaluate.model_save import save_model_package
from mbu.train.loop import train

# A refused command must leave the folder as it was, the absence of an MLflow store included.
pytestmark = pytest.mark.fresh_mlflow_store


@pytest.fixture(scope="module")
def shared(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny run, a copy of it as mbu 0.1 wrote checkpoints, a truncated checkpoint, its MLflow model."""
    base = tmp_path_factory.mktemp("shared")
    run = base / "run"
    train(tiny_train_config(tiny_root, run, iters=2), progress=False)
    old = base / "old-run"
    old.mkdir()
    state = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    del state["model_version"]
    torch.save(state, old / CHECKPOINT_FILE)
    broken = base / "broken-run"
    broken.mkdir()
    (broken / CHECKPOINT_FILE).write_bytes((run / CHECKPOINT_FILE).read_bytes()[:5000])
    model = save_model_package(run / CHECKPOINT_FILE, 0.5, base / "model", {"run": str(run)})  # --model FOLDER
    return {"root": tiny_root, "run": run, "old": old, "broken": broken, "model": model}


def fingerprint(*folders: Path) -> dict[str, tuple]:
    """Every file's size, mtime and inode (and content hash when small): any write shows."""
    result = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            info = path.lstat()
            entry: tuple = (info.st_size, info.st_mtime_ns, info.st_ino)
            if path.is_file() and info.st_size < 2**20:
                entry += (hashlib.sha256(path.read_bytes()).hexdigest(),)
            result[str(path)] = entry
    return result


@dataclass
class Mistake:
    name: str
    argv: Callable[[dict[str, Path]], list[str]]  # the command line, given the shared paths
    message: str  # what the one stderr line must contain
    setup: Callable[[Path, dict[str, Path]], None] = lambda cwd, shared: None
    env: dict[str, str] = field(default_factory=dict)


def _study(text: str) -> Callable[[Path, dict[str, Path]], None]:
    return lambda cwd, shared: (cwd / "study.toml").write_text(text)


def _foreign(folder: str) -> Callable[[Path, dict[str, Path]], None]:
    def setup(cwd: Path, shared: dict[str, Path]) -> None:
        (cwd / folder).mkdir()
        (cwd / folder / "notes.txt").write_text("the user's own file\n")

    return setup


def _copy_inputs(cwd: Path, shared: dict[str, Path]) -> None:
    (cwd / "photos").mkdir()
    for image in sorted((shared["root"] / "testA").iterdir())[:2]:
        shutil.copy(image, cwd / "photos" / image.name)
    (cwd / "done").mkdir()
    (cwd / "done" / sorted((cwd / "photos").iterdir())[0].with_suffix(".png").name).write_bytes(b"earlier result")


def _orphan_mask(cwd: Path, shared: dict[str, Path]) -> None:
    """A copy of the data whose testA_masks/ holds a mask named like no test A image."""
    shutil.copytree(shared["root"], cwd / "data")
    first = sorted((cwd / "data" / "testA_masks").iterdir())[0]
    shutil.copy(first, first.with_name("orphan.png"))


def _file(name: str) -> Callable[[Path, dict[str, Path]], None]:
    return lambda cwd, shared: (cwd / name).write_text("not a folder\n")


LOCKED: list[Path] = []  # folders made read-only by a row's setup; unlocked after each test


def read_only(folder: Path) -> None:
    """Make ``folder`` one that nobody may write in: mode 555, and as root (who ignores modes) immutable."""
    folder.chmod(0o555)
    LOCKED.append(folder)
    if os.access(folder, os.W_OK):  # root: only the immutable attribute (or a read-only mount) stops it
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if os.access(folder, os.W_OK):
        pytest.skip(f"cannot make {folder} read-only on this machine")


@pytest.fixture(autouse=True)
def _unlock() -> None:
    yield
    while LOCKED:
        folder = LOCKED.pop()
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def _locked_folder(name: str) -> Callable[[Path, dict[str, Path]], None]:
    def setup(cwd: Path, shared: dict[str, Path]) -> None:
        (cwd / name).mkdir()
        read_only(cwd / name)

    return setup


def _read_only_cwd(cwd: Path, shared: dict[str, Path]) -> None:
    """Work from a read-only folder ``cwd/ro``, as a user whose working directory is not theirs."""
    _locked_folder("ro")(cwd, shared)
    os.chdir(cwd / "ro")  # the autouse fixture's monkeypatch restores the working directory


def _locked_run(cwd: Path, shared: dict[str, Path]) -> None:
    shutil.copytree(shared["run"], cwd / "run")
    read_only(cwd / "run")


def _corrupt_copy(cwd: Path, shared: dict[str, Path]) -> None:
    shutil.copytree(shared["root"], cwd / "data")
    bad = sorted((cwd / "data" / "trainB").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated mid-file


def _foreign_checkpoint(cwd: Path, shared: dict[str, Path]) -> None:
    (cwd / "foreign").mkdir()
    torch.save({"model": {}, "where": Path("elsewhere")}, cwd / "foreign" / CHECKPOINT_FILE)  # a pickled object


def _one_annotated(cwd: Path, shared: dict[str, Path]) -> None:
    """A data root whose test A images have one mask between them; and a study file on it."""
    shutil.copytree(shared["root"], cwd / "data")
    for mask in sorted((cwd / "data" / "testA_masks").iterdir())[1:]:
        mask.unlink()
    (cwd / "study.toml").write_text(toml_text(changed(GOOD, {"data": {"synthetic": DROP, "root": "data"}})))


TRAIN = ["train", "--resize", "64", "--bs", "4", "--iters", "2", "--no-progress"]
GOOD = tiny_tables("mistakes")
GOOD_STUDY = toml_text(GOOD)
LATIN_1_STUDY = toml_text(changed(GOOD, {"study": {"name": "caf\xe9"}})).encode("latin-1")


def _changed(changes: dict) -> Callable[[Path, dict[str, Path]], None]:
    """Writes the good study file with ``changes`` merged in (see ``helpers.changed``)."""
    return _study(toml_text(changed(GOOD, changes)))


def _train(*extra: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda s: [*TRAIN, "--root", str(s["root"]), *extra]


MISTAKES = [
    # mbu train
    Mistake("train over a trained run", _train("--out", "{run}"), "already holds a trained run"),
    Mistake(
        "train log-model with a mask of no image",
        lambda s: [*TRAIN, "--root", "data", "--out", "r", "--log-model"],
        "has masks whose name matches no testA image",
        _orphan_mask,
    ),  # fmt: skip
    Mistake(
        "train resume with another bs",
        lambda s: ["train", "--load", str(s["run"]), "--out", str(s["run"]), "--bs", "8"],
        "--bs 8 (checkpoint: 4) contradicts",
    ),  # fmt: skip
    Mistake(
        "train resume with another weight",
        lambda s: ["train", "--load", str(s["run"]), "--out", "new", "--gama", "1"],
        "--gama 1.0 (checkpoint: 7.0) contradicts",
    ),  # fmt: skip
    Mistake(
        "train overwriting the run it resumes",
        lambda s: ["train", "--load", str(s["run"]), "--out", str(s["run"]), "--overwrite"],
        "--overwrite would delete the checkpoint that --load",
    ),  # fmt: skip
    Mistake("train without root", lambda s: ["train", "--out", "r"], "--root is required"),
    Mistake("train missing root", lambda s: ["train", "--root", "nowhere", "--out", "r"], "nowhere is not a folder"),
    Mistake("train gpu without cuda", _train("--out", "r", "--gpu", "0"), "CUDA is not available"),
    Mistake("train unknown device", _train("--out", "r", "--device", "tpu"), "unknown device 'tpu'"),
    Mistake(
        "train captured step on cpu",
        _train("--out", "r", "--device", "cpu", "--cuda-graph"),
        "--cuda-graph needs a CUDA device",
    ),  # fmt: skip
    Mistake(
        "train captured step with compile",
        _train("--out", "r", "--cuda-graph", "--compile"),
        "cuda_graph and compile cannot be combined",
    ),  # fmt: skip
    Mistake("train zero batch", _train("--out", "r", "--bs", "0"), "bs must be a positive integer, got 0"),
    Mistake("train batch of one", _train("--out", "r", "--bs", "1"), "--bs 1: the batch must hold at least 2 images"),
    Mistake(
        "train batch larger than a domain",
        _train("--out", "r", "--bs", str(TINY_SYNTH.n_train + 1)),
        f"--bs {TINY_SYNTH.n_train + 1} is more than the {TINY_SYNTH.n_train} training images of trainA",
    ),  # fmt: skip
    Mistake(
        "train unreadable image",
        lambda s: [*TRAIN, "--root", "data", "--out", "r"],
        "cannot read image",
        _corrupt_copy,
    ),  # fmt: skip
    Mistake(
        "train from a folder it cannot write",
        _train("--out", "../r"),
        "no permission to write in",
        _read_only_cwd,
        env={"MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
    ),  # fmt: skip
    Mistake(
        "train resume with nothing left to train",
        lambda s: ["train", "--load", str(s["run"]), "--out", str(s["run"])],
        "its checkpoint is at iteration 2 and --iters is 2, so there is nothing to train",
    ),  # fmt: skip
    Mistake(
        "train resume to an earlier iteration",
        lambda s: ["train", "--load", str(s["run"]), "--out", "new", "--iters", "1"],
        "give --iters larger than 2 to train more",
    ),  # fmt: skip
    Mistake("train zero iterations", _train("--out", "r", "--iters", "0"), "iters must be a positive integer"),
    Mistake("train negative lr", _train("--out", "r", "--lr", "-1"), "lr must be > 0"),
    Mistake("train negative weight", _train("--out", "r", "--alpha1", "-1"), "loss weight alpha1 must be >= 0"),
    Mistake("train negative disc clip", _train("--out", "r", "--disc_clip", "-1"), "disc_clip must be"),
    Mistake("train odd resize", _train("--out", "r", "--resize", "100"), "resize must be a multiple of 64"),
    Mistake("train out under a file", _train("--out", "afile/run"), "afile is a file, not a folder", _file("afile")),
    Mistake("train missing checkpoint", lambda s: ["train", "--load", "nowhere", "--out", "r"], "no checkpoint at"),
    Mistake(
        "train broken checkpoint",
        lambda s: ["train", "--load", str(s["broken"]), "--out", "r"],
        "checkpoint.pt: truncated or corrupt (",
    ),  # fmt: skip
    Mistake(
        "train checkpoint holding objects",
        lambda s: ["train", "--load", "foreign", "--out", "r"],
        "checkpoint.pt: it holds more than tensors, or is corrupt (Unsupported global: GLOBAL pathlib",
        _foreign_checkpoint,
    ),  # fmt: skip
    Mistake("train old checkpoint", lambda s: ["train", "--load", str(s["old"]), "--out", "r"], "trained by mbu 0.1"),
    Mistake(
        "train unknown tracking scheme",
        _train("--out", "r"),
        "tracking URI 'bogus://x' is not one",
        env={"MLFLOW_TRACKING_URI": "bogus://x"},
    ),  # fmt: skip
    Mistake(
        "train tracking db in a missing folder",
        _train("--out", "r"),
        "folder",
        env={"MLFLOW_TRACKING_URI": "sqlite:///no/such/dir/mlflow.db"},
    ),  # fmt: skip
    # mbu eval / report / transfer / remove
    Mistake("eval missing run", lambda s: ["eval", "--run", "nowhere"], "no checkpoint at"),
    Mistake("eval old checkpoint", lambda s: ["eval", "--run", str(s["old"])], "LeakyReLU(0.2)"),
    Mistake(
        "eval model without out",
        lambda s: ["eval", "--model", str(s["model"]), "--no-progress"],
        "--model needs --out DIR, the folder for its report",
    ),  # fmt: skip
    Mistake(
        "eval model report among the images",
        lambda s: ["eval", "--model", str(s["model"]), "--out", str(s["root"] / "testA" / "report"), "--no-progress"],
        "which this scoring reads; give a folder outside it",
    ),  # fmt: skip
    Mistake(
        "eval out without a model", lambda s: ["eval", "--run", str(s["run"]), "--out", "o"], "--out goes with --model"
    ),
    Mistake(
        "eval model into a run folder",
        lambda s: ["eval", "--model", str(s["model"]), "--out", "run", "--no-progress"],
        "--out run is a run folder; score it with --run run",
        lambda cwd, shared: shutil.copytree(shared["run"], cwd / "run"),
    ),  # fmt: skip
    Mistake(
        "eval model on a missing root",
        lambda s: ["eval", "--model", str(s["model"]), "--out", "o", "--root", "nowhere", "--no-progress"],
        "--root nowhere is not a folder",
    ),  # fmt: skip
    *(
        Mistake(
            f"eval model from {what}",
            lambda s, store=store: ["eval", "--model", "models:/m@champion", "--tracking-uri", store, "--out", "o"],
            message,
            setup,
        )
        for what, store, message, setup in [
            (
                "a missing store",
                "sqlite:///gone.db",
                "--tracking-uri sqlite:///gone.db: no MLflow store at gone.db",
                lambda cwd, s: None,
            ),
            (
                "a database that is not MLflow's",
                "sqlite:///other.db",
                "other.db is a database but not an MLflow store (it holds notes)",
                lambda cwd, s: sqlite3.connect(cwd / "other.db").execute("CREATE TABLE notes (x)"),
            ),
            ("a file that is no database", "sqlite:///notes.db", "notes.db is not a database", _file("notes.db")),
            (
                "a store whose driver is missing",
                "postgresql+pg8000://u@127.0.0.1:1/db",
                "its database driver is not installed",
                lambda cwd, s: None,
            ),
            (
                "a path with no scheme",
                "mlflow.db",
                "tracking URI 'mlflow.db' is not one MLflow can use here",
                lambda cwd, s: None,
            ),
            (
                "a server that does not answer",
                "http://127.0.0.1:9",
                "MLflow tracking server http://127.0.0.1:9 is unreachable",
                lambda cwd, s: None,
            ),
        ]
    ),  # fmt: skip
    Mistake("eval on cuda", lambda s: ["eval", "--run", str(s["run"]), "--device", "cuda"], "CUDA is not available"),
    Mistake(
        "eval of a read-only run",
        lambda s: ["eval", "--run", "run", "--no-progress"],
        "run: no permission to write in",
        _locked_run,
    ),  # fmt: skip
    Mistake(
        "report of a read-only run",
        lambda s: ["report", "run", "--no-progress"],
        "run: no permission to write in",
        _locked_run,
    ),  # fmt: skip
    Mistake("report missing run", lambda s: ["report", "nowhere"], "no checkpoint at"),
    Mistake("report unknown study", lambda s: ["report", "--study", "nope"], "no Optuna storage at"),
    Mistake(
        "remove into its input folder",
        lambda s: ["remove", "--run", str(s["run"]), "--input", "photos", "--out", "photos"],
        "is a folder of input images",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "remove beside an input file",
        lambda s: [
            "remove",
            "--run",
            str(s["run"]),
            "--input",
            str(sorted((s["root"] / "testA").iterdir())[0]),
            "--out",
            str(s["root"] / "testA"),
        ],
        "is a folder of input images",
    ),  # fmt: skip
    Mistake(
        "remove over earlier results",
        lambda s: ["remove", "--run", str(s["run"]), "--input", "photos", "--out", "done"],
        "already holds 1 of the output files",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "remove bad threshold",
        lambda s: ["remove", "--run", str(s["run"]), "--input", "photos", "--out", "o", "--threshold", "2"],
        "--threshold must be in [0, 1]",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "remove with a run folder and a model",
        lambda s: [
            "remove",
            "--run",
            str(s["run"]),
            "--model",
            "models:/m@champion",
            "--input",
            "photos",
            "--out",
            "o",
        ],
        "give one of --run (a run folder) or --model (an MLflow model URI), not both or neither",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "remove tracking URI without a model",
        lambda s: [
            "remove",
            "--run",
            str(s["run"]),
            "--tracking-uri",
            "sqlite:///x.db",
            "--input",
            "photos",
            "--out",
            "o",
        ],
        "--tracking-uri goes with --model",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "remove zero batch",
        lambda s: ["remove", "--run", str(s["run"]), "--input", "photos", "--out", "o", "--bs", "0"],
        "--bs must be a positive integer",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "transfer into a guide folder",
        lambda s: [
            "transfer",
            "--run",
            str(s["run"]),
            "--guide",
            "photos",
            "--target",
            str(s["root"] / "testB"),
            "--out",
            "photos",
        ],
        "is a folder of input images",
        _copy_inputs,
    ),  # fmt: skip
    Mistake(
        "transfer missing target",
        lambda s: ["transfer", "--run", str(s["run"]), "--guide", "photos", "--target", "nowhere", "--out", "o"],
        "nowhere does not exist",
        _copy_inputs,
    ),  # fmt: skip
    # mbu data
    Mistake(
        "synth into a foreign folder",
        lambda s: ["data", "synth", "--out", "mine", "--no-progress"],
        "did not write there",
        _foreign("mine"),
    ),  # fmt: skip
    Mistake(
        "synth over another spec",
        lambda s: ["data", "synth", "--out", str(s["root"]), "--n-train", "9"],
        "holds a synthetic data set with spec",
    ),  # fmt: skip
    Mistake("synth zero images", lambda s: ["data", "synth", "--out", "d", "--n-train", "0"], "n_train"),
    Mistake(
        "folders into a foreign folder",
        lambda s: ["data", "folders", "--root", str(s["root"]), "--dest", "mine", "--no-progress"],
        "did not write there",
        _foreign("mine"),
    ),  # fmt: skip
    Mistake(
        "celeba missing attribute file",
        lambda s: [
            "data",
            "celeba",
            "--root",
            str(s["root"]),
            "--attributes",
            "list_attr.txt",
            "--config",
            "glasses",
            "--dest",
            "d",
        ],
        "list_attr.txt",
    ),  # fmt: skip
    # mbu search
    Mistake("search missing study file", lambda s: ["search", "nope.toml"], "study file nope.toml does not exist"),
    Mistake(
        "search folder for a study file",
        lambda s: ["search", "studies"],
        "study file studies is a folder; give the .toml file itself",
        lambda cwd, s: (cwd / "studies").mkdir(),
    ),  # fmt: skip
    Mistake(
        "search study file not UTF-8",
        lambda s: ["search", "study.toml"],
        "study.toml: not UTF-8 text (byte 0xe9 at offset",
        lambda cwd, s: (cwd / "study.toml").write_bytes(
            toml_text(changed(GOOD, {"study": {"name": "caf\xe9"}})).encode("latin-1")
        ),
    ),  # fmt: skip
    Mistake(
        "search unknown table",
        lambda s: ["search", "study.toml"],
        "study.toml: unknown table [trian] (known tables: [study], [data]",
        _changed({"trian": {"bs": 4}}),
    ),  # fmt: skip
    Mistake(
        "search key outside any table",
        lambda s: ["search", "study.toml"],
        "study.toml: key iters is outside any table",
        _study("iters = 4\n" + GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search negative seed",
        lambda s: ["search", "study.toml"],
        "[study].seed must be an integer in [0, 2**32), got -1",
        _changed({"study": {"seed": -1}}),
    ),  # fmt: skip
    Mistake(
        "search registered model not a plain name",
        lambda s: ["search", "study.toml"],
        "[study].registered_model 'my model' cannot name a registered model",
        _changed({"study": {"registered_model": "my model"}}),
    ),  # fmt: skip
    Mistake(
        "search range without high",
        lambda s: ["search", "study.toml"],
        "study.toml: missing key [space.lr].high (required: low, high)",
        _changed({"space": {"lr": {"high": DROP}}}),
    ),  # fmt: skip
    Mistake(
        "search unknown device",
        lambda s: ["search", "study.toml"],
        "study.toml: [train].device: unknown device 'tpu'",
        _changed({"train": {"device": "tpu"}}),
    ),  # fmt: skip
    Mistake(
        "search test set too small to score",
        lambda s: ["search", "study.toml"],
        "[data.synthetic].n_test must be at least 2, got 1",
        _changed({"data": {"synthetic": {"n_test": 1}}}),
    ),  # fmt: skip
    Mistake(
        "search data root with one annotated test image",
        lambda s: ["search", "study.toml"],
        "has 1 test A image(s) with a mask in testA_masks/, fewer than 2",
        _one_annotated,
    ),  # fmt: skip
    Mistake(
        "search fewer synthetic images than the batch",
        lambda s: ["search", "study.toml"],
        "[data.synthetic].n_train = 3 is fewer images than the batch ([train].bs = 4)",
        _changed({"data": {"synthetic": {"n_train": 3}}}),
    ),  # fmt: skip
    Mistake(
        "search batch of one",
        lambda s: ["search", "study.toml"],
        "[train].bs = 1: the batch must hold at least 2 images",
        _changed({"train": {"bs": 1}}),
    ),  # fmt: skip
    Mistake(
        "search string for a number",
        lambda s: ["search", "study.toml"],
        "[space.lr].high must be a number",
        _changed({"space": {"lr": {"high": "10"}}}),
    ),  # fmt: skip
    Mistake(
        "search string for a boolean",
        lambda s: ["search", "study.toml"],
        "[space.lr].log must be true or false",
        _changed({"space": {"lr": {"log": "false"}}}),
    ),  # fmt: skip
    Mistake(
        "search string for a count",
        lambda s: ["search", "study.toml"],
        "[study].n_trials must be an integer",
        _changed({"study": {"n_trials": "3"}}),
    ),  # fmt: skip
    Mistake(
        "search string for a train value",
        lambda s: ["search", "study.toml"],
        "[train].bs must be an integer",
        _changed({"train": {"bs": "4"}}),
    ),  # fmt: skip
    Mistake(
        "search zero trials flag",
        lambda s: ["search", "study.toml", "--n-trials", "0"],
        "--n-trials must be a positive integer, got 0",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search negative trials flag",
        lambda s: ["search", "study.toml", "--n-trials", "-3"],
        "--n-trials must be a positive integer, got -3",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search zero workers",
        lambda s: ["search", "study.toml", "--workers", "0"],
        "--workers must be at least 1",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search slurm with a SQLite storage",
        lambda s: ["search", "study.toml", "--slurm"],
        "file locking over a shared filesystem is not safe",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search slurm with a SLURM_CONF that is not a file",
        lambda s: ["search", "study.toml", "--slurm", "--single-node"],
        "--slurm: ",  # "sbatch is not on PATH" or "SLURM_CONF is /nonexistent/slurm.conf, which is not a file"
        _study(GOOD_STUDY),
        env={"SLURM_CONF": "/nonexistent/slurm.conf"},
    ),  # fmt: skip
    # mbu confirm and the [confirm] table
    Mistake(
        "confirm table with zero seeds",
        lambda s: ["search", "study.toml"],
        "study.toml: [confirm].seeds must be a positive integer, got 0",
        _changed({"confirm": {"seeds": 0}}),
    ),  # fmt: skip
    Mistake(
        "confirm table presets not a boolean",
        lambda s: ["search", "study.toml"],
        "study.toml: [confirm].presets must be true or false, got 'yes'",
        _changed({"confirm": {"presets": "yes"}}),
    ),  # fmt: skip
    Mistake(
        "confirm seeds flag zero",
        lambda s: ["confirm", "study.toml", "--seeds", "0"],
        "--seeds must be a positive integer, got 0",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "confirm top-k beyond n_trials",
        lambda s: ["search", "study.toml", "--top-k", "3"],
        "[confirm].top_k = 3 is more than the study's n_trials (1): it can never have that many complete trials",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "confirm a study that has not run",
        lambda s: ["confirm", "study.toml"],
        "study mistakes has 0 of 1 finished trials; run mbu search study.toml first",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    # the [race] table
    Mistake(
        "race table with zero seeds",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].seeds must be a positive integer, got 0",
        _changed({"race": {"seeds": 0}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race table with fractional seeds",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].seeds must be an integer, got 2.5",
        _changed({"race": {"seeds": 2.5}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race margin of one",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].margin must be in [0, 1), got 1.0",
        _changed({"race": {"margin": 1.0}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race margin below zero",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].margin must be in [0, 1), got -0.1",
        _changed({"race": {"margin": -0.1}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race crown seeds below zero",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].crown_seeds must be a non-negative integer, got -1",
        _changed({"race": {"crown_seeds": -1}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race one crown seed with a confidence",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].crown_seeds must be 0 or at least 2 with a crown_confidence (a t-test needs two "
        "values a side)",
        _changed({"race": {"crown_seeds": 1}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race crown confidence of one",
        lambda s: ["search", "study.toml"],
        "study.toml: [race].crown_confidence must be in [0, 1), got 1",
        _changed({"race": {"crown_confidence": 1}, "enqueue": [{"lr": 2e-4}]}),
    ),  # fmt: skip
    Mistake(
        "race without a preset",
        lambda s: ["search", "study.toml"],
        "study.toml: [race] needs an [[enqueue]] point: the first one (e.g. the published preset) is the first "
        "incumbent and trains all 3 seeds",
        _changed({"race": {"seeds": 3}}),
    ),  # fmt: skip
    Mistake(
        "race with a pruner",
        lambda s: ["search", "study.toml"],
        "study.toml: [race] with seeds = 2 and [study].pruner = 'median': the pruner would cut seed runs short",
        _changed({"race": {"seeds": 2}, "enqueue": [{"lr": 2e-4}], "study": {"pruner": "median"}}),
    ),  # fmt: skip
    Mistake(
        "search slurm flag without --slurm",
        lambda s: ["search", "study.toml", "--tasks", "3"],
        "--tasks needs --slurm",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search slurm zero tasks",
        lambda s: ["search", "study.toml", "--slurm", "--tasks", "0"],
        "--tasks (over [slurm].tasks) must be a positive integer, got 0",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search slurm bad sbatch option in the study file",
        lambda s: ["search", "study.toml", "--slurm"],
        "[slurm].sbatch options are written --name=value or --flag",
        _changed({"slurm": {"sbatch": ["account=lab"]}}),
    ),  # fmt: skip
    Mistake(
        "search storage in a missing folder",
        lambda s: ["search", "study.toml", "--storage", "sqlite:///no/such/dir/optuna.db"],
        "does not exist",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search storage of an unknown scheme",
        lambda s: ["search", "study.toml", "--storage", "redis://x"],
        "is not a database URL",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search tracking of an unknown scheme",
        lambda s: ["search", "study.toml", "--tracking-uri", "bogus://x"],
        "tracking URI 'bogus://x' is not one",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search gpu device without cuda",
        lambda s: ["search", "study.toml"],
        "CUDA is not available",
        _changed({"train": {"device": "cuda"}}),
    ),  # fmt: skip
    Mistake(
        "search captured step on cpu",
        lambda s: ["search", "study.toml"],
        "study.toml: [train].cuda_graph = true needs a CUDA device",
        _changed({"train": {"cuda_graph": True}}),
    ),  # fmt: skip
    Mistake(
        "search population flag zero",
        lambda s: ["search", "study.toml", "--population", "0"],
        "--population must be a positive integer, got 0",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search population key zero",
        lambda s: ["search", "study.toml"],
        "[study].population must be a positive integer, got 0",
        _changed({"study": {"population": 0}}),
    ),  # fmt: skip
    Mistake(
        "search summary of no study",
        lambda s: ["search", "study.toml", "--summary"],
        "no Optuna storage at",
        _study(GOOD_STUDY),
    ),  # fmt: skip
    Mistake(
        "search runs_dir under a file",
        lambda s: ["search", "study.toml"],
        "afile is a file, not a folder",
        lambda cwd, s: (
            _file("afile")(cwd, s),
            _changed({"study": {"runs_dir": "afile/runs"}})(cwd, s),
        ),
    ),  # fmt: skip
]


@pytest.mark.parametrize("mistake", MISTAKES, ids=[m.name for m in MISTAKES])
def test_a_mistake_gets_one_line_and_changes_nothing(
    mistake: Mistake, shared: dict[str, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in mistake.env.items():
        monkeypatch.setenv(name, value)
    mistake.setup(tmp_path, shared)
    argv = [arg.format(**{k: str(v) for k, v in shared.items()}) for arg in mistake.argv(shared)]
    capsys.readouterr()
    before = fingerprint(tmp_path, *shared.values())

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mbu {argv[0]}: error: ") and mistake.message in lines[0], lines[0]
    assert fingerprint(tmp_path, *shared.values()) == before, "a refused command changed files"
    if os.environ.get("MBU_RECORD_MESSAGES"):  # a table of what users see, for docs and reviews
        with open(os.environ["MBU_RECORD_MESSAGES"], "a") as record:
            record.write(f"{mistake.name}\t{lines[0].replace(str(tmp_path), '.')}\n")


def test_every_command_has_a_row(shared: dict[str, Path]) -> None:
    from mbu.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands == {m.argv(shared)[0] for m in MISTAKES}


def test_a_diverged_training_is_one_line_and_exit_1(shared: dict[str, Path], capsys) -> None:
    argv = [*TRAIN, "--root", str(shared["root"]), "--out", "r", "--lr", "1e12", "--disclr", "1e12"]
    argv += ["--iters", "40", "--progress_iter", "2"]
    assert main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("mbu train: training diverged: non-finite loss at iteration"), lines


def test_data_folder_written_by_mbu_is_reused(tmp_path: Path) -> None:
    """The same spec again is a no-op, and an interrupted write is finished by the next call."""
    argv = ["data", "synth", "--out", "d", "--n-train", "3", "--n-test", "2", "--no-progress"]
    assert main(argv) == 0
    before = fingerprint(tmp_path / "d")
    assert main(argv) == 0
    assert fingerprint(tmp_path / "d") == before
    os.remove(tmp_path / "d" / "synthetic.json")  # as if the first write had been killed before its end
    (tmp_path / "d" / "synthetic.partial.json").write_text('{"size": 64, "n_train": 3, "n_test": 2, "seed": 0}\n')
    assert main(argv) == 0 and (tmp_path / "d" / "synthetic.json").is_file()
    assert not (tmp_path / "d" / "synthetic.partial.json").exists()


def test_the_served_model_answers_a_bad_row_with_a_400_naming_it_and_no_server_paths(shared: dict[str, Path]) -> None:
    """Through MLflow's own scoring code (what ``mlflow models serve`` runs for each request)."""
    import base64
    import json

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(str(shared["model"]))
    image = base64.b64encode(next((shared["root"] / "testA").iterdir()).read_bytes()).decode()
    broken = base64.b64encode(b"not an image").decode()
    requests = {
        "row 0 has both image and pixels: give one of them": [{"image": image, "pixels": [[[0, 0, 0]]]}],
        "row 1: image: cannot read image given as bytes": [{"image": image}, {"image": broken}],
        "row 0: target: cannot read image given as bytes": [{"image": image, "target": broken}],
        "row 1: pixels must be an H x W x 3 RGB array": [{"pixels": [[[0, 0, 0]]]}, {"pixels": [[[0, 0, 0, 0]]]}],
    }
    for expected, records in requests.items():
        with pytest.raises(MlflowException) as caught:
            body = json.dumps({"dataframe_records": records})
            scoring_server.invocations(body, "application/json", model, model.metadata.get_input_schema())
        answer = caught.value.serialize_as_json()
        assert caught.value.get_http_status_code() == 400 and expected in answer, answer
        assert "stack_trace" not in answer and "Traceback" not in answer and "/" + "work" not in answer
        assert str(shared["model"]) not in answer and str(Path(mlflow.__file__).parent) not in answer


def test_a_store_path_with_uri_characters_is_read_as_it_is_and_nothing_is_created(tmp_path: Path) -> None:
    """A '#' or '%' in a store's folder is part of the path: the store opens, and no other file appears."""
    from mbu.base.urls import check_store_to_read

    for folder in ("a#b", "c%41d", "e?f"):
        store = tmp_path / folder / "mlflow.db"
        store.parent.mkdir()
        with sqlite3.connect(store) as connection:  # the tables an MLflow store holds, by name
            connection.execute("CREATE TABLE experiments (x)")
            connection.execute("CREATE TABLE runs (x)")
        before = sorted(tmp_path.rglob("*"))
        check_store_to_read(f"sqlite:///{store}")
        assert sorted(tmp_path.rglob("*")) == before, folder
