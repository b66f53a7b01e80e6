"""Label config parsing: the captured Label Studio configs and the ways a config can be unusable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.errors import BadRequest, LabelConfigError
from labelstudio.labelconfig import Target, parse_label_config

FIXTURES = Path(__file__).parent / "fixtures" / "protocol"

BRUSH = Target(
    from_name="tag",
    to_name="image",
    kind="brush",
    labels=("Foreground", "Background"),
    value_key="image",
    prompt_controls=("kp", "rect"),
)
POLYGON = Target(
    from_name="poly",
    to_name="image",
    kind="polygon",
    labels=("Foreground", "Background"),
    value_key="image",
    prompt_controls=(),
)

# Which target each captured request's config must give (the brush project also has prompts).
EXPECTED_BY_FIXTURE = {
    "post_predict_batch.json": BRUSH,
    "post_predict_batch_polygon.json": POLYGON,
    "post_predict_interactive.json": BRUSH,
    "post_predict_single.json": BRUSH,
    "post_setup.json": BRUSH,
    "post_setup_polygon.json": POLYGON,
    "post_webhook_annotation_created.json": BRUSH,
    "post_webhook_annotation_created_polygon.json": POLYGON,
    "post_webhook_annotation_updated.json": BRUSH,
    "post_webhook_annotations_deleted.json": BRUSH,
    "post_webhook_start_training.json": BRUSH,
    "post_webhook_start_training_polygon.json": POLYGON,
}


def _configs(node: object, path: str = "") -> list[tuple[str, str]]:
    """Every ``label_config`` / ``schema`` string in a captured request, with its JSON path."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("label_config", "schema") and isinstance(value, str):
                found.append((f"{path}.{key}", value))
            else:
                found.extend(_configs(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found.extend(_configs(value, f"{path}[{i}]"))
    return found


def _fixture_configs() -> list[tuple[str, str, str]]:
    cases = []
    for file in sorted(FIXTURES.glob("*.json")):
        body = json.loads(file.read_text())["json"]
        cases.extend((file.name, path, xml) for path, xml in _configs(body))
    return cases


FIXTURE_CONFIGS = _fixture_configs()


def test_every_captured_config_has_an_expectation() -> None:
    files = {name for name, _, _ in FIXTURE_CONFIGS}
    assert files == set(EXPECTED_BY_FIXTURE)


@pytest.mark.parametrize(
    ("name", "path", "xml"), FIXTURE_CONFIGS, ids=[f"{n}{p}" for n, p, _ in FIXTURE_CONFIGS]
)
def test_captured_configs_parse_to_expected_target(name: str, path: str, xml: str) -> None:
    target = parse_label_config(xml)
    assert target == EXPECTED_BY_FIXTURE[name]
    assert target.result_type == {"brush": "brushlabels", "polygon": "polygonlabels"}[target.kind]


def _view(*tags: str) -> str:
    return "<View>" + "".join(tags) + "</View>"


IMAGE = '<Image name="img" value="$image_url"/>'
BRUSH_TAG = (
    '<BrushLabels name="b" toName="img"><Label value="cat"/><Label value="dog"/></BrushLabels>'
)
POLY_TAG = '<PolygonLabels name="p" toName="img"><Label value="tumour"/></PolygonLabels>'


@pytest.mark.parametrize(
    ("xml", "from_name", "expected"),
    [
        (
            _view(IMAGE, BRUSH_TAG),
            None,
            Target("b", "img", "brush", ("cat", "dog"), "image_url"),
        ),
        (
            _view(IMAGE, POLY_TAG),
            None,
            Target("p", "img", "polygon", ("tumour",), "image_url"),
        ),
        (
            _view(IMAGE, BRUSH_TAG, POLY_TAG),
            "p",
            Target("p", "img", "polygon", ("tumour",), "image_url"),
        ),
        (
            _view(IMAGE, BRUSH_TAG, POLY_TAG),
            "b",
            Target("b", "img", "brush", ("cat", "dog"), "image_url"),
        ),
        (
            # Image declared after its control, nested views, a second image for other tools.
            "<View><View>"
            + BRUSH_TAG
            + "</View><View>"
            + IMAGE
            + '<Image name="other" value="$other"/></View>'
            + '<RectangleLabels name="r" toName="img"><Label value="cat"/></RectangleLabels>'
            + '<KeyPointLabels name="k2" toName="other"><Label value="cat"/></KeyPointLabels>'
            + '<KeyPoint name="k" toName="img"/>'
            + '<Choices name="c" toName="img"><Choice value="ok"/></Choices>'
            + "</View>",
            None,
            Target("b", "img", "brush", ("cat", "dog"), "image_url", ("r", "k")),
        ),
    ],
)
def test_parse_synthetic_configs(xml: str, from_name: str | None, expected: Target) -> None:
    assert parse_label_config(xml, from_name) == expected


@pytest.mark.parametrize(
    ("xml", "from_name", "reason"),
    [
        ("not xml at all", None, "not valid XML"),
        ("<View><Image name='img' value='$image'/>", None, "not valid XML"),
        ("", None, "empty"),
        ("   ", None, "empty"),
        (_view(BRUSH_TAG), None, "no Image"),
        (_view(IMAGE), None, "no BrushLabels or PolygonLabels"),
        (
            _view(
                IMAGE, '<RectangleLabels name="r" toName="img"><Label value="a"/></RectangleLabels>'
            ),
            None,
            "no BrushLabels or PolygonLabels",
        ),
        (_view(IMAGE, BRUSH_TAG, POLY_TAG), None, "several segmentation controls (b, p)"),
        (
            _view(IMAGE, BRUSH_TAG, BRUSH_TAG.replace('name="b"', 'name="b2"')),
            None,
            "several segmentation controls (b, b2)",
        ),
        (_view(IMAGE, BRUSH_TAG), "missing", "no BrushLabels or PolygonLabels control named"),
        (_view(IMAGE, '<BrushLabels name="b" toName="img"></BrushLabels>'), None, "no labels"),
        (_view(IMAGE, '<PolygonLabels name="p" toName="img"/>'), None, "no labels"),
        (_view(IMAGE, BRUSH_TAG.replace('toName="img"', 'toName="nope"')), None, "not an Image"),
        (
            _view(IMAGE, '<Image name="i2" value="$x"/>', BRUSH_TAG.replace("img", "img,i2")),
            None,
            "exactly one Image",
        ),
        (
            _view('<Image name="img" value="http://example.org/a.png"/>', BRUSH_TAG),
            None,
            "data variable",
        ),
        (_view('<Image name="img" valueList="$images"/>', BRUSH_TAG), None, "valueList"),
        (
            '<!DOCTYPE v [<!ENTITY e "x">]>' + _view(IMAGE, BRUSH_TAG),
            None,
            "DTD",
        ),
    ],
)
def test_bad_configs(xml: str, from_name: str | None, reason: str) -> None:
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(xml, from_name)
    assert reason in info.value.message
    assert info.value.status == 400
    assert isinstance(info.value, BadRequest)


@pytest.mark.parametrize("value", [None, b"<View/>", 3])
def test_non_string_config(value: object) -> None:
    with pytest.raises(LabelConfigError, match="XML string"):
        parse_label_config(value)  # type: ignore[arg-type]


def test_parsing_is_cached_by_text() -> None:
    xml = _view(IMAGE, BRUSH_TAG, "<!-- cache probe -->")
    first = parse_label_config(xml)
    assert parse_label_config(xml) is first
    assert parse_label_config(xml, "b") == first
    # A different text is parsed anew.
    other = parse_label_config(xml.replace("dog", "bird"))
    assert other.labels == ("cat", "bird")


def test_target_is_frozen() -> None:
    target = parse_label_config(_view(IMAGE, BRUSH_TAG))
    with pytest.raises(AttributeError):
        target.kind = "polygon"  # type: ignore[misc]
    assert hash(target) == hash(Target("b", "img", "brush", ("cat", "dog"), "image_url"))
