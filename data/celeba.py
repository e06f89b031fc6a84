"""CelebA attribute splits: the reference ``preprocess.py`` selection rules, by attribute name.

The attribute file has CelebA's format (``list_attr_celeba.txt``; CelebAMask-HQ's
``CelebAMask-HQ-attribute-anno.txt`` is the same): a count, a line of the 40
attribute names, then one row per image of its file name and 40 values of 1 or
-1. A rule picks domain A (the images with the content) and domain B (without)
from those values; an image that satisfies A's rule is never put in B.

The split is written in the reference's list-file layout (``trainA.txt`` ... one
absolute image path a line, sorted), which ``mbu train --root`` reads.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mbu.data.files import check_destination
from mbu.data.images import DATASET_FILE, DataError

Condition = tuple[str, int]  # (attribute name, required value: 1 or -1)
Clause = tuple[Condition, ...]  # holds when any of its conditions holds


def every(*conditions: Condition) -> tuple[Clause, ...]:
    """Clauses that all must hold, one condition each."""
    return tuple((c,) for c in conditions)


@dataclass(frozen=True)
class SplitRule:
    """Domain A and B membership: every clause must hold; ``both`` is required of either domain."""

    description: str
    a: tuple[Clause, ...]
    b: tuple[Clause, ...]
    both: tuple[Condition, ...] = ()
    parts: tuple[str, ...] = ()  # CelebAMask-HQ parts whose union is the content's mask

    def attributes(self) -> set[str]:
        return {name for clauses in (self.a, self.b) for clause in clauses for name, _ in clause} | {
            name for name, _ in self.both
        }


GLASSES = every(("Eyeglasses", 1)), every(("Eyeglasses", -1))

# The reference's configs (glasses, mouth, beard) with its rules, and the tasks of the
# paper's published hyperparameters (smile, black-to-blond women, dark-hair-to-bald men).
CONFIGS: dict[str, SplitRule] = {
    "glasses": SplitRule("eyeglasses vs none", *GLASSES, parts=("eye_g",)),
    "male_glasses": SplitRule("men: eyeglasses vs none", *GLASSES, both=(("Male", 1),), parts=("eye_g",)),
    "female_glasses": SplitRule("women: eyeglasses vs none", *GLASSES, both=(("Male", -1),), parts=("eye_g",)),
    "mouth": SplitRule(
        "mouth slightly open vs closed",
        every(("Mouth_Slightly_Open", 1)),
        every(("Mouth_Slightly_Open", -1)),
        parts=("mouth", "u_lip", "l_lip"),
    ),
    "beard": SplitRule(
        "men without stubble: mustache, goatee or beard vs no beard",
        every(("Male", 1), ("5_o_Clock_Shadow", -1)) + ((("Mustache", 1), ("Goatee", 1), ("No_Beard", -1)),),
        every(("Male", 1), ("5_o_Clock_Shadow", -1), ("No_Beard", 1)),
    ),
    "smile": SplitRule(
        "smiling vs not",
        every(("Smiling", 1)),
        every(("Smiling", -1)),
        parts=("mouth", "u_lip", "l_lip"),
    ),
    "blond_women": SplitRule(
        "women without hats: blond vs black hair",
        every(("Blond_Hair", 1), ("Black_Hair", -1)),
        every(("Black_Hair", 1), ("Blond_Hair", -1)),
        both=(("Male", -1), ("Wearing_Hat", -1)),
        parts=("hair",),
    ),
    "bald": SplitRule(
        "men without hats: black or brown hair vs bald",
        every(("Bald", -1)) + ((("Black_Hair", 1), ("Brown_Hair", 1)),),
        every(("Bald", 1)),
        both=(("Male", 1), ("Wearing_Hat", -1)),
        parts=("hair",),
    ),
}
CONFIG_NAMES = (*CONFIGS, "custom")


def custom_rule(attribute: str, require: list[Condition]) -> SplitRule:
    """A: ``attribute`` = 1, B: ``attribute`` = -1, both filtered by ``require``."""
    return SplitRule(f"{attribute} vs not", every((attribute, 1)), every((attribute, -1)), both=tuple(require))


def parse_requirement(text: str) -> Condition:
    """``NAME=1`` or ``NAME=-1`` (``+1`` accepted)."""
    name, sep, value = text.partition("=")
    if not sep or value.strip() not in ("1", "+1", "-1"):
        raise DataError(f"--require takes NAME=1 or NAME=-1, got {text!r}")
    return name.strip(), int(value)


@dataclass
class AttributeTable:
    path: Path
    names: list[str]  # the attribute names, in column order
    files: list[str]  # image file names, one per row
    values: np.ndarray  # (rows, attributes) int8 of 1 / -1

    def column(self, name: str) -> np.ndarray:
        if name not in self.names:
            close = difflib.get_close_matches(name, self.names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(self.names)}"
            raise DataError(f"attribute {name!r} is not in {self.path}{hint}")
        return self.values[:, self.names.index(name)]


def read_table(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """The whitespace-split fields of every non-blank line of a text table, with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    lines = enumerate(path.read_text().splitlines(), 1)
    return [(number, line.split()) for number, line in lines if line.strip()]


def read_attributes(path: Path) -> AttributeTable:
    """Parse a CelebA-format attribute file; every malformed line is an error naming its number."""
    path = Path(path)
    table = read_table(path, "attribute file")
    header = [fields for number, fields in table[:2] if number <= 2]
    if len(header) < 2 or len(header[0]) != 1 or not header[0][0].isdigit():
        raise DataError(f"{path}: line 1 must be the image count and line 2 the attribute names")
    count, names = int(header[0][0]), header[1]
    rows = table[2:]
    if len(rows) != count:
        raise DataError(f"{path}: line 1 says {count} images but {len(rows)} rows follow")
    files, values = [], np.empty((len(rows), len(names)), dtype=np.int8)
    for i, (number, row) in enumerate(rows):
        if len(row) != len(names) + 1 or any(v not in ("1", "-1") for v in row[1:]):
            raise DataError(f"{path}, line {number}: expected a file name and {len(names)} values of 1 or -1")
        files.append(row[0])
        values[i] = np.array(row[1:], dtype=np.int8)
    return AttributeTable(path, names, files, values)


def read_partition(path: Path) -> dict[str, int]:
    """``list_eval_partition.txt``: file name -> 0 (train), 1 (validation) or 2 (test)."""
    partition = {}
    for number, parts in read_table(path, "partition file"):
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}, line {number}: expected a file name and 0, 1 or 2")
        partition[parts[0]] = int(parts[1])
    return partition


TEST_PARTITION = 2


def select(table: AttributeTable, rule: SplitRule) -> tuple[list[str], list[str]]:
    """File names of domain A and domain B under ``rule``, in the table's order."""

    def holds(clauses: tuple[Clause, ...]) -> np.ndarray:
        ok = np.ones(len(table.files), dtype=bool)
        for clause in clauses:
            ok &= np.logical_or.reduce([table.column(name) == value for name, value in clause])
        return ok

    base = holds(every(*rule.both))
    in_a = base & holds(rule.a)
    in_b = base & holds(rule.b) & ~in_a
    files = np.array(table.files)
    return list(files[in_a]), list(files[in_b])


@dataclass
class Split:
    train_a: list[str] = field(default_factory=list)
    train_b: list[str] = field(default_factory=list)
    test_a: list[str] = field(default_factory=list)
    test_b: list[str] = field(default_factory=list)

    def lists(self) -> dict[str, list[str]]:
        return {"trainA": self.train_a, "trainB": self.train_b, "testA": self.test_a, "testB": self.test_b}

    def summary(self) -> str:
        return ", ".join(f"{name} {len(files)}" for name, files in self.lists().items())


def split_domains(
    files_a: list[str], files_b: list[str], num_test: int | None, test_files: set[str] | None = None
) -> Split:
    """Sorted train/test lists per domain.

    With ``test_files`` (the official test partition), test images are drawn
    only from it and no image of it is trained on; ``num_test`` caps the test
    lists (None: all of it). Without, the first ``num_test`` sorted images of
    each domain are its test set, as the reference did.
    """
    if num_test is not None and (isinstance(num_test, bool) or num_test < 1):
        raise DataError(f"--num-test must be a positive integer, got {num_test}")
    split = Split()
    for files, train, test in ((files_a, split.train_a, split.test_a), (files_b, split.train_b, split.test_b)):
        ordered = sorted(files)
        if test_files is None:
            count = 64 if num_test is None else num_test
            test += ordered[:count]
            train += ordered[count:]
        else:
            candidates = [f for f in ordered if f in test_files]
            test += candidates if num_test is None else candidates[:num_test]
            train += [f for f in ordered if f not in test_files]
    for name, files in split.lists().items():
        if not files:
            raise DataError(f"the split leaves {name} empty ({split.summary()}); check the config and --num-test")
    return split


def write_split(split: Split, image_root: Path, dest: Path, meta: dict) -> None:
    """``dest/trainA.txt`` ... with absolute paths, after checking every image exists."""
    image_root = Path(image_root).resolve()
    check_destination(dest, DATASET_FILE, meta)
    for name, files in split.lists().items():
        missing = [f for f in files if not (image_root / f).is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) of {name} are not in {image_root}, e.g. {', '.join(missing[:3])}")
    dest.mkdir(parents=True, exist_ok=True)
    for name, files in split.lists().items():
        (dest / f"{name}.txt").write_text("".join(f"{image_root / f}\n" for f in files))
    counts = {name: len(files) for name, files in split.lists().items()}
    (dest / DATASET_FILE).write_text(json.dumps({**meta, "counts": counts}, indent=2) + "\n")


@dataclass(frozen=True)
class CelebaConfig:
    """``mbu data celeba``: which images, which rule, where to write."""

    root: Path  # img_align_celeba/
    attributes: Path  # list_attr_celeba.txt
    dest: Path  # folder for trainA.txt ... and mbu_data.json
    config: str = "glasses"  # one of CONFIG_NAMES
    attribute: str | None = None  # custom: the attribute that defines A
    require: tuple[Condition, ...] = ()  # extra conditions on both domains
    partition: Path | None = None  # list_eval_partition.txt: test images from the official test split
    num_test: int | None = None  # test images per domain (default 64 without --partition, all with)
    crop: int | None = 178  # centre square of the 178x218 aligned faces before resizing; None: no crop


def make_rule(config: str, attribute: str | None, require: tuple[Condition, ...]) -> SplitRule:
    if config == "custom":
        if not attribute:
            raise DataError("--config custom needs --attribute NAME (one of the 40 CelebA attributes)")
        return custom_rule(attribute, list(require))
    if config not in CONFIGS:
        raise DataError(f"unknown config {config!r}; choose one of {', '.join(CONFIG_NAMES)}")
    if attribute:
        raise DataError(f"--attribute is for --config custom, not {config}")
    rule = CONFIGS[config]
    return SplitRule(rule.description, rule.a, rule.b, rule.both + tuple(require), rule.parts)


def prepare_celeba(cfg: CelebaConfig) -> Split:
    """Select, split and write the list files; returns the split."""
    if not Path(cfg.root).is_dir():
        raise DataError(f"image folder {cfg.root} does not exist")
    rule = make_rule(cfg.config, cfg.attribute, cfg.require)
    table = read_attributes(cfg.attributes)
    files_a, files_b = select(table, rule)
    test_files = None
    if cfg.partition is not None:
        partition = read_partition(cfg.partition)
        unknown = [f for f in files_a + files_b if f not in partition]
        if unknown:
            raise DataError(f"{cfg.partition} has no partition for {len(unknown)} image(s), e.g. {unknown[:3]}")
        test_files = {f for f, p in partition.items() if p == TEST_PARTITION}
    split = split_domains(files_a, files_b, cfg.num_test, test_files)
    meta = {"source": "celeba", "config": cfg.config, "rule": rule.description, "crop": cfg.crop}
    write_split(split, cfg.root, Path(cfg.dest), meta)
    return split
