"""CUDA graphs over fixed-shape packed rows: a whole forward (and backward) replayed as one launch.

At the default 36 texts (~3,000 tokens) per optimizer step, a Qwen3-1.7B step is a few thousand small kernels;
issuing them one by one from Python took ~110 ms on an H200, several times the GPU's own work
(bench/RESULTS.md); replayed as CUDA graphs the step takes ~47 ms. A graph records the kernels once and
replays them with one call. Graphs need fixed shapes, so rows are laid out by `data.collate_packed_static` in a
few widths (steps of 128 tokens for training rows, 512 for evaluation rows) and slot counts (powers of two);
the graph of a shape is captured the first time that shape appears.

    graphs = RowGraphs(fn, device, neutral=...)
    out = graphs(inputs)   # inputs: host tensors of a fixed-shape row (+ host ints); out: fn's tensor

`fn(static)` may do only device work: no `.item()`, no host reads, no new shapes. Its output tensor lives in
graph memory and is overwritten by the next replay (of any shape): use it before calling again. The graphs of
one RowGraphs share one memory pool (they never run at the same time), so its memory is the largest graph's,
not the sum. A failed capture leaves the CUDA random generator unusable for the rest of the process, so it is
not papered over: it raises a UserError that says to run with --cuda_graphs off.
"""
from __future__ import annotations

import torch

from .common import UserError

MAX_GRAPHS = 96  # shapes past this run without a graph (each graph holds a few MB of host-side structures)


class RowGraphs:
    def __init__(self, fn, device, neutral=None):
        """fn(static inputs) -> tensor. `neutral(static)` makes the inputs harmless for the one eager warm-up
        run before a capture (for a training step: zero loss weights, so the gradients gain exactly 0)."""
        self.fn, self.device, self.neutral = fn, torch.device(device), neutral
        self.graphs: dict = {}
        self.captures = 0
        self.pool = None  # the first graph's memory pool, shared by the later ones

    @staticmethod
    def key(inputs: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k, v) for k, v in inputs.items())

    def __call__(self, inputs: dict) -> torch.Tensor:
        key = self.key(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= MAX_GRAPHS:
                return self.fn(_to_device(inputs, self.device))
            entry = self.graphs[key] = self._capture(inputs)
        graph, static, out = entry
        for k, v in inputs.items():
            if torch.is_tensor(v):
                static[k].copy_(v.pin_memory(), non_blocking=True)
        graph.replay()
        return out

    def _capture(self, inputs: dict):
        static = _to_device(inputs, self.device)
        if self.neutral is not None:
            self.neutral(static)
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):  # compiles, autotunes and allocates workspaces outside the capture
            self.fn(static)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.fn(static)
        except RuntimeError as e:
            raise UserError(f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); run again with "
                            "--cuda_graphs off (plus --resume_from_checkpoint auto to continue a training run)") from e
        self.pool = self.pool or graph.pool()
        self.captures += 1
        return graph, static, out


def _to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
