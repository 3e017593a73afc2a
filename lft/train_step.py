"""One training step: the loss, the micro-step (eager, or one CUDA graph replay), the optimizer step, and the
per-step flags read one step late.

    stepper = Stepper(model, ddp_model, runtime, optimizer, scheduler, scaler, max_grad_norm, world, pad_id,
                      max_length)
    for micro-batch k of the step:  step_loss += stepper.micro_step(seqs, y, w, last=k == n - 1)
    grad_norm, flags = stepper.optimizer_step(step_loss, stop_requested)

The loss of a step is sum_k w_k * cross-entropy(text k) with w_k = class weight / the step's weight sum, so the
micro-batches of all ranks add up to the mean over the step's texts: exact under accumulation and DDP (DDP
averages gradients over ranks; the loss is multiplied by the world size to undo it).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import data as D
from .runtime import Runtime, autocast


def micro_loss(forward, enc: dict, y, w, amp_dtype, device) -> torch.Tensor:
    """sum_k w_k * cross-entropy(text k); w_k is 0 for the unused slots of a fixed-shape row."""
    with autocast(device, amp_dtype):
        logits = forward(**enc)
    return (F.cross_entropy(logits, y, reduction="none") * w).sum()


class Stepper:
    def __init__(self, model, ddp, rt: Runtime, optimizer, scheduler, scaler, max_grad_norm: float, world: int,
                 pad_id: int, max_length: int):
        self.model, self.ddp, self.rt = model, ddp, rt
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm if max_grad_norm > 0 else 1e30
        self.world, self.pad_id, self.max_length = world, pad_id, max_length
        self.fused = rt.device.type == "cuda"  # fused AdamW skips a non-finite update on the device: no sync
        self.graphs = self._step_graphs() if rt.step_graphs else None

    def micro_step(self, seqs: list[list[int]], y: torch.Tensor, w: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch (one packed row or one padded batch); its loss."""
        if self.graphs is not None:  # one replay of a fixed-shape row
            width, slots = D.static_shape(len(seqs), sum(map(len, seqs)), self.max_length, D.TRAIN_ROW_STEP)
            enc = D.collate_packed_static(seqs, width, slots, self.max_length, self.pad_id)
            enc.update(y=F.pad(y, (0, slots - len(seqs))), w=F.pad(w, (0, slots - len(seqs))))
            return self.graphs(enc)
        enc = D.collate_packed(seqs) if self.rt.packing else D.collate_padded(seqs, self.pad_id)
        enc = D.to_device(enc, self.rt.device)
        y, w = D.to_device({"y": y, "w": w}, self.rt.device).values()
        # DDP all-reduces gradients in the backward of the last micro-batch only
        no_sync = self.ddp.no_sync() if self.ddp is not self.model and not last else contextlib.nullcontext()
        with no_sync:
            loss = micro_loss(self.ddp, enc, y, w, self.rt.amp_dtype, self.rt.device)
            self.scaler.scale(loss * self.world).backward()
        return loss.detach()

    def optimizer_step(self, step_loss: torch.Tensor, stop_requested: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step (skipping a non-finite update), schedule, zero. Returns (grad norm, flags) as device
        tensors; flags = [non-finite loss, non-finite gradients, stop requested], for LaggedFlags."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        bad_grad = ~torch.isfinite(grad_norm)
        if self.rt.use_scaler:
            self.scaler.step(self.optimizer)  # skips the update itself when the scaled gradients overflowed
        elif self.fused:
            self.optimizer.found_inf = bad_grad.float()  # the fused kernel skips the update on the device
            self.optimizer.step()
        elif not bool(bad_grad):
            self.optimizer.step()
        # with a GradScaler, overflowing gradients alone are its business: it skipped the step, lowers the scale
        flags = torch.stack([(~torch.isfinite(step_loss)).float(), bad_grad.float() * (not self.rt.use_scaler),
                             torch.full((), float(stop_requested), device=self.rt.device)])
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=self.graphs is None)  # graphs add into the same gradient tensors
        return grad_norm, flags

    def _step_graphs(self):
        """CUDA graphs of one micro-batch's forward, loss and backward (lft/cuda_graphs.py). The backward adds
        into gradient tensors that exist before any capture, so replays accumulate like eager backward calls."""
        from .cuda_graphs import RowGraphs

        for p in self.trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.scaler.is_enabled():  # its scale tensor exists before any capture: graphs read it, update() sets it
            self.scaler.scale(torch.zeros((), device=self.rt.device))

        def step(s):
            enc = {k: s[k] for k in ("input_ids", "position_ids", "cu_seqlens", "max_len")}
            loss = micro_loss(self.model, enc, s["y"], s["w"], self.rt.amp_dtype, self.rt.device)
            # --fp16: the loss scale is read from the scaler's tensor at each replay, so a scale lowered after an
            # overflow applies to the next step; unscale_ and the overflow check stay outside, as in eager steps
            self.scaler.scale(loss * self.world).backward()
            return loss.detach()

        return RowGraphs(step, self.rt.device)


class LaggedFlags:
    """Per-step flags, all-reduced on the device (so every rank decides alike), read on the host.

    On CUDA they are read one step late: the copy is queued behind step N and read after step N+1 has been
    queued, when the GPU is done with N, so reading never drains the queue and the CPU stays a step ahead.
    On CPU there is no queue to protect: they are read at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending = None

    def push(self, step: int, flags: torch.Tensor):
        """(step, [flags]) of the newest step that can be read without waiting; (None, None) if none."""
        if not self.cuda:
            return step, flags.tolist()
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        ready, self.pending = self.pending, (step, host, event)
        return self._read(ready)

    def flush(self):
        ready, self.pending = self.pending, None
        return self._read(ready)

    @staticmethod
    def _read(entry):
        if entry is None:
            return None, None
        step, host, event = entry
        event.synchronize()
        return step, host.tolist()
