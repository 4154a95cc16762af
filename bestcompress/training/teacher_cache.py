"""Teacher logits computed once per training sample, for data without random coding or augmentation.

With direct (deterministic) encoding the teacher sees the same input for a sample in every epoch, so its logits
are computed once and reused: the teacher's cost falls from once per sample per epoch to once per sample. The
training set is split into fixed chunks of sample indices; the first batch that needs a sample computes its whole
chunk. A sample's logits therefore never depend on the order of the data (a resumed run gets the same values).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from .outputs import mean_logits, two_headed

CHUNK = 256


class TeacherCache:
    """`cache.logits(indices)` -> the teacher's logits for those training-sample indices (on `device`).

    Args:
        teacher: the teacher (eval mode, no gradient).
        data: the DataBundle (its training set, deterministic encoding).
        device: where the teacher runs.
        amp: bf16 autocast (CUDA).
        reset: clears the teacher's stateful neurons after each call (None when it has none).
    """

    def __init__(self, teacher: nn.Module, data, device: torch.device, amp: bool = False, reset=None) -> None:
        self.teacher, self.data, self.device, self.amp, self.reset = teacher, data, device, amp, reset
        self.two_heads = two_headed(teacher)
        self.n = len(data.train)
        self.values: torch.Tensor | None = None  # [N, classes] on the CPU, filled chunk by chunk
        self.done = torch.zeros(-(-self.n // CHUNK), dtype=torch.bool)

    def _fill(self, chunk: int) -> None:
        lo, hi = chunk * CHUNK, min(self.n, (chunk + 1) * CHUNK)
        x = self.data.encode(self.data.train.tensors[0][lo:hi]).to(self.device)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
        with torch.no_grad(), ctx:
            out = mean_logits(self.teacher(x), self.two_heads, self.teacher, hi - lo).float().cpu()
        if self.reset is not None:
            self.reset()
        if self.values is None:
            self.values = torch.empty((self.n, out.shape[1]), dtype=torch.float32)
        self.values[lo:hi] = out
        self.done[chunk] = True

    def logits(self, indices: torch.Tensor) -> torch.Tensor:
        for chunk in torch.unique(indices // CHUNK).tolist():
            if not self.done[chunk]:
                self._fill(chunk)
        return self.values[indices].to(self.device, non_blocking=True)
