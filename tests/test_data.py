from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.batches import DomainBatches
from data.images import DataError, decode_image, list_images, load_annotated, load_domain, load_domain_cached


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_folder_and_list_layouts_load_the_same_images(tiny_root: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    paths = sorted((tiny_root / "trainA").iterdir())
    (lists / "trainA.txt").write_text("\n".join(str(p) for p in paths) + "\n")
    from_folder = load_domain(tiny_root, "trainA", 64, progress=False)
    from_list = load_domain(lists, "trainA", 64, progress=False)
    assert torch.equal(from_folder.images, from_list.images)
    assert from_folder.images.shape == (8, 3, 64, 64) and from_folder.images.dtype == torch.uint8


def test_list_file_with_missing_files_names_them(tmp_path: Path) -> None:
    (tmp_path / "trainA.txt").write_text("nowhere/x.png\n")
    with pytest.raises(DataError, match="missing.*x.png"):
        list_images(tmp_path, "trainA")


def test_missing_folder_and_empty_domain_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        list_images(tmp_path / "absent", "trainA")
    with pytest.raises(DataError, match="neither a trainA/ folder nor a trainA.txt"):
        list_images(tmp_path, "trainA")
    (tmp_path / "trainA").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        list_images(tmp_path, "trainA")


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    good = _write(tmp_path / "trainA" / "a.png", np.zeros((10, 10, 3), np.uint8))
    bad = tmp_path / "trainA" / "b.png"
    bad.write_bytes(good.read_bytes()[:40])  # truncated PNG
    with pytest.raises(DataError, match="b.png"):
        load_domain(tmp_path, "trainA", 64, progress=False)


@pytest.mark.parametrize(
    "array, mode",
    [
        (np.full((20, 30), 200, np.uint8), "L"),
        (np.full((20, 30, 4), 200, np.uint8), "RGBA"),
        (np.full((20, 30), 200 * 257, np.uint16), None),  # PIL makes it I;16
    ],
)
def test_any_image_mode_becomes_rgb(tmp_path: Path, array: np.ndarray, mode: str) -> None:
    path = _write(tmp_path / "x.png", array, mode)
    out = decode_image(path, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 200) <= 1


def test_annotated_pairs_images_with_masks(tiny_root: Path) -> None:
    ann = load_annotated(tiny_root, 64, progress=False)
    assert ann.images.shape[0] == ann.masks.shape[0] == len(ann.names) == 6
    assert ann.masks.dtype == torch.bool and ann.masks.any()


def test_cache_reuses_decode_and_notices_changed_files(tmp_path: Path) -> None:
    for i in range(2):
        _write(tmp_path / "trainA" / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
    first = load_domain_cached(tmp_path, "trainA", 64, progress=False)
    assert load_domain_cached(tmp_path, "trainA", 64, progress=False) is first
    _write(tmp_path / "trainA" / "2.png", np.full((8, 8, 3), 99, np.uint8))
    changed = load_domain_cached(tmp_path, "trainA", 64, progress=False)
    assert changed is not first and len(changed) == 3


def test_batches_are_a_function_of_seed_and_iteration() -> None:
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    one, two = DomainBatches(images, 3, seed=5, domain=0), DomainBatches(images, 3, seed=5, domain=0)
    sequence = [one.batch(i) for i in range(7)]
    assert torch.equal(two.batch(6), sequence[6])  # jump straight to iteration 6
    assert not torch.equal(DomainBatches(images, 3, seed=6, domain=0).batch(0), sequence[0])
    assert all(b.min() >= -1 and b.max() <= 1 for b in sequence)
    epoch = torch.cat([one.indices(i) for i in range(3)])  # 3 batches of 3 from 10 images
    assert len(set(epoch.tolist())) == 9


def test_batch_size_larger_than_domain_is_an_error() -> None:
    with pytest.raises(ValueError, match="fewer than the batch size"):
        DomainBatches(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), 4, seed=0, domain=1)
