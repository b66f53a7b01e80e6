"""Label config parsing: the captured Label Studio configs and the ways a config can be unusable."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import BadRequest, LabelConfigError
from labelstudio.labelconfig import (
    Target,
    map_prompt_labels,
    parse_label_config,
    prompt_label_target,
    target_from_json,
    target_to_json,
)
from tests.support.protocol import FIXTURES

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


# --------------------------------------------------------------------------- prompt chips

#: The docs' config: the chips say what they are; the prompts name the brush label they prompt.
NAMED = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Foreground"/><Label value="Background"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Click: Foreground"/><Label value="Click: Background"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true">
    <Label value="Box: Foreground"/><Label value="Box -> Background"/>
  </RectangleLabels>
</View>"""


def test_prompt_labels_name_the_brush_label_they_prompt() -> None:
    target = parse_label_config(NAMED)
    assert target.labels == ("Foreground", "Background")
    assert dict(target.prompt_labels) == {
        "Click: Foreground": "Foreground",
        "Click: Background": "Background",
        "Box: Foreground": "Foreground",
        "Box -> Background": "Background",
    }
    assert target_from_json(json.loads(json.dumps(target_to_json(target)))) == target


@pytest.mark.parametrize(
    ("value", "labels", "named"),
    [
        ("Foreground", ("Foreground",), "Foreground"),
        ("Click: Foreground", ("Foreground",), "Foreground"),
        ("Click:Foreground", ("Foreground",), "Foreground"),
        ("point → cat", ("cat", "dog"), "cat"),
        ("Click: a: b", ("b", "a: b"), "a: b"),  # the longest label that ends the value
        ("ClickForeground", ("Foreground",), None),
        ("Click: Foreground!", ("Foreground",), None),
        ("Click: Fore", ("Foreground",), None),
    ],
)
def test_prompt_label_target(value: str, labels: tuple[str, ...], named: str | None) -> None:
    assert prompt_label_target(value, labels) == named


def test_a_prompt_label_naming_nothing_is_logged(caplog) -> None:
    xml = NAMED.replace("Click: Background", "Click here")
    with caplog.at_level("WARNING", logger="labelstudio.labelconfig"):
        target = parse_label_config(xml)
    assert "Click here" not in dict(target.prompt_labels)
    assert any("'Click here'" in r.getMessage() for r in caplog.records)


def test_map_prompt_labels_renames_only_prompt_labels() -> None:
    target = parse_label_config(NAMED)
    ctx = {
        "result": [
            {
                "type": "keypointlabels",
                "value": {
                    "x": 1,
                    "y": 2,
                    "keypointlabels": ["Click: Background"],
                    "labels": ["Click: Background"],
                },
            },
            {
                "type": "rectanglelabels",
                "value": {
                    "x": 1,
                    "y": 2,
                    "width": 3,
                    "height": 4,
                    "rectanglelabels": ["Box: Foreground"],
                },
            },
            {"type": "choices", "value": {"choices": ["Click: Foreground"]}},
            "junk",
        ],
        "other": 1,
    }
    before = json.loads(json.dumps(ctx))
    out = map_prompt_labels(ctx, target)
    assert ctx == before  # not modified
    assert out["result"][0]["value"]["keypointlabels"] == ["Background"]
    assert out["result"][0]["value"]["labels"] == ["Background"]
    assert out["result"][1]["value"]["rectanglelabels"] == ["Foreground"]
    assert out["result"][2:] == ctx["result"][2:] and out["other"] == 1


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(
        [
            "keypointlabels",
            "rectanglelabels",
            "value",
            "Click: Foreground",
            "Box -> Background",
            "x",
        ]
    ),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["type", "value", "keypointlabels", "rectanglelabels", "labels", "result", "x"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def _renamed(before: object, after: object, names: dict[str, str]) -> bool:
    """Whether ``after`` is ``before`` with some strings renamed by ``names``."""
    if isinstance(before, dict):
        return (
            isinstance(after, dict)
            and before.keys() == after.keys()
            and all(_renamed(before[k], after[k], names) for k in before)
        )
    if isinstance(before, list):
        return (
            isinstance(after, list)
            and len(before) == len(after)
            and all(_renamed(b, a, names) for b, a in zip(before, after, strict=True))
        )
    return after == before or (isinstance(before, str) and after == names.get(before))


@given(ctx=_json | st.fixed_dictionaries({"result": st.lists(_json, max_size=5)}))
def test_map_prompt_labels_never_fails_and_only_renames(ctx: object) -> None:
    """Any JSON an interactive call may carry: no exception, the input untouched, the output
    the input with only prompt labels renamed to the segmentation labels they name."""
    target = parse_label_config(NAMED)
    before = json.loads(json.dumps(ctx))
    out = map_prompt_labels(ctx, target)
    assert ctx == before
    assert _renamed(before, out, dict(target.prompt_labels))


def test_a_named_prompt_gets_the_label_it_names_from_sams_head(tmp_path) -> None:
    """Through the worker's pipeline with SAM2's head (official-format test checkpoint): a
    ``Click: Background`` keypoint, as the backend passes it on, brings a ``Background`` mask,
    not a mask of the first label the model predicts."""
    from contracts.jobs import PredictItem, PredictPayload
    from sam2unet.random_weights import write_random_sam2_checkpoint
    from tests.support.services import png_bytes
    from tests.worker.test_pipeline import image, kp, make_runtime
    from worker.pipeline import run_predict

    write_random_sam2_checkpoint(tmp_path / "base" / "sam2.1_hiera_test.pt", "test")
    runtime = make_runtime(tmp_path, "test")
    target = parse_label_config(NAMED)
    img = image(75, 101, seed=21)
    data = png_bytes(img)
    click = kp(40.0, 45.0)
    click["value"]["keypointlabels"] = ["Click: Background"]
    click.update(original_width=101, original_height=75)
    payload = PredictPayload(
        items=(PredictItem(0, "img.png", 1),),
        target=target_to_json(target),
        reply_key=None,
        context=map_prompt_labels({"result": [click]}, target),  # as the backend enqueues it
    )
    (res,) = run_predict(payload, runtime, lambda *_: data, None)
    assert res.error is None and res.result
    assert {tuple(item["value"]["brushlabels"]) for item in res.result} == {("Background",)}
