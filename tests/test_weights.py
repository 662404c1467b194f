"""The safe reader returns exactly what paddle.load returns, and runs no pickle code."""

import json

import numpy as np
import pytest

import builders
from paddle_scorer.errors import CheckpointError, UnsafeCheckpointError
from paddle_scorer.weights import (
    BFLOAT16,
    read_file_meta,
    read_files,
    read_pdparams,
    read_pdparams_meta,
    read_safetensors,
    shard_files,
    write_pdparams,
    write_safetensors,
)
from paddle_scorer.runtime import paddle


def test_pdparams_matches_paddle_load_for_fp32_fp16_bf16(tmp_path):
    pd = paddle()
    sd = {
        "a.weight": pd.randn([3, 4], dtype="float32"),
        "b.weight": pd.randn([5], dtype="float32").astype("float16"),
        "c.weight": pd.randn([2, 2], dtype="float32").astype("bfloat16"),
    }
    path = tmp_path / "x.pdparams"
    pd.save(sd, str(path))
    ours = read_pdparams(path)
    theirs = pd.load(str(path), return_numpy=True)
    assert set(ours) == {"a.weight", "b.weight", "c.weight"}
    np.testing.assert_array_equal(ours["a.weight"], theirs["a.weight"])
    assert ours["b.weight"].dtype == np.float16
    assert ours["c.weight"].dtype == BFLOAT16  # paddle stores bf16 as uint16
    np.testing.assert_array_equal(ours["c.weight"].view(np.uint16), theirs["c.weight"].view(np.uint16))
    meta = read_pdparams_meta(path)
    assert meta["a.weight"].shape == (3, 4) and meta["a.weight"].dtype == "float32"
    assert meta["c.weight"].dtype == "bfloat16" and meta["c.weight"].nbytes == 8


def test_written_pdparams_round_trip_through_paddle(tmp_path):
    pd = paddle()
    arr = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "h": np.ones(3, np.float16)}
    write_pdparams(arr, tmp_path / "w.pdparams")
    back = pd.load(str(tmp_path / "w.pdparams"), return_numpy=True)
    np.testing.assert_array_equal(back["w"], arr["w"])
    assert back["h"].dtype == np.float16


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    bomb = builders.make_pickle_bomb(tmp_path / "model_state.pdparams", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"references `posix.system`.*nothing was executed"):
        read_pdparams(bomb)
    with pytest.raises(UnsafeCheckpointError):
        read_pdparams_meta(bomb)
    assert not marker.exists()


def test_truncated_pdparams_gives_a_clear_error(tmp_path):
    pd = paddle()
    path = tmp_path / "t.pdparams"
    pd.save({"a": pd.ones([100])}, str(path))
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable .pdparams.*copied completely"):
        read_pdparams(path)


def test_safetensors_and_shard_index(tmp_path):
    a = {"x.weight": np.random.rand(4, 2).astype(np.float32)}
    b = {"y.weight": np.ones((3,), dtype=BFLOAT16)}
    write_safetensors(a, tmp_path / "model-00001-of-00002.safetensors")
    write_safetensors(b, tmp_path / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"x.weight": "model-00001-of-00002.safetensors",
                                           "y.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = shard_files(tmp_path / "model.safetensors.index.json")
    tensors = read_files(files)
    np.testing.assert_array_equal(tensors["x.weight"], a["x.weight"])
    assert tensors["y.weight"].dtype == BFLOAT16
    assert read_file_meta(files[1])["y.weight"].dtype == "bfloat16"
    assert read_safetensors(files[0])["x.weight"].shape == (4, 2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard\\(s\\) that are not in"):
        shard_files(tmp_path / "model.safetensors.index.json")
