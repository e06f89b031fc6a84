"""The whole training step captured once as a CUDA graph, then replayed.

A training step at these sizes is bound by the time the host takes to launch
its few hundred small kernels, not by the GPU's arithmetic. A CUDA graph
records the step's kernels once (both forward and backward passes, gradient
clipping, the two fused Adam updates, BatchNorm statistics) and launches them
all with one call per iteration.

What a graph asks of the step, and how it is met here:

- fixed input addresses: each batch is copied into static buffers before a replay;
- no host synchronisation inside: Adam runs with ``capturable=True`` (its step
  counter stays on the GPU), gradient clipping is the foreach kernel, and the
  losses come back as device tensors that the loop sums without reading them;
- optimizer state that exists before capture: the first :data:`WARMUP_STEPS`
  iterations run eagerly (on a side stream, as PyTorch's graph documentation
  asks), then the step is captured and every later iteration is a replay.

The eager iterations and the replays compute the same step; a checkpoint of a
captured run loads into an eager one and the other way round (the optimizers'
``capturable`` option is not taken from the checkpoint).

:func:`make_step` chooses, for a run's settings, between this step and the eager one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mbu.train.config import TrainConfig
from mbu.train.losses import LossWeights
from mbu.train.model import ContentTransferModel
from mbu.train.step import LossFunctions, Optimizers, train_step

WARMUP_STEPS = 3  # eager iterations before capture: Adam's state and cuDNN's algorithm choices settle


class CapturedStep:
    """``(a, b) -> losses`` like :func:`~mbu.train.step.train_step`, replaying one CUDA graph after warm-up.

    The returned loss tensors are the graph's static outputs: read or combine them
    (on the current stream) before the next call overwrites them.
    """

    def __init__(
        self,
        model: ContentTransferModel,
        optimizers: Optimizers,
        weights: LossWeights,
        bf16: bool = False,
        disc_clip: float = 0.0,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.weights = weights
        self.bf16 = bf16
        self.disc_clip = disc_clip
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_a: torch.Tensor | None = None
        self.static_b: torch.Tensor | None = None
        self.outputs: tuple | None = None

    def _eager(self, a: torch.Tensor, b: torch.Tensor, capturing: bool = False) -> tuple:
        return train_step(
            self.model, self.optimizers, a, b, self.weights, self.bf16, disc_clip=self.disc_clip, capturing=capturing
        )

    def _warm_up(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
        side = torch.cuda.Stream(device=a.device)
        side.wait_stream(torch.cuda.current_stream(a.device))
        with torch.cuda.stream(side):
            total, terms, disc = self._eager(a, b)
        current = torch.cuda.current_stream(a.device)
        current.wait_stream(side)
        # Made on the side stream, read on this one: their memory must not be reused before that read.
        for tensor in (total, disc, *terms.values()):
            tensor.record_stream(current)
        return total, terms, disc

    def _capture(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.static_a, self.static_b = a.clone(), b.clone()
        # Gradients are allocated inside the graph's memory pool, so every replay writes the same ones.
        self.optimizers.autoencoder.zero_grad(set_to_none=True)
        self.optimizers.disc.zero_grad(set_to_none=True)
        torch.cuda.synchronize(a.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._eager(self.static_a, self.static_b, capturing=True)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple:
        self.calls += 1
        if self.calls <= WARMUP_STEPS:
            return self._warm_up(a, b)
        if self.graph is None:
            self._capture(a, b)  # records this iteration's step without running it; the replay below runs it
        else:
            self.static_a.copy_(a)
            self.static_b.copy_(b)
        self.graph.replay()
        return self.outputs


StepFunction = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]"]


def make_step(model: ContentTransferModel, optimizers: Optimizers, cfg: TrainConfig) -> StepFunction:
    """``(a, b) -> losses``: :func:`train_step` with ``cfg``'s settings, eager or as a captured CUDA graph."""
    if cfg.cuda_graph:
        return CapturedStep(model, optimizers, cfg.weights, cfg.amp == "bf16", cfg.disc_clip)
    losses = LossFunctions.create(cfg.compile)
    bf16 = cfg.amp == "bf16"
    return lambda a, b: train_step(model, optimizers, a, b, cfg.weights, bf16, losses, cfg.disc_clip)
