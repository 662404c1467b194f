"""Memory for a streamed decoder layer's float32 arrays, kept from layer to layer (:mod:`paddle_scorer.compute.streamed`)."""

from __future__ import annotations

import numpy as np


class LayerArena:
    """Memory for one decoder layer's float32 arrays, kept from layer to layer: the streamed backend lays out layer i
    in arena ``i % 2``, so layer i + 2 writes over layer i's arrays once nothing uses them (the layer computing now is
    i + 1) and no page is faulted in again (a fresh page costs more than widening into it: an ERNIE-4.5-MoE-shaped
    layer took 4.6 s into fresh memory, 0.9 s into reused, 2 cores). Chunks grow to the largest layer seen."""

    ALIGN = 16  # float32 elements: 64-byte aligned arrays

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.chunk, self.used = 0, 0

    def reset(self) -> None:
        self.chunk, self.used = 0, 0

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape)) if shape else 1
        while self.chunk < len(self.chunks) and self.used + n > self.chunks[self.chunk].size:
            self.chunk, self.used = self.chunk + 1, 0
        if self.chunk == len(self.chunks):
            self.chunks.append(np.empty(max(n, 16 << 20), np.float32))  # at least 64 MB: few chunks per layer
            self.used = 0
        out = self.chunks[self.chunk][self.used:self.used + n].reshape(shape)
        self.used += -(-n // self.ALIGN) * self.ALIGN
        return out
