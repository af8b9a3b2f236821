"""The wire format: round trips, and every malformed message refused with its code."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from control_node import protocol as P


def obs_frames(**overrides: object) -> list[bytes]:
    fields = {
        "bridge_id": "b0",
        "episode": 3,
        "step": 7,
        "reward": 1.5,
        "terminated": False,
        "truncated": True,
        "applied_seq": 41,
        "applied_safe": False,
        "t_obs_ns": 123,
        "t_send_ns": 456,
    }
    fields.update(overrides)
    arrays = {"obs": np.arange(4, dtype=np.float32), "action": np.array([0.5], np.float32)}
    return [bytes(f) for f in P.encode(P.OBS, fields, arrays)]


def test_round_trip_keeps_fields_and_arrays() -> None:
    msg = P.decode(obs_frames())
    assert msg.type == P.OBS
    assert msg["episode"] == 3 and msg["truncated"] is True and msg["reward"] == 1.5
    np.testing.assert_array_equal(msg.arrays["obs"], np.arange(4, dtype=np.float32))
    assert msg.arrays["action"].dtype == np.float32 and msg.arrays["action"].shape == (1,)


def test_uint8_arrays_and_extra_fields_pass() -> None:
    frames = P.encode(P.ACTION, _action_fields(note="hi"), {"action": np.zeros(2, np.float32)})
    assert P.decode(frames)["note"] == "hi"  # unknown header fields are ignored, not refused
    frames = P.encode(P.OBS, P.decode(obs_frames()).fields, {"obs": np.zeros((3, 8, 8), np.uint8)})
    assert P.decode(frames).arrays["obs"].shape == (3, 8, 8)


def _action_fields(**extra: object) -> dict[str, object]:
    return {
        "seq": 1,
        "episode": 0,
        "step": 0,
        "model_id": "m",
        "safe": False,
        "t_obs_ns": 1,
        "t_recv_ns": 2,
        "t_send_ns": 3,
        **extra,
    }


def _header(frames: list[bytes]) -> dict[str, object]:
    return msgpack.unpackb(frames[0])


def _with_header(frames: list[bytes], **changes: object) -> list[bytes]:
    header = {**_header(frames), **changes}
    return [msgpack.packb(header), *frames[1:]]


@pytest.mark.parametrize(
    ("frames", "code", "words"),
    [
        ([], "bad_frames", "empty"),
        ([b"\xc1\xff garbage"], "bad_header", "not msgpack"),
        ([msgpack.packb([1, 2])], "bad_header", "not a map"),
        ([b"x" * (P.MAX_HEADER_BYTES + 1)], "bad_header", "bytes"),
        (_with_header(obs_frames(), v=2), "bad_version", "version 2"),
        (_with_header(obs_frames(), type="teleport"), "bad_type", "teleport"),
        (_with_header(obs_frames(), step="7"), "bad_field", "'step'"),
        (_with_header(obs_frames(), terminated=1), "bad_field", "'terminated'"),
        (_with_header(obs_frames(), episode=True), "bad_field", "'episode'"),
        (obs_frames()[:2], "bad_array", "2 array(s) but 1"),
        (
            _with_header(
                obs_frames(), arrays=[["obs", "float64", [4]], ["action", "float32", [1]]]
            ),
            "bad_dtype",
            "float64",
        ),
        (
            _with_header(
                obs_frames(), arrays=[["obs", "float32", [5]], ["action", "float32", [1]]]
            ),
            "bad_shape",
            "needs 20",
        ),
        (
            _with_header(
                obs_frames(), arrays=[["pose", "float32", [4]], ["action", "float32", [1]]]
            ),
            "bad_array",
            "'pose'",
        ),
        (
            _with_header(obs_frames(), arrays=[["obs", "float32"], ["action", "float32", [1]]]),
            "bad_array",
            "not [name",
        ),
    ],
)
def test_malformed_messages_are_refused_with_a_code(
    frames: list[bytes], code: str, words: str
) -> None:
    with pytest.raises(P.ProtocolError) as err:
        P.decode(frames)
    assert err.value.code == code
    assert words in err.value.reason


def test_missing_field_and_missing_required_array_are_named() -> None:
    header = _header(obs_frames())
    del header["reward"]
    with pytest.raises(P.ProtocolError, match="'reward' is missing"):
        P.decode([msgpack.packb(header), *obs_frames()[1:]])
    frames = P.encode(P.ACTION, _action_fields())
    with pytest.raises(P.ProtocolError, match="'action' is missing"):
        P.decode(frames)


def test_action_template_is_byte_for_byte_what_encode_makes() -> None:
    frames_of = P.ActionFrames(3)
    action = np.array([0.25, -1.0, 3.5], np.float32)
    for seq, episode, step, t in [(1, 0, 0, 0), (300, 70_000, 999, 2**62), (2**40, 5, 128, 7)]:
        fields = _action_fields(seq=seq, episode=episode, step=step, model_id="abc123")
        fields.update(t_obs_ns=t, t_recv_ns=t + 1, t_send_ns=t + 2)
        expected = [bytes(f) for f in P.encode(P.ACTION, fields, {"action": action})]
        got = frames_of(seq, episode, step, "abc123", t, t + 1, t + 2, action)
        assert got == expected
        msg = P.decode(got)
        assert msg.fields == fields and msg.arrays["action"].tolist() == action.tolist()


def test_specs_seen_before_are_still_checked_strictly() -> None:
    """The layouts of accepted array specs are remembered; a spec equal to one of them only by
    Python's == (True for 1, 4.0 for 4), a wrong frame count or length, is still refused."""
    for _ in range(2):  # the second time the layout is known
        assert P.decode(obs_frames()).arrays["obs"].shape == (4,)
    cases = [
        (_with_header(obs_frames(), arrays=[["obs", "float32", [4.0]], ["action", "float32", [1]]]), "bad_array"),
        (_with_header(obs_frames(), arrays=[["obs", "float32", [4]], ["action", "float32", [True]]]), "bad_array"),
        (obs_frames()[:2], "bad_array"),
        ([*obs_frames()[:2], b"\x00" * 8], "bad_shape"),
    ]  # fmt: skip
    for frames, code in cases:
        with pytest.raises(P.ProtocolError) as err:
            P.decode(frames)
        assert err.value.code == code


def test_a_number_sent_as_an_int_and_a_non_finite_rate_take_the_full_check() -> None:
    assert P.decode(obs_frames(reward=2))["reward"] == 2  # an int where a float is usual
    welcome = {"model_id": "m", "rate_hz": float("inf"), "watchdog_ms": 100.0, "pid": 1}
    with pytest.raises(P.ProtocolError, match="'rate_hz' is not finite"):
        P.decode(P.encode(P.WELCOME, welcome, {"safe_action": np.zeros(1, np.float32)}))
    msg = P.decode(obs_frames(note="extra"))
    assert set(msg.fields) == {*P.FIELDS[P.OBS], "note"}  # the header less v, type, arrays
