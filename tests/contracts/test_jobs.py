"""Job payloads and the reply handoff between a finished job and its waiting request."""

from __future__ import annotations

import pytest

from contracts.errors import BadRequest
from contracts.jobs import (
    ItemResult,
    PredictItem,
    PredictPayload,
    close_request,
    decode_reply,
    deliver_reply,
    encode_reply,
    new_reply_key,
)


def test_payload_round_trips_through_json_and_carries_its_version():
    p = PredictPayload(
        items=(PredictItem(0, "/data/upload/1/a.png", 7),),
        target={"from_name": "tag"},
        reply_key=new_reply_key(),
        write_back=True,
        run_id="r1",
    )
    d = p.to_json()
    assert d["v"] == 1 and d["items"][0] == {
        "index": 0,
        "url": "/data/upload/1/a.png",
        "task_id": 7,
    }
    assert PredictPayload.from_json(d) == p
    with pytest.raises(BadRequest):
        PredictPayload.from_json({**d, "v": 99})


def test_a_reply_before_the_request_gives_up_is_answered(redis_conn):
    key = new_reply_key()
    msg = encode_reply("job-1", [ItemResult(0, 7, result=[{"id": "x"}], score=0.9)])
    assert deliver_reply(redis_conn, key, msg, 60) is False
    (raw,) = close_request(redis_conn, key)
    job, items = decode_reply(raw)
    assert job == "job-1" and items[0].score == 0.9
    assert not redis_conn.exists(key)


def test_a_reply_after_the_request_gave_up_goes_to_the_worker_for_write_back(redis_conn):
    key = new_reply_key()
    assert close_request(redis_conn, key) == []
    msg = encode_reply("job-2", [ItemResult(0, 7)])
    assert deliver_reply(redis_conn, key, msg, 60) is True
    assert not redis_conn.exists(key)  # nobody will read it: not pushed
