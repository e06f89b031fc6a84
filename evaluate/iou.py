"""IoU at every threshold of a grid, in one pass over the masks.

A pixel is predicted positive at threshold ``t`` when its soft mask value is
``>= t``. Each value is bucketed once by how many grid thresholds it reaches;
suffix sums of the bucket histograms then give, for every threshold at once,
the predicted-positive and true-positive counts. Cost: O(pixels + thresholds)
per image instead of O(pixels x thresholds).

Convention: an image whose prediction and truth are both empty scores IoU 1
(nothing to find, nothing found). It is used everywhere, per image and for a
data set whose union is empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY_IOU = 1.0  # IoU when prediction and truth are both empty


def threshold_grid(step: float = 0.01) -> torch.Tensor:
    """0.00, 0.01, ..., 1.00 (float32, the dtype of the masks it is compared with)."""
    count = round(1 / step)
    return torch.linspace(0, 1, count + 1, dtype=torch.float64).to(torch.float32)


def safe_iou(intersection: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    inter, union = intersection.double(), union.double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(union, EMPTY_IOU))


@dataclass
class SweepCounts:
    """Pixel counts per threshold: data-set totals (K,) and per image (N, K)."""

    thresholds: torch.Tensor  # (K,)
    intersection: torch.Tensor  # (N, K) int64
    predicted: torch.Tensor  # (N, K) int64: pixels >= threshold
    truth: torch.Tensor  # (N,) int64: ground-truth pixels
    pixels: torch.Tensor  # (N,) int64: pixels per image

    @property
    def union(self) -> torch.Tensor:
        return self.predicted + self.truth[:, None] - self.intersection

    def dataset_iou(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) sum of intersections over sum of unions, over ``rows`` (default all)."""
        inter, union = self.intersection, self.union
        if rows is not None:
            inter, union = inter[rows], union[rows]
        return safe_iou(inter.sum(0), union.sum(0))

    def per_image_iou(self) -> torch.Tensor:
        """(N, K) IoU of each image at each threshold."""
        return safe_iou(self.intersection, self.union)


class IoUSweep:
    """Streams batches of (soft mask, truth); memory grows with images x thresholds only."""

    def __init__(self, thresholds: torch.Tensor | None = None) -> None:
        self.thresholds = threshold_grid() if thresholds is None else thresholds
        if self.thresholds.ndim != 1 or not bool((self.thresholds[1:] > self.thresholds[:-1]).all()):
            raise ValueError("thresholds must be a strictly increasing 1-D tensor")
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def update(self, probs: torch.Tensor, truth: torch.Tensor) -> None:
        """probs: (N, ...) soft masks; truth: (N, ...) boolean masks of the same shape."""
        if probs.shape != truth.shape:
            raise ValueError(f"mask shapes differ: predicted {tuple(probs.shape)}, truth {tuple(truth.shape)}")
        if torch.isnan(probs).any():
            raise ValueError("predicted masks contain NaN")
        n, k = probs.shape[0], len(self.thresholds)
        probs, truth = probs.reshape(n, -1), truth.reshape(n, -1).bool()
        thresholds = self.thresholds.to(device=probs.device, dtype=probs.dtype)
        # bucket[i] = number of thresholds <= value: positive at threshold j iff j < bucket.
        bucket = torch.bucketize(probs, thresholds, right=True)
        flat = (bucket + (k + 1) * torch.arange(n, device=probs.device)[:, None]).flatten()
        hist_all = torch.bincount(flat, minlength=n * (k + 1)).view(n, k + 1)
        hist_true = torch.bincount(flat[truth.flatten()], minlength=n * (k + 1)).view(n, k + 1)
        # Suffix sums: count of pixels whose bucket exceeds j, for j = 0..K-1.
        predicted = hist_all.flip(1).cumsum(1).flip(1)[:, 1:]
        intersection = hist_true.flip(1).cumsum(1).flip(1)[:, 1:]
        pixels = torch.full((n,), probs.shape[1], dtype=torch.int64)
        self._rows.append((intersection.cpu(), predicted.cpu(), truth.sum(1).cpu(), pixels))

    def compute(self) -> SweepCounts:
        if not self._rows:
            raise ValueError("no masks were given to the IoU sweep")
        inter, pred, truth, pixels = (torch.cat(parts) for parts in zip(*self._rows, strict=True))
        return SweepCounts(self.thresholds.cpu(), inter, pred, truth, pixels)


def sweep(probs: torch.Tensor, truth: torch.Tensor, thresholds: torch.Tensor | None = None) -> SweepCounts:
    """One-call form of :class:`IoUSweep` for masks already in memory."""
    s = IoUSweep(thresholds)
    s.update(probs, truth)
    return s.compute()
