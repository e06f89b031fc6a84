"""Training batches as a pure function of (seed, domain, iteration).

Each domain is walked in a fresh random order every epoch, independently of
the other domain, without replacement inside an epoch (the last partial batch
of an epoch is dropped). Because batch ``i`` depends only on the seed and
``i``, resuming at iteration ``i`` needs no sampler state and gives the same
batches as an uninterrupted run.
"""

from __future__ import annotations

import torch

from mbu.data.images import to_model_range


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for part in key:  # a simple, stable mix of the key's parts into one 63-bit seed
        seed = (seed * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class DomainBatches:
    """Batches of one domain from a uint8 tensor, delivered on ``device`` (default: the images')."""

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        seed: int,
        domain: int,
        flip: bool = True,
        device: torch.device | None = None,
    ):
        if len(images) < batch_size:
            raise ValueError(
                f"domain {'AB'[domain]} has {len(images)} training images, fewer than the batch size {batch_size}"
            )
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.domain = domain
        self.flip = flip
        self.device = images.device if device is None else torch.device(device)
        self.per_epoch = len(images) // batch_size
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def indices(self, iteration: int) -> torch.Tensor:
        epoch, step = divmod(iteration, self.per_epoch)
        if epoch != self._order_epoch:
            self._order = torch.randperm(len(self.images), generator=_generator(self.seed, self.domain, epoch))
            self._order_epoch = epoch
        return self._order[step * self.batch_size : (step + 1) * self.batch_size]

    def batch(self, iteration: int) -> torch.Tensor:
        """(B, 3, S, S) float in [-1, 1] on the batch device, randomly mirrored."""
        index = self.indices(iteration).to(self.images.device)
        batch = to_model_range(self.images.index_select(0, index).to(self.device, non_blocking=True))
        if self.flip:
            mirror = torch.rand(self.batch_size, generator=_generator(self.seed, self.domain, -1, iteration)) < 0.5
            mirror = mirror.to(batch.device)
            batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
        return batch
