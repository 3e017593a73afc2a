"""CUDA graphs over fixed-shape packed rows: a whole forward (and backward) replayed as one launch.

At the default 36 texts (~3,000 tokens) per optimizer step, a Qwen3-1.7B step is a few thousand small kernels;
issuing them one by one from Python took ~110 ms on an H200, several times the GPU's own work
(bench/RESULTS.md); replayed as CUDA graphs the step takes ~47 ms. A graph records the kernels once and
replays them with one call. Graphs need fixed shapes, so rows are laid out by `data.collate_packed_static` in a
few widths (steps of 128 tokens for training rows, 512 for evaluation rows) and slot counts (powers of two);
a shape runs eagerly the first time it appears (compiling and warming up for it) and is captured the second
time, so one-off shapes cost no capture.

    graphs = RowGraphs(fn, device)
    out = graphs(inputs)   # inputs: host tensors of a fixed-shape row (+ host ints); out: fn's tensor

`fn(static)` may do only device work: no `.item()`, no host reads, no new shapes. Its output tensor lives in
graph memory and is overwritten by the next replay (of any shape): use it before calling again.

Memory: every graph of the process (training steps and evaluation rows alike: they never run at the same
time) shares one memory pool, and the eager first run of each shape allocates from that pool too, on the same
stream. So the graphs' memory is about the largest graph's, not the sum, and an eager run never holds a second
copy of a row's activations beside the pool (on an H200 the default training run reserved 24.5 GiB for 14.2 GiB
of tensors before this). A failed capture leaves the CUDA random generator unusable for the rest of the process,
so it is not papered over: it raises a UserError that says to run with --cuda_graphs off.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .common import UserError

MAX_GRAPHS = 96  # shapes past this run without a graph (each graph holds a few MB of host-side structures)
_SHARED: dict = {}  # device -> (memory pool, capture stream), shared by every RowGraphs of the process


def shared_pool(device: torch.device):
    """(pool, stream) for captures on `device`: one torch.cuda.MemPool and one side stream per device. The
    caching allocator reuses a freed block only on the stream it was freed on, so eager runs and captures share
    one stream too."""
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device not in _SHARED:
        _SHARED[device] = (torch.cuda.MemPool(), torch.cuda.Stream(device))
    return _SHARED[device]


@contextlib.contextmanager
def in_graph_pool(device):
    """Run the block's GPU work on the graphs' stream with its memory from their pool (shared_pool), ordered
    after and before the current stream's work: a row's eager run (RowGraphs) and train_lora's reservation of
    the pool for the widest row."""
    pool, side = shared_pool(torch.device(device))
    stream = torch.cuda.current_stream(device)
    side.wait_stream(stream)
    with torch.cuda.stream(side), torch.cuda.use_mem_pool(pool):
        yield
    stream.wait_stream(side)


class RowGraphs:
    def __init__(self, fn, device):
        """fn(static inputs) -> tensor: run eagerly the first time a shape appears (which also compiles and makes
        workspaces for it), captured and replayed from its second time on. A shape that appears once (the
        short last row of a file, say) never pays for a capture."""
        self.fn, self.device = fn, torch.device(device)
        self.graphs: dict = {}
        self.seen: set = set()
        self.captures = 0
        self.capture_seconds = 0.0  # host time spent capturing (the log says where start-up time goes)

    @staticmethod
    def key(inputs: dict) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (k, v) for k, v in inputs.items())

    def __call__(self, inputs: dict) -> torch.Tensor:
        key = self.key(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            if key not in self.seen or len(self.graphs) >= MAX_GRAPHS:
                self.seen.add(key)
                return self._eager(inputs)
            entry = self.graphs[key] = self._capture(inputs)
        graph, static, out = entry
        for k, v in inputs.items():
            if torch.is_tensor(v):
                static[k].copy_(v.pin_memory(), non_blocking=True)
        graph.replay()
        return out

    def _eager(self, inputs: dict) -> torch.Tensor:
        """fn on the capture stream with memory from the graphs' pool: what a graph will later use is reused, no
        second copy of a row's activations is made beside the pool."""
        with in_graph_pool(self.device):
            out = self.fn(_to_device(inputs, self.device))
        return out

    def _capture(self, inputs: dict):
        t = time.perf_counter()
        static = _to_device(inputs, self.device)
        pool, side = shared_pool(self.device)
        graph = torch.cuda.CUDAGraph()  # torch.cuda.graph synchronizes first: the static inputs are in place
        try:
            with torch.cuda.graph(graph, pool=pool.id, stream=side):
                out = self.fn(static)
        except RuntimeError as e:
            raise UserError(f"CUDA graph capture failed ({str(e).splitlines()[0][:200]}); run again with "
                            "--cuda_graphs off (plus --resume_from_checkpoint auto to continue a training run)") from e
        # the capture recorded but did not run this row: replay it (the caller's inputs are the static ones)
        graph.replay()
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t
        return graph, static, out


def _to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
