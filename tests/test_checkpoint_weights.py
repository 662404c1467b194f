"""The safe reader returns exactly what paddle.load returns, and runs no pickle code."""

import json
import shutil
import subprocess
import sys
import textwrap
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import builders
import weights_crafted
from paddle_scorer.errors import CheckpointError, UnsafeCheckpointError
from paddle_scorer.checkpoint.weights import (
    BFLOAT16,
    index_file,
    index_files,
    iter_tensors,
    read_file_meta,
    read_files,
    read_files_meta,
    read_pdparams,
    read_pdparams_meta,
    read_safetensors,
    read_tensor,
    read_tensors,
    shard_files,
    write_pdparams,
    write_safetensors,
)
from paddle_scorer.process.environment import paddle


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


# --------------------------------------------------------------------------------------------------
# The restricted pickle walker: every protocol paddle.save writes, compared bit for bit with paddle.load
# --------------------------------------------------------------------------------------------------


def _same_bits(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Same shape and the same bytes; paddle's uint16 is our bfloat16; a big-endian array equals its native copy."""
    assert ours.shape == theirs.shape
    if ours.dtype == BFLOAT16:
        assert theirs.dtype == np.uint16
        ours = ours.view(np.uint16)
    if not theirs.dtype.isnative:
        theirs = theirs.astype(theirs.dtype.newbyteorder("="))
    assert ours.dtype == theirs.dtype
    assert ours.tobytes(order="A") == theirs.tobytes(order="A") or np.array_equal(ours, theirs)
    assert np.ascontiguousarray(ours).tobytes() == np.ascontiguousarray(theirs).tobytes()


def _paddle_state_dict(pd):
    return {
        "a.weight": pd.randn([3, 4], dtype="float32"),
        "b.weight": pd.randn([5], dtype="float32").astype("float16"),
        "c.weight": pd.randn([2, 3], dtype="float32").astype("bfloat16"),
        "d.ids": pd.to_tensor(np.array([-(2**40), 0, 7, 2**62], dtype=np.int64)),
        "e.scalar": pd.to_tensor(3.5),  # 0-d
        "f.empty": pd.zeros([0, 3]),
        "g.large": pd.randn([300, 500], dtype="float32"),  # > 64 KiB: outside protocol-4 frames
    }


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_every_paddle_save_protocol_reads_bit_exactly_by_index_and_in_full(tmp_path, protocol):
    pd = paddle()
    path = tmp_path / f"p{protocol}.pdparams"
    pd.save(_paddle_state_dict(pd), str(path), protocol=protocol)
    theirs = pd.load(str(path), return_numpy=True)
    refs = index_file(path)
    assert set(refs) == set(theirs) == set(_paddle_state_dict(pd))
    full = read_pdparams(path)
    by_ref = read_tensors(refs)
    for name, arr in theirs.items():
        _same_bits(full[name], arr)
        _same_bits(by_ref[name], arr)
        _same_bits(read_tensor(refs[name]), arr)
        assert refs[name].meta == read_pdparams_meta(path)[name]
        assert refs[name].nbytes == arr.nbytes
    assert refs["c.weight"].dtype == "bfloat16" and by_ref["c.weight"].dtype == BFLOAT16
    assert refs["e.scalar"].shape == () and by_ref["e.scalar"].shape == ()
    assert refs["f.empty"].ranges == () and by_ref["f.empty"].shape == (0, 3)
    assert refs["g.large"].encoding == ("latin1-utf8" if protocol == 2 else "raw")
    assert all(a.flags.writeable for a in by_ref.values())


@pytest.mark.parametrize("protocol", [2, 4])
def test_fortran_and_big_endian_numpy_arrays_saved_by_paddle(tmp_path, protocol):
    pd = paddle()
    arrays = {
        "fortran": np.asfortranarray(np.arange(24, dtype=np.float32).reshape(2, 3, 4)),
        "fortran16": np.asfortranarray(np.random.default_rng(0).normal(size=(70, 600)).astype(np.float16)),
        "big_endian": np.arange(10, dtype=">f8"),
    }
    path = tmp_path / "np.pdparams"
    pd.save(arrays, str(path), protocol=protocol)  # a dict of ndarrays: paddle pickles them as they are
    theirs = pd.load(str(path), return_numpy=True)
    refs = index_file(path)
    assert refs["fortran"].fortran and refs["big_endian"].byteswap
    for name, ref in refs.items():
        got = read_tensor(ref)
        np.testing.assert_array_equal(got, arrays[name])
        _same_bits(got, theirs[name])
        assert got.dtype.isnative
    assert read_tensor(refs["fortran"]).flags["F_CONTIGUOUS"]


@pytest.mark.parametrize("protocol", [2, 3])
def test_sliced_big_param_is_one_ref_with_several_ranges(tmp_path, protocol):
    pd = paddle()
    rng = np.random.default_rng(1)
    arrays = {"embed": rng.normal(size=(7, 5)).astype(np.float32), "small": np.ones(3, np.float16),
              "bf": rng.integers(0, 2**16, size=(4, 4), dtype=np.uint16)}
    path = weights_crafted.sliced_like_paddle(arrays, max_elements=8, path=tmp_path / "s.pdparams", protocol=protocol)
    theirs = pd.load(str(path), return_numpy=True)  # paddle glues the slices back
    refs = index_file(path)
    assert set(refs) == set(theirs) == {"embed", "small", "bf"}
    assert len(refs["embed"].ranges) == 5 and refs["embed"].shape == (7, 5)
    assert len(refs["bf"].ranges) == 2 and refs["bf"].dtype == "bfloat16"
    for name in theirs:
        _same_bits(read_tensor(refs[name]), theirs[name])
        _same_bits(read_pdparams(path)[name], theirs[name])


def test_protocol_5_in_band_buffers(tmp_path):
    arrays = {"w": np.arange(20000, dtype=np.float32).reshape(100, 200), "f": np.asfortranarray(np.eye(3))}
    path = weights_crafted.dump(arrays, tmp_path / "p5.pdparams", protocol=5)
    got = read_tensors(index_file(path))
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])


# --------------------------------------------------------------------------------------------------
# Random access and sharded sets
# --------------------------------------------------------------------------------------------------


def _mixed_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x.f32": rng.normal(size=(40, 30)).astype(np.float32),
        "x.f16": rng.normal(size=(7,)).astype(np.float16),
        "x.bf16": rng.normal(size=(5, 6)).astype(BFLOAT16),
        "x.i64": rng.integers(-(2**60), 2**60, size=(3, 2)),
        "x.scalar": np.array(2.5, np.float32),
        "x.empty": np.zeros((0, 4), np.float32),
    }


def test_safetensors_index_matches_full_read_single_and_sharded(tmp_path):
    a, b = _mixed_arrays(0), {f"y{k[1:]}": v for k, v in _mixed_arrays(1).items()}
    write_safetensors(a, tmp_path / "model-00001-of-00002.safetensors", metadata={"format": "np"})
    write_safetensors(b, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a},
                  **{k: "model-00002-of-00002.safetensors" for k in b}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    files = shard_files(tmp_path / "model.safetensors.index.json")
    one = index_file(files[0])
    assert set(one) == set(a)
    full = read_safetensors(files[0])
    for name, ref in one.items():
        got = read_tensor(ref)
        # (safetensors' numpy writer stores a 0-d array as shape [1]: compare with what the file says)
        assert got.dtype == full[name].dtype == a[name].dtype and got.shape == full[name].shape
        assert got.tobytes() == full[name].tobytes() == a[name].tobytes()
        assert ref.meta == read_file_meta(files[0])[name]
    refs = index_files(files)
    assert set(refs) == set(a) | set(b)
    everything = read_tensors(refs)
    for name, arr in {**a, **b}.items():
        assert everything[name].tobytes() == arr.tobytes() and everything[name].dtype == arr.dtype
        assert everything[name].size == arr.size
    assert {n: m for n, m in read_files_meta(files).items()} == {n: r.meta for n, r in refs.items()}
    shutil.copy(files[0], tmp_path / "dup.safetensors")
    with pytest.raises(CheckpointError, match="appears in more than one shard"):
        index_files([files[0], tmp_path / "dup.safetensors"])


@pytest.mark.parametrize("fmt", ["safetensors", "pdparams"])
def test_random_access_to_a_subset_reads_only_those_tensors(tmp_path, fmt):
    arrays = {f"layers.{i}.weight": np.full((64, 64), i, np.float32) for i in range(6)}
    path = tmp_path / f"m.{fmt}"
    (write_safetensors if fmt == "safetensors" else write_pdparams)(arrays, path)
    refs = index_file(path)
    subset = [refs["layers.4.weight"], refs["layers.1.weight"]]
    got = read_tensors(subset)
    assert list(got) == ["layers.4.weight", "layers.1.weight"]  # the order asked for
    assert all((got[r.name] == arrays[r.name]).all() for r in subset)
    got["layers.4.weight"][0, 0] = -1  # a fresh writable array, not a view of the file
    assert read_tensor(refs["layers.4.weight"])[0, 0] == 4
    assert refs["layers.4.weight"].ranges[0][1] == 64 * 64 * 4


def test_read_tensor_from_a_background_thread_while_the_main_thread_computes(tmp_path):
    arrays = {f"layers.{i}.w": np.random.default_rng(i).normal(size=(256, 256)).astype(np.float32) for i in range(8)}
    write_pdparams(arrays, tmp_path / "m.pdparams")
    refs = index_file(tmp_path / "m.pdparams")
    hidden = np.ones((16, 256), np.float32)
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(read_tensor, refs["layers.0.w"])
        for i in range(8):
            w = nxt.result()
            if i + 1 < 8:
                nxt = pool.submit(read_tensor, refs[f"layers.{i + 1}.w"])  # prefetch while computing
            assert np.array_equal(w, arrays[f"layers.{i}.w"])
            hidden = np.tanh(hidden @ w)
    expect = np.ones((16, 256), np.float32)
    for i in range(8):
        expect = np.tanh(expect @ arrays[f"layers.{i}.w"])
    np.testing.assert_array_equal(hidden, expect)


def test_iter_tensors_and_read_files_use_the_index(tmp_path):
    a = _mixed_arrays(3)
    write_pdparams(a, tmp_path / "a.pdparams")
    write_safetensors({"z": np.arange(5, dtype=np.int32)}, tmp_path / "b.safetensors")
    files = [tmp_path / "a.pdparams", tmp_path / "b.safetensors"]
    got = dict(iter_tensors(files))
    assert set(got) == set(a) | {"z"}
    for k, v in a.items():
        assert got[k].tobytes() == v.tobytes() and got[k].dtype == v.dtype
    assert read_files(files)["z"].tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------------
# Crafted and damaged files
# --------------------------------------------------------------------------------------------------


def test_pickle_bombs_are_refused_by_name_by_the_index_too(tmp_path):
    marker = tmp_path / "pwned"
    bombs = [
        (builders.make_pickle_bomb(tmp_path / "p4.pdparams", marker), r"references `posix.system`"),
        (weights_crafted.os_system_protocol2(tmp_path / "p2.pdparams", marker), r"references `posix.system`"),
        (weights_crafted.inst_opcode_bomb(tmp_path / "p1.pdparams", marker), r"pickle opcode INST"),
    ]
    for bomb, why in bombs:
        for reader in (index_file, read_file_meta, read_pdparams):
            with pytest.raises(UnsafeCheckpointError, match=why + r".*nothing was executed"):
                reader(bomb)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_huge_declared_shape_fails_fast_without_allocating(tmp_path, protocol):
    path = weights_crafted.huge_declared(tmp_path / "huge.pdparams", protocol)
    assert path.stat().st_size < 300
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        for reader in (index_file, read_pdparams, read_pdparams_meta):
            with pytest.raises(CheckpointError, match=(
                r"huge.pdparams: entry 'w' declares shape \(1000000000000,\) of float64 \(8,000,000,000,000 bytes\) "
                r"but its data holds 8 bytes.*the file is corrupt or crafted; nothing was allocated or executed")):
                reader(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # numpy reports its allocations to tracemalloc: the old loader asked for 931 GiB here
    assert time.perf_counter() - t0 < 2


def test_huge_declared_shape_under_a_small_address_space_limit(tmp_path):
    path = weights_crafted.huge_declared(tmp_path / "huge.pdparams", 4, shape=(2**31,))  # 16 GiB declared
    script = textwrap.dedent(f"""
        import resource, sys
        from paddle_scorer.errors import CheckpointError
        from paddle_scorer.checkpoint.weights import index_file, read_pdparams
        import psutil
        vm = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
        for reader in (index_file, read_pdparams):
            try:
                reader({str(path)!r})
            except CheckpointError as exc:
                print("refused:", exc)
            else:
                sys.exit("loaded a crafted file")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("refused:") == 2 and "17,179,869,184 bytes" in res.stdout


def test_declared_size_must_equal_the_bytes_behind_it(tmp_path):
    fake = weights_crafted.FakeArray
    cases = {
        "short": (fake((3,), "float32", b"\0" * 8),
                  r"declares shape \(3,\) of float32 \(12 bytes\) but its data holds 8 bytes"),
        "negative": (fake((-1, 4), "float32", b""), r"declares shape \(-1, 4\) with a negative dimension"),
        "not_bytes": (fake((1,), "float32", 1234), r"has data that is a int, not bytes"),
        "object": (fake((1,), "O", [None]), r"declares dtype dtype\('O'\), which is not a numeric"),
        "structured": (fake((1,), np.dtype([("a", "f4")]), b"\0" * 4), r"corrupt or crafted"),
    }
    for protocol in (2, 4):
        for name, (fake, why) in cases.items():
            path = weights_crafted.dump({"w": fake}, tmp_path / f"{name}{protocol}.pdparams", protocol)
            with pytest.raises(CheckpointError, match=why):
                index_file(path)
            with pytest.raises(CheckpointError, match=why):
                read_pdparams(path)


def test_codecs_encode_only_with_latin1_and_a_string(tmp_path):
    encodes = {"utf16": weights_crafted.Encode("abcd", "utf-16"), "zlib": weights_crafted.Encode(b"x", "zlib_codec"),
               "bytes": weights_crafted.Encode(b"abcd", "latin1")}
    for name, enc in encodes.items():
        fake = weights_crafted.FakeArray((4,), "uint8", enc)
        path = weights_crafted.dump({"w": fake}, tmp_path / f"{name}.pdparams", 2)
        with pytest.raises(UnsafeCheckpointError, match=r"_codecs.encode"):
            index_file(path)
    # Tensor text that was first pickled elsewhere (here in the name table) reaches _codecs.encode through the
    # memo, already read: the ref keeps those bytes inline, and they read back right.
    text = "\x01\xff\x00A"
    obj = {"StructuredToParameterName@@": {"x": text},
           "w": weights_crafted.FakeArray((4,), "uint8", weights_crafted.Encode(text, "latin1"))}
    path = weights_crafted.dump(obj, tmp_path / "inline.pdparams", 2)
    ref = index_file(path)["w"]
    assert ref.inline == b"\x01\xff\x00A" and read_tensor(ref).tolist() == [1, 255, 0, 65]


def test_protocol2_text_that_decodes_to_the_wrong_length_is_caught_at_read_time(tmp_path):
    # 3 latin-1 characters, 6 UTF-8 bytes, declared as 4 bytes: plausible at index time (4 <= 6 <= 8), wrong when
    # decoded.
    fake = weights_crafted.FakeArray((1,), "float32", weights_crafted.Encode("\xff\xff\xff", "latin1"))
    path = weights_crafted.dump({"w": fake, "ok": np.ones(2, np.float32)}, tmp_path / "w.pdparams", 2)
    refs = index_file(path)
    assert refs["w"].encoding == "latin1-utf8"
    with pytest.raises(CheckpointError, match=r"'w' declares 4 bytes but its protocol-2 text decodes to 3 bytes"):
        read_tensor(refs["w"])
    assert read_tensor(refs["ok"]).tolist() == [1, 1]


def test_a_crafted_dtype_cannot_rewrite_numpys_shared_dtypes(tmp_path):
    fake = weights_crafted.FakeArray((2,), weights_crafted.SharedDtype(), np.array([1, 2], ">f4").tobytes())
    path = weights_crafted.dump({"w": fake}, tmp_path / "d.pdparams", 4)
    got = read_tensor(index_file(path)["w"])
    assert got.tolist() == [1.0, 2.0] and got.dtype == np.float32
    assert np.dtype("float32").byteorder == "=" and np.ones(1, np.float32).dtype.isnative


def test_the_walker_stops_after_a_bounded_number_of_opcodes(tmp_path, monkeypatch):
    from paddle_scorer.checkpoint import unpickle

    path = tmp_path / "many.pdparams"
    write_pdparams({f"t{i}": np.zeros(1, np.float32) for i in range(10)}, path)
    assert len(index_file(path)) == 10
    monkeypatch.setattr(unpickle, "_MAX_OPS", 100)  # the real cap (8M) allows ~270,000 tensors
    with pytest.raises(CheckpointError, match=r"more than 100 pickle opcodes.*corrupt or crafted"):
        index_file(path)


def test_truncated_files_name_the_file_at_index_and_at_read_time(tmp_path):
    arrays = {"a": np.arange(50000, dtype=np.float32), "b": np.arange(10, dtype=np.float32)}
    for fmt in ("pdparams", "safetensors"):
        path = tmp_path / f"t.{fmt}"
        (write_safetensors if fmt == "safetensors" else write_pdparams)(arrays, path)
        data = path.read_bytes()
        refs = index_file(path)
        # Cut inside the large payload: the index refuses it without reading the payload.
        cut = tmp_path / f"cut.{fmt}"
        cut.write_bytes(data[: refs["a"].offset + 1000])
        with pytest.raises(CheckpointError, match=r"cut\.\w+ is not a readable .*copied completely"):
            index_file(cut)
        # Truncated after indexing: reading names the file.
        path.write_bytes(data[: refs["a"].offset + 1000])
        with pytest.raises(CheckpointError, match=rf"t\.{fmt} is shorter than when it was indexed: tensor 'a'"):
            read_tensor(refs["a"])
        path.unlink()
        with pytest.raises(CheckpointError, match=r"could not be opened"):
            read_tensor(refs["b"])


# --------------------------------------------------------------------------------------------------
# Memory: the index holds no tensor bytes; reading one tensor costs that tensor
# --------------------------------------------------------------------------------------------------

# Peak RSS of the child process as VmHWM (/proc/self/status), not resource.getrusage: Linux carries ru_maxrss over
# fork+exec, so a child of this (paddle-importing, ~1 GB) pytest process starts with the parent's peak (measured: a
# child of a 300 MB parent reported 344 MB before doing anything). VmHWM belongs to the new program image.
_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from paddle_scorer.checkpoint.weights import index_file, read_tensor
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    base = peak()
    refs = index_file(sys.argv[1])
    indexed = peak()
    arr = read_tensor(refs["layers.2.w"])
    read = peak()
    print(json.dumps({"index": indexed - base, "read": read - indexed, "n": len(refs), "sum": float(arr[:10].sum())}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("protocol", [2, 4])
def test_indexing_a_200mb_pdparams_keeps_no_tensor_in_memory(tmp_path, protocol):
    tensor = 50 << 20
    arrays = {f"layers.{i}.w": np.full(tensor // 2, i, np.float16) for i in range(4)}
    path = tmp_path / "big.pdparams"
    if protocol == 4:
        write_pdparams(arrays, path)
    else:
        weights_crafted.dump(arrays, path, protocol=2)
    del arrays
    try:
        res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path)], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        got = json.loads(res.stdout)
        assert got["n"] == 4 and got["sum"] == 20.0
        assert got["index"] < tensor // 4, got  # the file is 4 tensors; the index holds none of them
        assert 0.8 * tensor < got["read"] < 1.6 * tensor, got  # one tensor, read straight into its array
    finally:
        path.unlink()
