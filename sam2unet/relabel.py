"""A model's label set changed: one output channel per label, the weights of kept labels kept."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import torch
from torch import nn

from sam2unet.checkpoints import LoadedModel

log = logging.getLogger(__name__)

GENERIC_LABEL = "object"


def relabel(loaded: LoadedModel, labels: Iterable[str]) -> LoadedModel:
    """The same model with one output channel per label of ``labels``, in that order.

    Channels of labels the model already has keep their weights; a one-channel model with the
    generic label ``"object"`` hands its channel to the first new label; any other new label's
    channel starts fresh (initialised as a new ``Conv2d``, from a seed of ``labels``, so the
    same change always gives the same weights); channels of labels not in ``labels`` are
    dropped. The model is changed in place. Returns ``loaded`` itself when nothing changes.
    """
    labels = tuple(labels)
    old = tuple(loaded.config.labels)
    if labels == old:
        return loaded
    config = loaded.config.replace(labels=labels)  # validates
    source: dict[int, int] = {}
    for k, name in enumerate(labels):
        if name in old:
            source[k] = old.index(name)
        elif old == (GENERIC_LABEL,) and k == 0 and GENERIC_LABEL not in labels:
            source[k] = 0
    model = loaded.model
    for attr in ("side1", "side2", "head"):
        conv: nn.Conv2d = getattr(model, attr)
        # fresh channels are drawn from a seed of the label set: a round is reproducible
        seed = int.from_bytes(hashlib.sha256("\n".join((attr, *labels)).encode()).digest()[:8])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            new = nn.Conv2d(conv.in_channels, len(labels), kernel_size=1)
        new = new.to(conv.weight.device)
        with torch.no_grad():
            for k, j in source.items():
                new.weight[k].copy_(conv.weight[j])
                new.bias[k].copy_(conv.bias[j])
        setattr(model, attr, new)
    kept = [labels[k] for k in source]
    log.info("relabelled model %s -> %s (weights kept for %s)", list(old), list(labels), kept)
    return LoadedModel(
        model,
        config,
        loaded.base,
        loaded.source_format,
        dict(loaded.metrics),
        None,
        dict(loaded.meta),
    )
