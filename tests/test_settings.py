"""Each training setting is declared once (``train.config``): flags, the resume rule and a study's
between-launch rule all follow from the declaration."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

import pytest

from mbu.train.cli import add_train_arguments, config_from_args, resume_config, typed_flags
from mbu.train.config import (
    TrainConfig,
    declared_settings,
    free_between_launches,
    setting,
    settings_of,
    study_train_keys,
)
from mbu.train.losses import TERM_WEIGHTS, LossWeights


def config_type_with(effect: str) -> type[TrainConfig]:
    """TrainConfig plus one new setting, ``warmup``, of the given effect: what a contributor would add."""

    @dataclass
    class WithWarmup(TrainConfig):
        warmup: int = setting(0, "iterations of linear learning-rate warm-up", effect=effect, group="optimisation")

    return WithWarmup


# effect -> (a typed --warmup that differs from the checkpoint: refused?, warmup after a resume without
# the flag, free to change between a study's launches?)
ANSWERS = {"model": (True, 3, False), "length": (False, 3, False), "run": (False, 3, True), "machine": (False, 0, True)}


@pytest.mark.parametrize("effect", sorted(ANSWERS))
def test_a_new_setting_appears_everywhere_with_one_answer(effect: str, capsys) -> None:
    config_type = config_type_with(effect)
    refused, untyped_resume, free = ANSWERS[effect]
    parser = argparse.ArgumentParser()
    add_train_arguments(parser, config_type)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "--warmup WARMUP" in capsys.readouterr().out  # the flag, with its help
    args = parser.parse_args(["--root", "data", "--warmup", "5"])
    cfg = config_from_args(args, config_type)
    assert cfg.warmup == 5
    saved = replace(cfg, warmup=3).to_dict()  # the checkpoint's copy
    if refused:
        with pytest.raises(ValueError, match=r"--warmup 5 \(checkpoint: 3\)"):
            resume_config(cfg, saved, typed_flags(args, config_type))
    else:
        assert resume_config(cfg, saved, typed_flags(args, config_type)).warmup == 5
    untyped = config_from_args(parser.parse_args(["--root", "data"]), config_type)
    assert resume_config(untyped, saved, typed_flags(parser.parse_args([]), config_type)).warmup == untyped_resume
    assert "warmup" in study_train_keys(config_type)  # a study file's [train] may set it
    assert ("warmup" in free_between_launches(config_type)) is free
    assert "warmup" not in study_train_keys() and "warmup" not in free_between_launches()  # TrainConfig untouched


def test_iters_eval_every_and_skip_bad_are_classified_once() -> None:
    assert settings_of("length") == ("iters", "eval_every")  # resumable, yet part of a study's fingerprint
    free = free_between_launches()
    assert "skip_bad" in free and not {"iters", "eval_every"} & free
    assert {"device", "progress_iter", "save_iter", "compile", "cuda_graph"} <= free
    model = set(settings_of("model"))
    assert {"lr", "disclr", "bs", "resize", "sep", "seed", "amp", "disc_clip", *TERM_WEIGHTS.values()} == model
    assert not {"root", "out", "load", "gpu"} & study_train_keys()  # the study sets them for each trial


def test_loss_weights_come_from_their_terms() -> None:
    """Each weight names the term it scales; the map and the weight flags both follow from the fields."""
    weights = [s for s in declared_settings() if s.name in TERM_WEIGHTS.values()]
    assert [s.name for s in weights] == list(LossWeights.__dataclass_fields__)
    assert sorted(TERM_WEIGHTS) == sorted(
        ["recon1_a", "recon1_b", "recon2_a", "recon2_b", "cycle_common", "cycle_separate", "domain_confusion"]
    )
    assert all(s.flag == f"--{s.name}" and s.type is float and s.effect == "model" for s in weights)
