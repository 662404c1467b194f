"""serve: request validation, response shapes, sampling and text pieces as pure functions (no model)."""

import numpy as np
import pytest

from paddle_scorer.serve import protocol as proto
from paddle_scorer.serve.codec import TextStream
from paddle_scorer.serve.engine import choose, top_entries
from paddle_scorer.serve.protocol import Limits, ProtocolError, Sampling

LIM = Limits(context=64, vocab=100, max_tokens=32, max_logprobs=5, max_prompts=4, max_stop=2)


def parse(**body):
    return proto.parse_completion(body, LIM)


def refused(body, param=None, status=400, fn=proto.parse_completion):
    with pytest.raises(ProtocolError) as e:
        fn(body, LIM)
    assert e.value.status == status
    if param is not None:
        assert e.value.param == param
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"].endswith((".", ")"))
    return e.value


def test_prompt_forms():
    assert parse(prompt="hi").prompts == ["hi"]
    assert parse(prompt=["a", "b"]).prompts == ["a", "b"]
    assert parse(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert parse(prompt=[[1], [2, 3]]).prompts == [[1], [2, 3]]
    r = parse(prompt="x")
    assert (r.max_tokens, r.echo, r.logprobs, r.stop, r.sampling) == (16, False, None, [], Sampling(1.0, 1.0, None))


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [[1], "a"]}, "prompt"),
    ({"prompt": [True, 2]}, "prompt"),
    ({"prompt": [1.5]}, "prompt"),
    ({"prompt": {"text": "x"}}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": [100]}, "prompt"),
    ({"prompt": [[-1]]}, "prompt[0]"),
    ({"prompt": ["a"] * 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 33}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "temperature": -0.1}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x", "seed": -3}, "seed"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "x", "n": 17}, "n"),
    ({"prompt": "x", "n": 2, "max_tokens": 0}, "n"),
    ({"prompt": "x", "temperature": 1e-320}, "temperature"),
    ({"prompt": "x", "temperature": float("inf")}, "temperature"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": "x", "suffix": "end"}, "suffix"),
    ({"prompt": "x", "model": 3}, "model"),
])
def test_bad_completion_requests_are_400_with_the_field_named(body, param):
    refused(body, param)


def test_defaults_and_harmless_fields_are_accepted():
    r = parse(prompt="x", n=1, best_of=1, stream=False, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
              suffix=None, user="me", top_k=5, model=None, max_tokens=4.0, stop="\n", seed=0, temperature=0)
    assert r.max_tokens == 4 and r.stop == ["\n"] and r.sampling == Sampling(0.0, 1.0, 0)
    assert proto.unknown_fields({"prompt": "x", "top_k": 5}, proto.COMPLETION_FIELDS) == ["top_k"]


def test_json_body():
    assert proto.parse_json(b'{"prompt": "x"}') == {"prompt": "x"}
    for raw in (b"{bad", b"[1, 2]", b'{"temperature": NaN}', b"\xff\xfe", b""):
        with pytest.raises(ProtocolError) as e:
            proto.parse_json(raw)
        assert e.value.status == 400


def test_context_and_model_checks():
    proto.check_fits(60, 4, LIM, "the prompt", "prompt")
    e = pytest.raises(ProtocolError, proto.check_fits, 61, 4, LIM, "prompt 2", "prompt").value
    assert e.code == "context_length_exceeded" and "64" in e.message and "prompt 2 has 61 tokens" in e.message
    proto.check_model(None, "demo")
    proto.check_model("demo", "demo")
    e = pytest.raises(ProtocolError, proto.check_model, "gpt-4", "demo").value
    assert e.status == 404 and e.code == "model_not_found"


def test_chat_requests():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    r = proto.parse_chat({"messages": msgs, "max_completion_tokens": 3, "logprobs": True, "top_logprobs": 2}, LIM)
    assert r.messages[1] == {"role": "user", "content": "hi"} and (r.max_tokens, r.top_logprobs) == (3, 2)
    assert proto.parse_chat({"messages": msgs[1:]}, LIM).max_tokens is None  # up to the context
    for body, param in [({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
                        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
                        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
                        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
                        ({"messages": msgs, "top_logprobs": 2}, "top_logprobs"),
                        ({"messages": msgs, "max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
                        ({"messages": msgs, "max_tokens": 0}, "max_tokens")]:
        refused(body, param, fn=proto.parse_chat)


def test_top_dict_keeps_floats_and_adds_the_chosen_token():
    d = proto.top_dict(["a", "b"], np.array([-0.1, -2.0], dtype=np.float32), "c", np.float32(-5.5))
    assert d == {"a": float(np.float32(-0.1)), "b": -2.0, "c": -5.5}
    assert proto.top_dict(["a", "a"], [-0.1, -0.2], "a", -0.2) == {"a": -0.1}  # same text: the likelier id keeps it
    assert proto.top_dict([], [], "z", -1.0) == {"z": -1.0}


def test_greedy_and_seeded_sampling():
    lp = np.log(np.array([0.1, 0.6, 0.3], dtype=np.float32))
    assert choose(lp, Sampling(0.0), None) == 1
    draws = lambda seed, **kw: [choose(lp, Sampling(1.0, seed=seed, **kw), rng) for rng in [np.random.default_rng(seed)] for _ in range(50)]
    assert draws(3) == draws(3) and draws(3) != draws(4)
    assert set(draws(5, top_p=0.6)) == {1}  # top_p keeps the smallest set reaching 0.6
    assert set(draws(5, top_p=0.65)) == {1, 2}


def test_top_entries_are_sorted_and_taken_from_the_row():
    lp = np.array([-3.0, -1.0, -1.0, -0.5, -9.0], dtype=np.float32)
    ids, vals = top_entries(lp, 3)
    assert list(ids) == [3, 1, 2] and vals.dtype == np.float32 and list(vals) == [-0.5, -1.0, -1.0]
    assert len(top_entries(lp, 0)[0]) == 0 and len(top_entries(lp, 9)[0]) == 5


class ByteCodec:
    """Byte-level tokens (id = byte value), decoded like a byte-level BPE tokenizer (errors='replace')."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_pieces_join_to_the_text_and_split_characters_go_to_the_completing_token():
    text = "né 你好!"
    ids = list(text.encode())
    s = TextStream(ByteCodec())
    for t in ids:
        s.push(t)
    s.finish()
    assert "".join(s.pieces) == s.text == text and len(s.pieces) == len(ids)
    assert s.pieces[:3] == ["n", "", "é"]
    offs = s.offsets()
    assert all(text[o:o + len(p)] == p for o, p in zip(offs, s.pieces))
    tail = TextStream(ByteCodec())
    for t in "ab".encode() + "你".encode()[:2]:  # ends inside a character
        tail.push(t)
    tail.finish()
    assert tail.text == "ab\ufffd" and "".join(tail.pieces) == tail.text
