from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbu.data.batches import DomainBatches
from mbu.data.cache import cache_dir
from mbu.data.images import DATASET_FILE, DataError, decode_image, list_images, load_annotated, load_domain
from mbu.train.config import TrainConfig


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


def _overwrite_keeping_stat(path: Path, data: bytes) -> None:
    """Replace the file's bytes but keep its size and mtime: the cache key cannot see the change."""
    stat = path.stat()
    path.write_bytes(data[: stat.st_size].ljust(stat.st_size, b"\0"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_disk_cache_serves_a_second_load_without_decoding(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / "trainA" / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
    first = load_domain(tmp_path, "trainA", 64, progress=False)
    assert len(list(cache_dir().glob("*.npy"))) == 1
    # Garbage under the same size and mtime: only a cache hit can still return the images.
    _overwrite_keeping_stat(tmp_path / "trainA" / "1.png", b"not a png")
    again = load_domain(tmp_path, "trainA", 64, progress=False)
    assert torch.equal(again.images, first.images) and again.paths == first.paths
    with pytest.raises(DataError, match="1.png"):
        load_domain(tmp_path, "trainA", 64, progress=False, use_cache=False)


def test_changed_data_is_decoded_again_not_served_stale(tmp_path: Path) -> None:
    for i in range(2):
        _write(tmp_path / "trainA" / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
    first = load_domain(tmp_path, "trainA", 64, progress=False)
    _write(tmp_path / "trainA" / "1.png", np.full((8, 8, 3), 200, np.uint8))  # new content, new mtime
    os.utime(tmp_path / "trainA" / "1.png", ns=(1, 10**18))
    changed = load_domain(tmp_path, "trainA", 64, progress=False)
    assert int(first.images[1].float().mean()) == 10 and int(changed.images[1].float().mean()) == 200
    _write(tmp_path / "trainA" / "2.png", np.full((8, 8, 3), 99, np.uint8))
    assert len(load_domain(tmp_path, "trainA", 64, progress=False)) == 3


def test_corrupt_cache_entry_is_ignored_and_rewritten(tmp_path: Path) -> None:
    for i in range(2):
        _write(tmp_path / "trainA" / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
    first = load_domain(tmp_path, "trainA", 64, progress=False)
    (entry,) = cache_dir().glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as by a crash or a full disk
    with pytest.warns(UserWarning, match="unreadable decode cache"):
        again = load_domain(tmp_path, "trainA", 64, progress=False)
    assert torch.equal(again.images, first.images)
    assert np.load(entry, allow_pickle=False).shape == tuple(first.images.shape)  # rewritten whole


def test_skip_bad_leaves_unreadable_images_out_and_names_them(tmp_path: Path, capsys) -> None:
    for i in range(3):
        _write(tmp_path / "trainA" / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
    (tmp_path / "trainA" / "1.png").write_bytes(b"\x89PNG truncated")
    domain = load_domain(tmp_path, "trainA", 64, progress=False, skip_bad=True)
    assert [p.name for p in domain.paths] == ["0.png", "2.png"] and domain.images.shape[0] == 2
    assert len(domain.skipped) == 1 and "1.png" in domain.skipped[0]
    assert "skipped 1 unreadable image" in capsys.readouterr().err
    with pytest.raises(DataError, match="1.png"):
        load_domain(tmp_path, "trainA", 64, progress=False)


def test_crop_from_the_data_root_is_applied_before_resizing(tmp_path: Path) -> None:
    # A 20x30 image: a 10x10 centre square of 200 inside a border of 0.
    array = np.zeros((30, 20, 3), np.uint8)
    array[10:20, 5:15] = 200
    _write(tmp_path / "trainA" / "0.png", array)
    uncropped = load_domain(tmp_path, "trainA", 64, progress=False).images
    (tmp_path / DATASET_FILE).write_text(json.dumps({"crop": 10}))
    cropped = load_domain(tmp_path, "trainA", 64, progress=False).images
    assert int(cropped.min()) == 200  # only the centre square is left
    assert int(uncropped.min()) == 0
    (tmp_path / DATASET_FILE).write_text(json.dumps({"crop": -3}))
    with pytest.raises(DataError, match="crop"):
        load_domain(tmp_path, "trainA", 64, progress=False)


def test_mask_whose_size_or_name_does_not_match_is_an_error(tmp_path: Path) -> None:
    for i in range(2):
        _write(tmp_path / "testA" / f"{i}.png", np.zeros((20, 20, 3), np.uint8))
    _write(tmp_path / "testA_masks" / "0.png", np.zeros((10, 10), np.uint8))  # half scale: fine
    _write(tmp_path / "testA_masks" / "1.png", np.zeros((10, 16), np.uint8))  # wrong shape
    with pytest.raises(DataError, match=r"1.png is 16x10 but its image .*1.png is 20x20"):
        load_annotated(tmp_path, 64, progress=False)
    (tmp_path / "testA_masks" / "1.png").unlink()
    _write(tmp_path / "testA_masks" / "7.png", np.zeros((20, 20), np.uint8))  # no testA/7.*
    with pytest.raises(DataError, match=r"matches no testA image.*'7'"):
        load_annotated(tmp_path, 64, progress=False)
    (tmp_path / "testA_masks" / "7.png").unlink()
    ann = load_annotated(tmp_path, 64, progress=False)
    assert ann.names == ["0.png"] and ann.unannotated == ["1.png"]


def test_resize_must_be_a_multiple_of_64(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="resize must be a multiple of 64.*got 100"):
        TrainConfig(root=str(tmp_path), resize=100)
    assert TrainConfig(root=str(tmp_path), resize=192).model_config().latent_side == 3


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
