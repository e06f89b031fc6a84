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
_NEAR_GRID = 1e-3  # scaled values this close to a grid point are bucketed by binary search
_CHUNK_PIXELS = 2**20  # pixels histogrammed at a time: fits in cache, and row offsets stay below 2**24


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
        self.thresholds = threshold_grid() if thresholds is None else thresholds.cpu()  # masks may be anywhere
        if self.thresholds.ndim != 1 or not bool((self.thresholds[1:] > self.thresholds[:-1]).all()):
            raise ValueError("thresholds must be a strictly increasing 1-D tensor")
        self._rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        steps = len(self.thresholds) - 1
        uniform = steps >= 1 and torch.equal(self.thresholds, threshold_grid(1 / steps))
        self._steps = steps if uniform else None  # the fast bucketing path needs the 0..1 grid

    def update(self, probs: torch.Tensor, truth: torch.Tensor) -> None:
        """probs: (N, ...) soft masks; truth: (N, ...) boolean masks of the same shape."""
        if probs.shape != truth.shape:
            raise ValueError(f"mask shapes differ: predicted {tuple(probs.shape)}, truth {tuple(truth.shape)}")
        n = probs.shape[0]
        probs, truth = probs.reshape(n, -1), truth.reshape(n, -1).bool()
        # Cache-sized row chunks: the work is a few passes over memory, so locality is speed.
        rows = max(1, _CHUNK_PIXELS // max(1, probs.shape[1]))
        hist = torch.cat([self._histogram(probs[i : i + rows], truth[i : i + rows]) for i in range(0, n, rows)])
        # Suffix sums: count of pixels whose bucket exceeds j, for j = 0..K-1.
        above = hist.flip(2).cumsum(2).flip(2)[:, :, 1:]
        predicted, intersection = above.sum(1), above[:, 1]
        true_pixels = hist[:, 1].sum(1)
        pixels = torch.full((n,), probs.shape[1], dtype=torch.int64)
        self._rows.append((intersection.cpu(), predicted.cpu(), true_pixels.cpu(), pixels))

    def _histogram(self, probs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """(N, 2, K + 1) pixel counts by (image, truth, bucket).

        A value's bucket is the number of thresholds <= it: positive at threshold
        j iff j < bucket. On the uniform 0..1 grid with values in [0, 1] the
        bucket is ``floor(v * steps) + 1``, exact except within float error of a
        grid point, where the few values concerned go through a binary search.
        """
        if torch.isnan(probs).any():
            raise ValueError("predicted masks contain NaN")
        n, k = probs.shape[0], len(self.thresholds)
        bins = 2 * (k + 1)
        thresholds = self.thresholds.to(device=probs.device, dtype=probs.dtype)
        row_offset = torch.arange(n, device=probs.device)[:, None] * bins
        if self._steps is None or probs.min() < 0 or probs.max() > 1:
            bucket = torch.bucketize(probs, thresholds, right=True)
            index = (bucket + row_offset + truth * (k + 1)).flatten()
        else:
            scaled = probs.float() * self._steps
            frac = scaled.frac()
            near = frac < _NEAR_GRID
            near.logical_or_(frac > 1 - _NEAR_GRID)
            # Float arithmetic is exact here: every index is an integer below 2**24.
            index = scaled.floor_().add_(1).add_(row_offset.to(scaled.dtype)).add_(truth, alpha=k + 1)
            index = index.to(torch.int32).flatten()
            at = near.flatten().nonzero().squeeze(1)
            values = probs.flatten()[at]
            approx = (values.float() * self._steps).floor_().add_(1).to(torch.int32)
            index.index_add_(0, at, torch.bucketize(values, thresholds, right=True).to(torch.int32) - approx)
        return torch.bincount(index, minlength=n * bins).view(n, 2, k + 1)

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
