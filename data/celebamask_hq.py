"""CelebAMask-HQ: the CelebA configs on its 30,000 images, with ground-truth masks for scoring.

Its part masks align with its own images (CelebA-HQ crops), not with
``img_align_celeba``, so training and scoring both stay inside it. Layout read:

    ROOT/CelebA-HQ-img/{index}.jpg
    ROOT/CelebAMask-HQ-attribute-anno.txt          (CelebA's attribute format)
    ROOT/CelebAMask-HQ-mask-anno/<k>/{index:05d}_{part}.png
    ROOT/CelebA-HQ-to-CelebA-mapping.txt           (optional: idx orig_idx orig_file)

The mask of a test A image is the union of the config's parts (glasses:
``eye_g``; hair tasks: ``hair``), written to ``DEST/testA_masks/{index}.png`` at
the annotation's resolution; scoring resizes it to the training resolution
with nearest neighbour. Test A images with none of the parts annotated are
listed in ``DEST/testA_unannotated.txt`` and left out of scoring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mbu.data.celeba import (
    TEST_PARTITION,
    Condition,
    Split,
    make_rule,
    read_attributes,
    read_partition,
    read_table,
    select,
    split_domains,
    write_split,
)
from mbu.data.images import MASK_FOLDER_SUFFIX, DataError

IMAGE_FOLDER = "CelebA-HQ-img"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
MASK_FOLDER = "CelebAMask-HQ-mask-anno"
UNANNOTATED_FILE = "testA_unannotated.txt"


@dataclass(frozen=True)
class MaskHQConfig:
    root: Path  # the CelebAMask-HQ folder
    dest: Path  # folder for trainA.txt ..., testA_masks/, mbu_data.json
    config: str = "glasses"  # one of data.celeba.CONFIG_NAMES
    attribute: str | None = None  # custom: the attribute that defines A
    require: tuple[Condition, ...] = ()  # extra conditions on both domains
    parts: tuple[str, ...] = ()  # mask parts; default: the config's (glasses: eye_g, hair tasks: hair)
    mapping: Path | None = None  # CelebA-HQ-to-CelebA-mapping.txt, needed with partition
    partition: Path | None = None  # CelebA's list_eval_partition.txt: test images from its test split
    num_test: int | None = None  # test images per domain (default 64 without partition, all with)


def read_mapping(path: Path) -> dict[str, str]:
    """CelebA-HQ file name (``{idx}.jpg``) -> CelebA file name, from the mapping file."""
    mapping = {}
    for number, parts in read_table(path, "mapping file"):
        if number == 1 and not parts[0].isdigit():
            continue  # the header "idx orig_idx orig_file"
        if len(parts) != 3 or not parts[0].isdigit():
            raise DataError(f"{path}, line {number}: expected idx, orig_idx and orig_file")
        mapping[f"{parts[0]}.jpg"] = parts[2]
    return mapping


def part_masks(root: Path) -> dict[str, Path]:
    """Every annotation file by name (``00012_eye_g.png`` -> its path), whatever the sub-folders."""
    folder = Path(root) / MASK_FOLDER
    if not folder.is_dir():
        raise DataError(f"mask folder {folder} does not exist")
    return {p.name: p for p in folder.rglob("*.png")}


def union_mask(paths: list[Path]) -> np.ndarray:
    """(H, W) bool: pixels marked in any of the part masks (all the same size)."""
    out = None
    for path in paths:
        try:
            with Image.open(path) as image:
                marked = np.array(image.convert("L")) > 127
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"cannot read mask {path}: {err}") from err
        if out is not None and marked.shape != out.shape:
            raise DataError(f"mask {path} is {marked.shape[::-1]} but the other parts are {out.shape[::-1]}")
        out = marked if out is None else out | marked
    assert out is not None
    return out


def write_masks(test_a: list[str], parts: tuple[str, ...], annotations: dict[str, Path], dest: Path) -> list[str]:
    """``dest/testA_masks/{stem}.png`` for each annotated test A image; returns the unannotated ones."""
    folder = dest / f"testA{MASK_FOLDER_SUFFIX}"
    folder.mkdir(parents=True, exist_ok=True)
    unannotated = []
    for name in tqdm(test_a, desc="masks", unit="img", leave=False):
        index = int(Path(name).stem)
        found = [annotations[f"{index:05d}_{part}.png"] for part in parts if f"{index:05d}_{part}.png" in annotations]
        if not found:
            unannotated.append(name)
            continue
        Image.fromarray(union_mask(found).astype(np.uint8) * 255).save(folder / f"{Path(name).stem}.png")
    (dest / UNANNOTATED_FILE).write_text("".join(f"{name}\n" for name in unannotated))
    return unannotated


def prepare_celebamask_hq(cfg: MaskHQConfig) -> tuple[Split, list[str]]:
    """List files and test A masks; returns the split and the unannotated test A images."""
    root = Path(cfg.root)
    images = root / IMAGE_FOLDER
    if not images.is_dir():
        raise DataError(f"image folder {images} does not exist (is {root} the CelebAMask-HQ folder?)")
    rule = make_rule(cfg.config, cfg.attribute, cfg.require)
    parts = cfg.parts or rule.parts
    if not parts:
        raise DataError(f"config {cfg.config} has no CelebAMask-HQ part to score against; pass --parts")
    annotations = part_masks(root)
    files_a, files_b = select(read_attributes(root / ATTRIBUTE_FILE), rule)

    test_files = None
    if cfg.partition is not None:
        if cfg.mapping is None:
            raise DataError("--partition needs --mapping (CelebA-HQ-to-CelebA-mapping.txt) on CelebAMask-HQ")
        mapping, partition = read_mapping(cfg.mapping), read_partition(cfg.partition)
        unmapped = [f for f in files_a + files_b if mapping.get(f) not in partition]
        if unmapped:
            raise DataError(f"no CelebA partition for {len(unmapped)} image(s) via {cfg.mapping}, e.g. {unmapped[:3]}")
        test_files = {f for f in files_a + files_b if partition[mapping[f]] == TEST_PARTITION}
    split = split_domains(files_a, files_b, cfg.num_test, test_files)
    meta = {"source": "celebamask-hq", "config": cfg.config, "rule": rule.description, "parts": list(parts)}
    write_split(split, images, Path(cfg.dest), {**meta, "crop": None})
    unannotated = write_masks(split.test_a, parts, annotations, Path(cfg.dest))
    return split, unannotated
