"""The mark of an automatic prediction a model version did not make.

A version whose automatic head (the U-Net decoder) was never trained makes no automatic
prediction (:mod:`modelstore.version_heads`): the worker marks each task's empty result
``<version>/untrained`` (:func:`untrained_version`), the backend answers Label Studio with no
prediction for it and nothing of it is written back; Label Studio stores it apart from the
version's real predictions and asks again once a trained version is current.
"""

from __future__ import annotations

UNTRAINED_SUFFIX = "/untrained"


def untrained_version(version: str) -> str:
    """The model_version of an automatic prediction ``version`` (untrained decoder) did not
    make."""
    return f"{version}{UNTRAINED_SUFFIX}"


def is_untrained(model_version: str | None) -> bool:
    """Whether ``model_version`` marks an automatic prediction that was not made
    (:func:`untrained_version`)."""
    return bool(model_version) and model_version.endswith(UNTRAINED_SUFFIX)
