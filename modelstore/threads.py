"""torch's CPU threads in a process that runs the model (a worker, the trainer)."""

from __future__ import annotations

from contracts.settings import Settings


def apply_torch_threads(settings: Settings) -> None:
    """Limit torch's CPU threads when configured (``SAM2UNET_TORCH_THREADS``; several processes
    sharing few cores run much faster with one thread each than with spinning thread pools)."""
    if settings.torch_threads > 0:
        # torch: only when configured; the trainer loads it later, in its rounds
        import torch

        torch.set_num_threads(settings.torch_threads)
