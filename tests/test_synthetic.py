from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbu.data.synthetic import SPEC_FILE, SynthConfig, content_mask, render, write_dataset

# Data sets are written straight into the test's folder, which must start empty: no MLflow store there.
pytestmark = pytest.mark.fresh_mlflow_store


@pytest.mark.parametrize("size", [64, 128])
def test_layout_sizes_and_determinism(tmp_path: Path, size: int) -> None:
    cfg = SynthConfig(size=size, n_train=3, n_test=4, seed=7)
    first = write_dataset(cfg, tmp_path / "one", progress=False)
    second = write_dataset(cfg, tmp_path / "two", progress=False)
    for folder, count in [("trainA", 3), ("trainB", 3), ("testA", 4), ("testB", 4), ("testA_masks", 4)]:
        names = sorted(p.name for p in (first / folder).iterdir())
        assert len(names) == count, folder
        for name in names:
            a, b = Image.open(first / folder / name), Image.open(second / folder / name)
            assert a.size == (size, size)
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{folder}/{name} differs between runs"
    assert sorted(p.name for p in (first / "testA").iterdir()) == sorted(
        p.name for p in (first / "testA_masks").iterdir()
    )


def test_masks_are_exactly_where_a_differs_from_its_content_free_rendering(tmp_path: Path) -> None:
    cfg = SynthConfig(size=64, n_train=1, n_test=5, seed=11)
    root = write_dataset(cfg, tmp_path, progress=False)
    for index in range(cfg.n_test):
        name = f"{index:06d}.png"
        saved_a = np.asarray(Image.open(root / "testA" / name).convert("RGB"))
        saved_mask = np.asarray(Image.open(root / "testA_masks" / name)) > 0
        _, content_free = render(cfg, "test", "A", index)
        diff = np.any(saved_a != np.asarray(content_free), axis=-1)
        assert np.array_equal(saved_mask, diff)
        assert 0 < saved_mask.sum() < saved_mask.size / 3  # glasses: present, not the whole image


def test_domain_b_has_no_content_and_a_differs() -> None:
    cfg = SynthConfig(size=64, seed=0)
    b, b_free = render(cfg, "train", "B", 0)
    assert not content_mask(b, b_free).any()
    a, a_free = render(cfg, "train", "A", 0)
    assert content_mask(a, a_free).any()


def test_no_fixed_mask_scores_well() -> None:
    """Glasses move and change size: the best single mask (the pixel-wise majority) has low IoU."""
    cfg = SynthConfig(size=64, seed=0)
    masks = np.stack([content_mask(*render(cfg, "test", "A", i)) for i in range(60)])
    majority = masks.mean(0) >= 0.5
    ious = [(m & majority).sum() / max(1, (m | majority).sum()) for m in masks]
    assert np.mean(ious) < 0.5


def test_existing_folder_with_another_spec_is_refused(tmp_path: Path) -> None:
    write_dataset(SynthConfig(size=64, n_train=1, n_test=2), tmp_path, progress=False)
    write_dataset(SynthConfig(size=64, n_train=1, n_test=2), tmp_path, progress=False)  # same spec: reused
    assert json.loads((tmp_path / SPEC_FILE).read_text())["n_test"] == 2
    with pytest.raises(FileExistsError, match="another|not"):
        write_dataset(SynthConfig(size=64, n_train=1, n_test=3), tmp_path, progress=False)


def test_bad_spec_is_rejected() -> None:
    with pytest.raises(ValueError, match="size"):
        SynthConfig(size=96)
