from __future__ import annotations

from pathlib import Path

import pytest

from mbu.search.studyfile.study_file import PRUNERS, SAMPLERS, StudyFileError, load_study_file

VALID = """
[study]
name = "s"
n_trials = 2

[data.synthetic]
size = 64
n_train = 8
n_test = 4

[train]
resize = 64
bs = 4
iters = 2

[space.lr]
low = 1e-4
high = 1e-3
log = true

[[enqueue]]
lr = 2e-4
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_valid_file_parses_into_typed_config(tmp_path: Path) -> None:
    config = load_study_file(_write(tmp_path, VALID))
    assert config.study.name == "s" and config.study.n_trials == 2
    assert config.synthetic.size == 64 and config.data_root is None
    assert config.space["lr"].log and config.enqueue == [{"lr": 2e-4}]
    trial = config.trial_config({"lr": 3e-4, "gama": 2.0}, tmp_path / "t")
    assert trial.lr == 3e-4 and trial.weights.gama == 2.0 and trial.bs == 4
    assert trial.weights.alpha1 == 0.7  # unset weights keep the reference defaults


def test_slurm_table_parses_into_typed_settings(tmp_path: Path) -> None:
    text = VALID.replace("[[enqueue]]", '[slurm]\ntasks = 8\nmem_gb = 2.5\nsbatch = ["--qos=high"]\n[[enqueue]]')
    slurm = load_study_file(_write(tmp_path, text)).slurm
    assert slurm.tasks == 8 and slurm.mem_gb == 2.5 and slurm.sbatch == ["--qos=high"] and slurm.setup == []
    assert load_study_file(_write(tmp_path, VALID)).slurm.tasks == 2  # no table: the defaults


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('name = "s"', 'name = "s"\ncolour = 1', r"unknown key \[study\].colour"),
        ("bs = 4", "bs = 4\nbatch = 4", r"unknown key \[train\].batch"),
        ("bs = 4", "bs = 4\nlr = 1e-4", r"lr is both fixed in \[train\] and sampled"),
        ("low = 1e-4", "low = 1e-2", r"\[space.lr\] needs low < high"),
        ("low = 1e-4", "low = 0.0", r"\[space.lr\] is log scale, so low must be > 0"),
        ("[space.lr]", "[space.depth]", r"\[space.depth\] is not a searchable parameter"),
        ("n_trials = 2", "n_trials = 0", r"n_trials must be a positive integer"),
        ("n_trials = 2", 'n_trials = 2\nsampler = "grid"', r"sampler must be one of"),
        ("lr = 2e-4\n", "lr = 5e-2\n", r"lr=0.05 is outside \[space.lr\]"),
        ("resize = 64", "resize = 96", r"resize must be a multiple of 64"),
        (
            "[data.synthetic]\nsize = 64\nn_train = 8\nn_test = 4",
            '[data]\nroot = "/nonexistent/data"',
            r"\[data\].root /nonexistent/data is not a folder",
        ),
        ("[[enqueue]]", "[slurm]\nqueue = 1\n[[enqueue]]", r"unknown key \[slurm\].queue"),
        ("[[enqueue]]", "[slurm]\ntasks = 0\n[[enqueue]]", r"\[slurm\].tasks must be a positive integer"),
        ("[[enqueue]]", "[slurm]\npartition = 3\n[[enqueue]]", r"\[slurm\].partition must be a string"),
        ("[[enqueue]]", '[slurm]\nsetup = "module load x"\n[[enqueue]]', r"\[slurm\].setup must be a list"),
        ("[[enqueue]]", '[slurm]\nsbatch = ["qos=high"]\n[[enqueue]]', r"\[slurm\].sbatch options are written"),
        (
            "[[enqueue]]",
            "[slurm]\ntime_min = 1\nsignal_delay_s = 60\n[[enqueue]]",
            r"\[slurm\].signal_delay_s must be shorter than the time limit \(60 s\)",
        ),
    ],
)
def test_bad_study_files_name_the_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in VALID
    with pytest.raises(StudyFileError, match=message):
        load_study_file(_write(tmp_path, VALID.replace(old, new, 1)))


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(StudyFileError, match="does not exist"):
        load_study_file(tmp_path / "nope.toml")
    with pytest.raises(StudyFileError, match="not valid TOML"):
        load_study_file(_write(tmp_path, "[study\nname="))


def test_shipped_study_files_are_valid(tmp_path: Path) -> None:
    studies = sorted((Path(__file__).parents[1] / "studies").glob("*.toml"))
    names = {p.stem for p in studies}
    assert {"synthetic_glasses", "glasses", "facial_hair", "smile", "blond_hair", "bald"} <= names
    for path in studies:
        text = path.read_text()
        if 'root = "' in text:  # CelebA studies: point the root at an existing folder
            start = text.index('root = "') + len('root = "')
            text = text[:start] + str(tmp_path) + text[text.index('"', start) :]
        config = load_study_file(_write(tmp_path, text))
        assert config.enqueue, f"{path.name} enqueues no known-good point"
        assert config.study.name == path.stem


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_seeded(sampler: str) -> None:
    import optuna

    from mbu.search.launching.sampler import build_sampler, make_pruner, make_sampler

    assert type(build_sampler(sampler, 0)) is getattr(optuna.samplers, SAMPLERS[sampler])

    def sample(seed: int) -> list[float]:
        study = optuna.create_study(sampler=make_sampler(sampler, seed), pruner=make_pruner("median"))
        study.optimize(lambda t: (t.suggest_float("x", 0.0, 1.0) - 0.3) ** 2, n_trials=4)
        return [t.params["x"] for t in study.trials]

    first = sample(1)
    assert first == sample(1)  # seeded: the same proposals again
    assert first != sample(2)
    assert len(set(first)) == len(first)  # no trial repeats another's point


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_every_pruner_builds(pruner: str) -> None:
    import optuna

    from mbu.search.launching.sampler import make_pruner

    assert type(make_pruner(pruner)) is getattr(optuna.pruners, PRUNERS[pruner])
