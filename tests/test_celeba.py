"""CelebA splits from a 30-row attribute file in the real format, and CelebAMask-HQ masks scored by mbu eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_train_config
from PIL import Image

from mbu.cli import main as mbu_main
from mbu.data.celeba import CelebaConfig, DataError, prepare_celeba, read_attributes
from mbu.data.celebamask_hq import MaskHQConfig, prepare_celebamask_hq
from mbu.data.images import list_images, load_annotated
from mbu.evaluate.report import evaluate_run
from mbu.train.loop import train

# CelebA's 40 attribute names, in the file's column order.
NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()

# Row i (file 0000ii.jpg): the attributes that are 1; all others -1 except No_Beard, which is 1
# unless "beard" is listed (No_Beard = -1 means a beard, as in CelebA).
ROWS = {
    1: "Male Eyeglasses",
    2: "Eyeglasses",
    3: "Male",
    4: "",
    5: "Male beard",
    6: "Male Mustache",
    7: "Male Goatee 5_o_Clock_Shadow",
    8: "Male 5_o_Clock_Shadow",
    9: "Mouth_Slightly_Open",
    10: "Mouth_Slightly_Open Smiling",
    11: "Smiling Male",
    12: "Blond_Hair",
    13: "Black_Hair",
    14: "Blond_Hair Black_Hair",
    15: "Blond_Hair Wearing_Hat",
    16: "Black_Hair Male",
    17: "Male Bald",
    18: "Male Brown_Hair",
    19: "Male Black_Hair Wearing_Hat",
    20: "Male Bald Wearing_Hat",
    21: "Male Blond_Hair",
    22: "Eyeglasses Male Smiling",
    23: "Eyeglasses Black_Hair",
    24: "Brown_Hair",
    25: "Wearing_Hat",
    26: "Male Bald",
    27: "Mouth_Slightly_Open Male",
    28: "Smiling",
    29: "Male beard Mustache Eyeglasses",
    30: "Heavy_Makeup Blond_Hair",
}
ALL = set(ROWS)
MEN = {1, 3, 5, 6, 7, 8, 11, 16, 17, 18, 19, 20, 21, 22, 26, 27, 29}

# Expected domains, worked out by hand from the rows above.
EXPECTED = {
    "glasses": ({1, 2, 22, 23, 29}, ALL - {1, 2, 22, 23, 29}),
    "male_glasses": ({1, 22, 29}, MEN - {1, 22, 29}),
    "female_glasses": ({2, 23}, ALL - MEN - {2, 23}),
    "mouth": ({9, 10, 27}, ALL - {9, 10, 27}),
    "smile": ({10, 11, 22, 28}, ALL - {10, 11, 22, 28}),
    "beard": ({5, 6, 29}, {1, 3, 11, 16, 17, 18, 19, 20, 21, 22, 26, 27}),
    "blond_women": ({12, 30}, {13, 23}),
    "bald": ({16, 18}, {17, 26}),
}


def _name(i: int) -> str:
    return f"{i:06d}.jpg"


def write_attribute_file(path: Path, rows: dict[int, str], name=_name) -> Path:
    lines = [str(len(rows)), " ".join(NAMES)]
    for i, spec in rows.items():
        on = set(spec.split())
        values = [1 if n in on else -1 for n in NAMES]
        values[NAMES.index("No_Beard")] = -1 if "beard" in on else 1
        lines.append(name(i) + " " + " ".join(f"{v:2d}" for v in values))  # CelebA pads with spaces
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def celeba(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "img_align_celeba"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in ROWS:
        Image.fromarray(rng.integers(0, 255, (22, 18, 3), dtype=np.uint8)).save(images / _name(i))
    return images, write_attribute_file(tmp_path / "list_attr_celeba.txt", ROWS)


def _numbers(dest: Path, name: str) -> list[int]:
    return [int(Path(line).stem) for line in (dest / f"{name}.txt").read_text().split()]


@pytest.mark.parametrize("config", sorted(EXPECTED))
def test_every_config_selects_the_expected_domains(celeba, tmp_path: Path, config: str) -> None:
    images, attributes = celeba
    dest = tmp_path / config
    prepare_celeba(CelebaConfig(images, attributes, dest, config=config, num_test=1))
    expected_a, expected_b = EXPECTED[config]
    train_a, test_a, train_b, test_b = (_numbers(dest, n) for n in ("trainA", "testA", "trainB", "testB"))
    assert set(train_a + test_a) == expected_a and set(train_b + test_b) == expected_b
    # Test = the first image of each sorted domain; lists sorted; paths absolute and readable.
    assert test_a == [min(expected_a)] and test_b == [min(expected_b)]
    assert train_a == sorted(train_a) and train_b == sorted(train_b)
    assert len(list_images(dest, "trainA")) == len(expected_a) - 1


def test_custom_attribute_with_requirement(celeba, tmp_path: Path) -> None:
    images, attributes = celeba
    prepare_celeba(CelebaConfig(images, attributes, tmp_path / "hat", "custom", "Wearing_Hat", (("Male", 1),), None, 1))
    a = set(_numbers(tmp_path / "hat", "trainA") + _numbers(tmp_path / "hat", "testA"))
    b = set(_numbers(tmp_path / "hat", "trainB") + _numbers(tmp_path / "hat", "testB"))
    assert a == {19, 20} and b == MEN - {19, 20}


def test_partition_keeps_official_test_faces_out_of_training(celeba, tmp_path: Path) -> None:
    images, attributes = celeba
    partition = tmp_path / "list_eval_partition.txt"
    partition.write_text("".join(f"{_name(i)} {0 if i <= 20 else 1 if i <= 25 else 2}\n" for i in ROWS))
    dest = tmp_path / "split"
    prepare_celeba(CelebaConfig(images, attributes, dest, config="glasses", partition=partition))
    assert _numbers(dest, "testA") == [29] and _numbers(dest, "testB") == [26, 27, 28, 30]
    assert set(_numbers(dest, "trainA")) == {1, 2, 22, 23}
    trained = set(_numbers(dest, "trainA") + _numbers(dest, "trainB"))
    assert not trained & set(range(26, 31)) and trained | {26, 27, 28, 29, 30} == ALL


def test_cli_prints_the_counts_and_records_the_crop(celeba, tmp_path: Path, capsys) -> None:
    images, attributes = celeba
    dest = tmp_path / "glasses_data"
    code = mbu_main(
        ["data", "celeba", "--root", str(images), "--attributes", str(attributes), "--dest", str(dest)]
        + ["--config", "glasses", "--num-test", "2"]
    )
    assert code == 0
    assert "celeba glasses: trainA 3, trainB 23, testA 2, testB 2" in capsys.readouterr().out
    assert '"crop": 178' in (dest / "mbu_data.json").read_text()


def test_unknown_attribute_and_malformed_file_are_named(celeba, tmp_path: Path) -> None:
    images, attributes = celeba
    with pytest.raises(DataError, match="'Eyeglass' is not in .*did you mean Eyeglasses"):
        prepare_celeba(CelebaConfig(images, attributes, tmp_path / "x", "custom", "Eyeglass"))
    lines = attributes.read_text().splitlines()
    lines[5] = lines[5].rsplit(" ", 1)[0]  # one value short
    attributes.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 6: expected a file name and 40 values"):
        read_attributes(attributes)


def test_list_pointing_at_missing_images_is_refused(celeba, tmp_path: Path) -> None:
    images, attributes = celeba
    (images / _name(7)).unlink()
    with pytest.raises(DataError, match=f"not in {images}.*{_name(7)}"):
        prepare_celeba(CelebaConfig(images, attributes, tmp_path / "x", config="glasses", num_test=1))
    assert not (tmp_path / "x").exists()  # nothing half-written


# --- CelebAMask-HQ --------------------------------------------------------------------------------

HQ_ROWS = {i: ("Eyeglasses" if i < 6 else "") for i in range(12)}


def _hq_name(i: int) -> str:
    return f"{i}.jpg"


@pytest.fixture
def celebamask_hq(tmp_path: Path) -> Path:
    root = tmp_path / "CelebAMask-HQ"
    (root / "CelebA-HQ-img").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in HQ_ROWS:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "CelebA-HQ-img" / _hq_name(i))
    write_attribute_file(root / "CelebAMask-HQ-attribute-anno.txt", HQ_ROWS, _hq_name)
    # Annotations at half the image resolution, in numbered folders as the real set: 0, 1, 2 have
    # glasses, 3 has only a hair part, 4 and 5 nothing.
    parts = root / "CelebAMask-HQ-mask-anno" / "0"
    parts.mkdir(parents=True)
    for i in (0, 1, 2):
        mask = np.zeros((16, 16), np.uint8)
        mask[4 + i : 8 + i, 2:14] = 255
        Image.fromarray(mask).save(parts / f"{i:05d}_eye_g.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(parts / "00003_hair.png")
    return root


def test_celebamask_hq_masks_are_built_and_scored_by_eval(celebamask_hq: Path, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "hq_glasses"
    split, unannotated = prepare_celebamask_hq(MaskHQConfig(celebamask_hq, dest, "glasses", num_test=4))
    assert [Path(p).stem for p in split.test_a] == ["0", "1", "2", "3"] and split.train_a == ["4.jpg", "5.jpg"]
    assert unannotated == ["3.jpg"] and (dest / "testA_unannotated.txt").read_text() == "3.jpg\n"
    built = np.array(Image.open(dest / "testA_masks" / "1.png")) > 0
    expected = np.zeros((16, 16), bool)
    expected[5:9, 2:14] = True
    assert np.array_equal(built, expected)
    # Masks at half resolution pair with 32 px images and resize to the training resolution.
    annotated = load_annotated(dest, 64, progress=False)
    assert annotated.names == ["0.jpg", "1.jpg", "2.jpg"] and annotated.unannotated == ["3.jpg"]
    assert annotated.masks.shape == (3, 64, 64) and annotated.masks[1].sum() == 4 * 4 * 12 * 4

    run = tmp_path / "run"
    train(tiny_train_config(dest, run, bs=2, iters=2), progress=False)
    report = evaluate_run(run, progress=False)
    assert report["metrics"]["val/images"] + report["metrics"]["test/images"] == 3
    assert mbu_main(["eval", "--run", str(run), "--no-progress"]) == 0
    assert "scored 3 annotated images" in capsys.readouterr().out


def test_celebamask_hq_partition_through_the_mapping(celebamask_hq: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "CelebA-HQ-to-CelebA-mapping.txt"
    mapping.write_text("idx orig_idx orig_file\n" + "".join(f"{i} {i + 100} {i + 101:06d}.jpg\n" for i in HQ_ROWS))
    partition = tmp_path / "list_eval_partition.txt"
    # CelebA files 000101..000112 <- HQ 0..11; HQ 1, 2, 9, 10 are in CelebA's test split.
    partition.write_text("".join(f"{i + 101:06d}.jpg {2 if i in (1, 2, 9, 10) else 0}\n" for i in HQ_ROWS))
    cfg = MaskHQConfig(celebamask_hq, tmp_path / "d", "glasses", mapping=mapping, partition=partition)
    split, _ = prepare_celebamask_hq(cfg)
    assert split.test_a == ["1.jpg", "2.jpg"] and split.test_b == ["10.jpg", "9.jpg"]
    assert not {"1.jpg", "2.jpg", "9.jpg", "10.jpg"} & set(split.train_a + split.train_b)
    with pytest.raises(DataError, match="needs --mapping"):
        prepare_celebamask_hq(MaskHQConfig(celebamask_hq, tmp_path / "e", "glasses", partition=partition))


def test_config_without_a_part_asks_for_parts(celebamask_hq: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="beard has no CelebAMask-HQ part.*--parts"):
        prepare_celebamask_hq(MaskHQConfig(celebamask_hq, tmp_path / "d", "beard"))
