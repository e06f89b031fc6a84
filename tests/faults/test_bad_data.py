"""Corrupt images: a clear error naming the file before training, or skipped and logged with --skip-bad."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_train_config
from PIL import Image

from mbu.base.run_files import SKIPPED_FILE
from mbu.cli import main as mbu_main
from mbu.data.images import DataError, list_images, load_domain
from mbu.train.loop import train


def _copy_with_corrupt_image(tiny_root: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    shutil.copytree(tiny_root, root)
    bad = sorted((root / "trainA").iterdir())[2]
    bad.write_bytes(bad.read_bytes()[:60])  # truncated mid-file, as by an interrupted copy
    return root, bad


def test_corrupt_training_image_stops_before_training_and_names_the_file(tiny_root: Path, tmp_path: Path) -> None:
    root, bad = _copy_with_corrupt_image(tiny_root, tmp_path)
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        train(tiny_train_config(root, tmp_path / "run"), progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_skip_bad_trains_on_the_rest_and_lists_the_skipped_file(tiny_root: Path, tmp_path: Path) -> None:
    root, bad = _copy_with_corrupt_image(tiny_root, tmp_path)
    result = train(tiny_train_config(root, tmp_path / "run", skip_bad=True), progress=False)
    assert result.iterations == 4
    skipped = (tmp_path / "run" / SKIPPED_FILE).read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: ")


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def test_folders_command_converts_every_mode_and_handles_bad_files(tmp_path: Path, capsys) -> None:
    root = tmp_path / "custom"
    rgb = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    for split in ("trainA", "trainB", "testA", "testB"):
        _save(root / split / "rgb.jpg", Image.fromarray(rgb))
        _save(root / split / "grey.png", Image.fromarray(rgb[..., 0]))
        _save(root / split / "palette.gif", Image.fromarray(rgb).convert("P"))
        _save(root / split / "alpha.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
        _save(root / split / "deep.png", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))  # 16-bit grey
    _save(root / "testA_masks" / "rgb.png", Image.fromarray(np.zeros((20, 20), np.uint8)))
    (root / "trainB" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n only a header")

    dest = tmp_path / "lists"
    assert mbu_main(["data", "folders", "--root", str(root), "--dest", str(dest), "--no-progress"]) == 2
    assert f"cannot read image {root / 'trainB' / 'broken.png'}" in capsys.readouterr().err
    assert not dest.exists()  # nothing written on failure

    assert mbu_main(["data", "folders", "--root", str(root), "--dest", str(dest), "--skip-bad", "--no-progress"]) == 0
    assert "trainA 5, trainB 5, testA 5, testB 5" in capsys.readouterr().out
    assert "broken.png" in (dest / "skipped_images.txt").read_text()
    assert len(list_images(dest, "trainB")) == 5 and (dest / "testA_masks" / "rgb.png").is_file()
    images = load_domain(dest, "trainA", 64, progress=False).images
    assert images.shape == (5, 3, 64, 64)
    grey = images[[p.name for p in list_images(dest, "trainA")].index("grey.png")]
    assert torch_equal_channels(grey)


def torch_equal_channels(image) -> bool:
    """A greyscale source becomes RGB with three equal channels."""
    return bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
