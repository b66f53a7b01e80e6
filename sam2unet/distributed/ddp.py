"""The model's side of a data-parallel run: BatchNorm that normalises over the global batch
(``torch.nn.SyncBatchNorm`` on GPUs, :class:`GlobalBatchNorm2d` on CPUs) and the DDP wrapper
over the trainable part of the model."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sam2unet.distributed.collectives import is_active


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; its gradient is the sum of the ranks' gradients (the same as
    ``torch.distributed.nn.functional.all_reduce``, which torch 2.13 deprecates)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks,
    for gloo (CPU) process groups, where ``torch.nn.SyncBatchNorm`` does not run.

    Mean and (biased) variance come from two differentiable all-reduces (the backward of a
    sum over ranks all-reduces the gradient, as in ``torch.nn.SyncBatchNorm``), so
    forward and backward equal one process's BatchNorm over the whole batch; the running
    statistics are updated as ``F.batch_norm`` does (unbiased variance). State-dict keys are
    BatchNorm2d's. Outside training or in a single process it is a plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_active()):
            return super().forward(x)
        c = x.shape[1]
        dims = (0, 2, 3)
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        total = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        n = total[c]
        mean = total[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = _AllReduceSum.apply((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var.detach() * (n / (n - 1) if n > 1 else 1.0)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with its BatchNorm layers normalising over the global batch: SyncBatchNorm on
    CUDA, :class:`GlobalBatchNorm2d` elsewhere. Parameters and buffers are kept (same objects),
    so an optimizer or a state dict made before still matches."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(
                child.num_features,
                child.eps,
                child.momentum,
                child.affine,
                child.track_running_stats,
            )
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean = child.running_mean
                new.running_var = child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.parallel.DistributedDataParallel:
    """DDP over the trainable part of ``model``: frozen parameters are named in DDP's ignore
    list (not broadcast at start; DDP never buckets ``requires_grad=False`` parameters anyway).
    The model has no unused trainable parameters, so ``find_unused_parameters`` stays off;
    buffers are not re-broadcast before each forward (synchronised BatchNorm keeps them equal).
    """
    ddp = nn.parallel.DistributedDataParallel
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    ddp._set_params_and_buffers_to_ignore_for_model(model, frozen)
    # torch 2.13 renamed broadcast_buffers (still accepted, with a warning)
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    device_ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=device_ids, **no_sync)
