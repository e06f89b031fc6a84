"""A two-domain benchmark with exact ground-truth masks, made with no download.

Domain B: procedural face-like images (background, head shape, skin tone,
hair, eyes, brows, nose, mouth all randomised). Domain A: the same
distribution with eyeglasses drawn on top (lens shape, rim colour and
thickness, lens size, tint and position vary per image). The mask of an A
image is exactly the set of pixels where it differs from its content-free
rendering, so segmentation can be scored against the truth.

Every image is a pure function of ``(seed, split, domain, index)``: the data
set is deterministic for a seed and an image does not depend on how many
others are drawn.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mbu.data.files import check_destination

SPLITS = ("train", "test")
DOMAINS = ("A", "B")
SUPPORTED_SIZES = (64, 128)
SPEC_FILE = "synthetic.json"
PARTIAL_FILE = "synthetic.partial.json"  # the spec being written; removed once SPEC_FILE is


@dataclass(frozen=True)
class SynthConfig:
    size: int = 64  # image side in pixels (64 or 128)
    n_train: int = 2000  # training images per domain
    n_test: int = 200  # test images per domain (every test A image has a mask)
    seed: int = 0  # one seed fixes every image

    def __post_init__(self) -> None:
        if self.size not in SUPPORTED_SIZES:
            raise ValueError(f"synthetic size must be one of {SUPPORTED_SIZES}, got {self.size}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")


@dataclass(frozen=True)
class Face:
    """Where the glasses go: eye centres and the head's horizontal extent, in pixels."""

    left_eye: tuple[float, float]
    right_eye: tuple[float, float]
    eye_gap: float  # half the distance between the eyes
    head_left: float
    head_right: float


def _rng(cfg: SynthConfig, split: str, domain: str, index: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, SPLITS.index(split), DOMAINS.index(domain), index])


def _color(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(low, high, size=3))


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    light, dark = np.array([245, 215, 190]), np.array([95, 60, 40])
    t = rng.uniform()
    tone = light * (1 - t) + dark * t + rng.normal(0, 6, size=3)
    return tuple(int(v) for v in np.clip(tone, 0, 255))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random colour with a gentle linear gradient in a random direction."""
    c0 = np.array(_color(rng), dtype=np.float64)
    c1 = np.clip(c0 + rng.normal(0, 25, size=3), 0, 255)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(angle) * (xs - 0.5) + np.sin(angle) * (ys - 0.5)) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8), "RGB")


def render_face(rng: np.random.Generator, size: int) -> tuple[Image.Image, Face]:
    """A content-free face and where glasses would sit on it."""
    s = float(size)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    cx, cy = s * rng.uniform(0.44, 0.56), s * rng.uniform(0.5, 0.6)
    rx, ry = s * rng.uniform(0.26, 0.34), s * rng.uniform(0.34, 0.42)
    skin, hair = _skin(rng), _color(rng, 0, 200)

    # Hair behind the head, then the head, then a fringe over the forehead.
    hair_rx, hair_ry = rx * rng.uniform(1.05, 1.25), ry * rng.uniform(0.75, 1.0)
    hair_cy = cy - ry * rng.uniform(0.2, 0.4)
    draw.ellipse([cx - hair_rx, hair_cy - hair_ry, cx + hair_rx, hair_cy + hair_ry], fill=hair)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=skin)
    fringe = rng.uniform(0.15, 0.45)
    draw.chord([cx - rx, cy - ry, cx + rx, cy - ry + 2 * ry * fringe * 2], 180, 360, fill=hair)

    # Eyes, brows, nose, mouth.
    eye_y = cy - ry * rng.uniform(0.02, 0.14)
    eye_gap = rx * rng.uniform(0.36, 0.5)
    eye_r = s * rng.uniform(0.022, 0.036)
    iris = _color(rng, 0, 140)
    for ex in (cx - eye_gap, cx + eye_gap):
        draw.ellipse([ex - eye_r * 1.5, eye_y - eye_r, ex + eye_r * 1.5, eye_y + eye_r], fill=(250, 250, 250))
        draw.ellipse([ex - eye_r * 0.7, eye_y - eye_r * 0.7, ex + eye_r * 0.7, eye_y + eye_r * 0.7], fill=iris)
        brow_y = eye_y - eye_r * rng.uniform(2.2, 3.2)
        draw.line([ex - eye_r * 1.8, brow_y, ex + eye_r * 1.8, brow_y], fill=hair, width=max(1, size // 40))
    nose_y = cy + ry * rng.uniform(0.1, 0.22)
    shade = tuple(max(0, c - 40) for c in skin)
    draw.line([cx, eye_y + eye_r, cx - s * 0.02, nose_y, cx + s * 0.015, nose_y], fill=shade, width=max(1, size // 64))
    mouth_y, mouth_w = cy + ry * rng.uniform(0.4, 0.55), rx * rng.uniform(0.3, 0.55)
    mouth_h = ry * rng.uniform(0.04, 0.15)
    lips = (int(rng.integers(150, 230)), int(rng.integers(30, 90)), int(rng.integers(40, 100)))
    draw.chord([cx - mouth_w, mouth_y - mouth_h, cx + mouth_w, mouth_y + mouth_h], 0, 180, fill=lips)

    face = Face((cx - eye_gap, eye_y), (cx + eye_gap, eye_y), eye_gap, cx - rx, cx + rx)
    return image, face


def draw_glasses(face_image: Image.Image, face: Face, rng: np.random.Generator) -> Image.Image:
    """The face with eyeglasses: varied lens shape, size, tint, rim colour and thickness."""
    size = face_image.width
    half_w = face.eye_gap * rng.uniform(0.6, 0.9)
    half_h = half_w * rng.uniform(0.55, 1.0)
    dy = size * rng.uniform(-0.02, 0.03)
    rim_width = max(1, round(size * rng.uniform(0.02, 0.05)))
    rim = _color(rng, 0, 256) if rng.uniform() < 0.4 else _color(rng, 0, 70)
    shape = rng.choice(["ellipse", "rectangle", "rounded"])
    tinted = rng.uniform() < 0.75

    lenses = Image.new("L", face_image.size)  # lens interiors, for the tint
    frame = Image.new("L", face_image.size)  # rims, bridge, temples
    lens_draw, frame_draw = ImageDraw.Draw(lenses), ImageDraw.Draw(frame)
    boxes = []
    for ex, ey in (face.left_eye, face.right_eye):
        box = [ex - half_w, ey + dy - half_h, ex + half_w, ey + dy + half_h]
        boxes.append(box)
        if shape == "ellipse":
            lens_draw.ellipse(box, fill=255)
            frame_draw.ellipse(box, outline=255, width=rim_width)
        elif shape == "rectangle":
            lens_draw.rectangle(box, fill=255)
            frame_draw.rectangle(box, outline=255, width=rim_width)
        else:
            radius = half_h * 0.6
            lens_draw.rounded_rectangle(box, radius=radius, fill=255)
            frame_draw.rounded_rectangle(box, radius=radius, outline=255, width=rim_width)
    bridge_y = face.left_eye[1] + dy - half_h * rng.uniform(0.0, 0.5)
    frame_draw.line([boxes[0][2], bridge_y, boxes[1][0], bridge_y], fill=255, width=rim_width)
    temple_y = face.left_eye[1] + dy - half_h * 0.3
    frame_draw.line([face.head_left, temple_y, boxes[0][0], temple_y], fill=255, width=rim_width)
    frame_draw.line([boxes[1][2], temple_y, face.head_right, temple_y], fill=255, width=rim_width)

    out = np.asarray(face_image, dtype=np.float32).copy()
    if tinted:
        tint = np.array(_color(rng, 0, 90), dtype=np.float32)
        alpha = rng.uniform(0.6, 0.95)
        inside = np.asarray(lenses) > 0
        out[inside] = out[inside] * (1 - alpha) + tint * alpha
    out[np.asarray(frame) > 0] = rim
    return Image.fromarray(np.round(out).astype(np.uint8), "RGB")


def content_mask(image: Image.Image, content_free: Image.Image) -> np.ndarray:
    """Boolean (H, W): the pixels where ``image`` differs from its content-free rendering."""
    return np.any(np.asarray(image) != np.asarray(content_free), axis=-1)


def render(cfg: SynthConfig, split: str, domain: str, index: int) -> tuple[Image.Image, Image.Image]:
    """One image and its content-free rendering (the same image for domain B)."""
    rng = _rng(cfg, split, domain, index)
    face_image, face = render_face(rng, cfg.size)
    if domain == "B":
        return face_image, face_image
    return draw_glasses(face_image, face, rng), face_image


def image_name(index: int) -> str:
    return f"{index:06d}.png"


def write_dataset(cfg: SynthConfig, out: Path, progress: bool = True) -> Path:
    """Write ``trainA/ trainB/ testA/ testB/ testA_masks/`` under ``out``.

    A folder already holding the same spec is reused as it is; a folder
    holding another spec, or files that this function did not write, is an error
    rather than a silent mix of two data sets. An interrupted write (its
    ``PARTIAL_FILE`` left behind) is finished by the next call with the same spec.
    """
    out = Path(out)
    spec_path = out / SPEC_FILE
    if spec_path.exists():
        existing = json.loads(spec_path.read_text())
        if existing == asdict(cfg):
            return out
        raise FileExistsError(
            f"{out} holds a synthetic data set with spec {existing}, not {asdict(cfg)}; "
            "choose another folder or delete it"
        )
    check_destination(out, PARTIAL_FILE, asdict(cfg))
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL_FILE).write_text(json.dumps(asdict(cfg)) + "\n")
    jobs = [(split, domain) for split in SPLITS for domain in DOMAINS]
    total = sum(cfg.n_train if split == "train" else cfg.n_test for split, _ in jobs)
    with tqdm(total=total, desc=f"synthetic data {cfg.size}px", disable=not progress, unit="img") as bar:
        for split, domain in jobs:
            folder = out / f"{split}{domain}"
            folder.mkdir(parents=True, exist_ok=True)
            masks = out / "testA_masks" if (split, domain) == ("test", "A") else None
            if masks is not None:
                masks.mkdir(exist_ok=True)
            for index in range(cfg.n_train if split == "train" else cfg.n_test):
                image, content_free = render(cfg, split, domain, index)
                image.save(folder / image_name(index))
                if masks is not None:
                    mask = content_mask(image, content_free)
                    Image.fromarray(mask.astype(np.uint8) * 255, "L").save(masks / image_name(index))
                bar.update()
    # Written last: its presence means the folder is complete.
    spec_path.write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    (out / PARTIAL_FILE).unlink()
    return out
