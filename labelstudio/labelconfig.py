"""Find what to segment in a Label Studio label config.

A project's label config binds a segmentation control (``BrushLabels`` or ``PolygonLabels``) to an
``Image`` object tag whose ``value`` names the task data key of the image (``$image`` -> ``image``).
The same config arrives with every request, so parsing is cached by the XML text.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.interface import LabelStudioXMLSyntaxErrorSentryIgnored

from contracts.errors import LabelConfigError

logger = logging.getLogger(__name__)

Kind = Literal["brush", "polygon"]

#: Segmentation control tags (lower case) and the kind of result they take.
SEGMENTATION_TAGS: dict[str, Kind] = {"brushlabels": "brush", "polygonlabels": "polygon"}
#: Control tags whose regions can serve as prompts in interactive (smart) labelling.
PROMPT_TAGS: frozenset[str] = frozenset(
    {"keypointlabels", "rectanglelabels", "keypoint", "rectangle"}
)
#: Result ``type`` of each segmentation kind.
RESULT_TYPES: dict[Kind, str] = {"brush": "brushlabels", "polygon": "polygonlabels"}


@dataclass(frozen=True)
class Target:
    """The segmentation control of a label config and the image it is bound to.

    Attributes:
        from_name: name of the BrushLabels / PolygonLabels control (a result's ``from_name``).
        to_name: name of the Image object tag (a result's ``to_name``).
        kind: ``"brush"`` or ``"polygon"``.
        labels: the control's label values, in config order.
        value_key: task data key holding the image URL (``$image`` -> ``"image"``).
        prompt_controls: names of KeyPointLabels / RectangleLabels (or KeyPoint / Rectangle)
            controls bound to the same image, usable as prompts for interactive labelling.
        prompt_labels: ``(prompt label, segmentation label)`` pairs for the prompt controls'
            labels that are not segmentation labels themselves but name one
            (:func:`prompt_label_target`): ``Click: Foreground`` -> ``Foreground``.
    """

    from_name: str
    to_name: str
    kind: Kind
    labels: tuple[str, ...]
    value_key: str
    prompt_controls: tuple[str, ...] = ()
    prompt_labels: tuple[tuple[str, str], ...] = ()

    @property
    def result_type(self) -> str:
        """The ``type`` of this control's result items: ``brushlabels`` or ``polygonlabels``."""
        return RESULT_TYPES[self.kind]


def parse_label_config(xml: str, from_name: str | None = None) -> Target:
    """Parse a label config and return its segmentation target.

    Args:
        xml: the label config XML (``label_config`` of /predict, ``schema`` of /setup).
        from_name: name of the segmentation control to use when the config has several.

    Raises:
        LabelConfigError: not a string, not XML, has a DTD, has no Image tag, no (or no such)
            BrushLabels / PolygonLabels control, several of them and no ``from_name``, a control
            with no labels, or an Image whose value is not a ``$variable``.
    """
    if not isinstance(xml, str):
        raise LabelConfigError(f"label config must be an XML string, got {type(xml).__name__}")
    return _parse_cached(xml, from_name)


@lru_cache(maxsize=64)
def _parse_cached(xml: str, from_name: str | None) -> Target:
    interface = _load(xml)
    images = {o.name: o for o in interface.objects or () if o.tag.lower() == "image"}
    if not images:
        raise LabelConfigError("label config has no Image tag")

    controls = list(interface.controls or ())
    segmentation = [c for c in controls if c.tag.lower() in SEGMENTATION_TAGS]
    if not segmentation:
        raise LabelConfigError("label config has no BrushLabels or PolygonLabels control")
    names = ", ".join(c.name for c in segmentation)
    if from_name is not None:
        chosen = [c for c in segmentation if c.name == from_name]
        if not chosen:
            raise LabelConfigError(
                f"no BrushLabels or PolygonLabels control named {from_name!r} (found: {names})"
            )
        control = chosen[0]
    elif len(segmentation) > 1:
        raise LabelConfigError(
            f"label config has several segmentation controls ({names}); choose one by name"
        )
    else:
        control = segmentation[0]

    if len(control.to_name) != 1:
        raise LabelConfigError(
            f"control {control.name!r} must be bound to exactly one Image, "
            f"toName is {','.join(control.to_name)!r}"
        )
    to_name = control.to_name[0]
    image = images.get(to_name)
    if image is None:
        raise LabelConfigError(f"control {control.name!r} points to {to_name!r}, not an Image tag")
    if image.attr.get("valueList"):
        raise LabelConfigError(
            f"Image {to_name!r} uses valueList; multi-image tasks are not supported"
        )
    if not image.value or not image.value_is_variable:
        raise LabelConfigError(
            f"Image {to_name!r} value must be a task data variable such as $image, "
            f"got {image.value!r}"
        )
    labels = tuple(control.labels or ())
    if not labels:
        raise LabelConfigError(f"control {control.name!r} has no labels")

    prompt_tags = [
        c for c in controls if c.tag.lower() in PROMPT_TAGS and list(c.to_name) == [to_name]
    ]
    prompts = tuple(c.name for c in prompt_tags)
    mapped: dict[str, str] = {}
    for c in prompt_tags:
        for value in c.labels or ():
            if value in labels or value in mapped:
                continue
            named = prompt_label_target(value, labels)
            if named is None:
                logger.warning(
                    "prompt label %r of %r names no label of %r (%s); a mask it prompts gets "
                    "the labels the model predicts. Name it after one, e.g. 'Click: %s'",
                    value,
                    c.name,
                    control.name,
                    ", ".join(labels),
                    labels[0],
                )
            else:
                mapped[value] = named
    target = Target(
        from_name=control.name,
        to_name=to_name,
        kind=SEGMENTATION_TAGS[control.tag.lower()],
        labels=labels,
        value_key=image.value_name,
        prompt_controls=prompts,
        prompt_labels=tuple(mapped.items()),
    )
    logger.debug("parsed label config: %s", target)
    return target


#: What may separate a prompt label's own words from the segmentation label it names.
PROMPT_LABEL_SEPARATORS = (":", "->", "→")


def prompt_label_target(value: str, labels: tuple[str, ...]) -> str | None:
    """The segmentation label a prompt label names, or None.

    A prompt chip must look different from the brush chip it prompts for, so a prompt label
    may carry words of its own before the segmentation label, after a separator
    (:data:`PROMPT_LABEL_SEPARATORS`): ``Click: Foreground``, ``Box: Foreground``,
    ``box -> Foreground`` all name ``Foreground``. The longest segmentation label that ends
    the value after a separator wins (labels may themselves hold a colon). A label equal to a
    segmentation label names itself. (A Label's ``alias`` would do too, but Label Studio 1.23
    then sends no interactive call for the smart tools: see docs/day0.md.)
    """
    if value in labels:
        return value
    for label in sorted(labels, key=len, reverse=True):
        head = value[: len(value) - len(label)]
        if label and value.endswith(label) and head.rstrip().endswith(PROMPT_LABEL_SEPARATORS):
            return label
    return None


def map_prompt_labels(context: Any, target: Target) -> Any:
    """An interactive call's ``context`` with its prompt items' labels replaced by the
    segmentation labels they name (:attr:`Target.prompt_labels`), so that a ``Click:
    Foreground`` keypoint prompts a ``Foreground`` mask. Anything else, malformed items
    included, is passed on unchanged (the worker validates prompts); the input is not
    modified."""
    if not target.prompt_labels or not isinstance(context, dict):
        return context
    items = context.get("result")
    if not isinstance(items, list):
        return context
    names = dict(target.prompt_labels)
    out = []
    for item in items:
        value = item.get("value") if isinstance(item, dict) else None
        key = item.get("type") if isinstance(value, dict) else None
        given = value.get(key) if isinstance(key, str) and key in _PROMPT_VALUE_KEYS else None
        if isinstance(given, list) and any(isinstance(v, str) and v in names for v in given):
            mapped = [names.get(v, v) if isinstance(v, str) else v for v in given]
            value = {**value, key: mapped}
            if isinstance(value.get("labels"), list):
                value["labels"] = [
                    names.get(v, v) if isinstance(v, str) else v for v in value["labels"]
                ]
            item = {**item, "value": value}
        out.append(item)
    return {**context, "result": out}


_PROMPT_VALUE_KEYS = frozenset({"keypointlabels", "rectanglelabels"})


def _load(xml: str) -> LabelInterface:
    """Parse ``xml`` with Label Studio's label interface, mapping its errors to ours."""
    if not xml.strip():
        raise LabelConfigError("label config is empty")
    upper = xml.upper()
    if "<!DOCTYPE" in upper or "<!ENTITY" in upper:
        raise LabelConfigError("label config must not contain a DTD or entities")
    try:
        return LabelInterface(xml)
    except LabelStudioXMLSyntaxErrorSentryIgnored as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise LabelConfigError(f"label config cannot be parsed: {exc}") from None


def target_to_json(target: Target) -> dict[str, Any]:
    """A :class:`Target` as a JSON-ready dict (as job payloads carry it)."""
    return asdict(target)


def target_from_json(d: dict[str, Any]) -> Target:
    """The :class:`Target` of :func:`target_to_json`'s dict."""
    d = dict(d)
    d["labels"] = tuple(d.get("labels") or ())
    d["prompt_controls"] = tuple(d.get("prompt_controls") or ())
    d["prompt_labels"] = tuple(tuple(pair) for pair in d.get("prompt_labels") or ())
    return Target(**d)
