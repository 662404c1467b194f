"""``torch.save`` zip files (peft's ``adapter_model.bin``) read without running pickle code.

A torch zip holds ``<name>/data.pkl`` (a pickle of the state dict: ``collections.OrderedDict`` and one
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` per tensor, whose storage is a
persistent id ``('storage', torch.FloatStorage, key, location, numel)``) and each storage's bytes, stored uncompressed,
as ``<name>/data/<key>``. ``torch.load`` unpickles the first with the full pickle machinery, so a crafted file runs
code (``weights_only`` narrows that, and has had bypasses). Here the same restricted walker as ``.pdparams``
(:mod:`paddle_scorer.checkpoint.unpickle`) interprets ``data.pkl`` with exactly these names allowed, nothing called,
every storage's address found in the zip's own headers, and each tensor becomes a
:class:`~paddle_scorer.checkpoint.tensor_ref.TensorRef` into the zip file: C-contiguous or a transposed 2-D view
(Fortran order), inside its storage; anything else is refused naming the entry.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from pathlib import Path

from paddle_scorer.checkpoint import unpickle
from paddle_scorer.checkpoint.tensor_ref import TensorRef
from paddle_scorer.errors import CheckpointError

_MAX_PICKLE = 64 << 20  # data.pkl holds names and shapes only; tensor bytes live beside it

_STORAGES = {
    "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16", "DoubleStorage": "float64",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
             "uint8": 1, "bool": 1}
_ORDERED_DICT = unpickle._Sentinel("collections.OrderedDict")
_REBUILD = unpickle._Sentinel("torch._utils._rebuild_tensor_v2")
_TORCH_GLOBALS = {("collections", "OrderedDict"): _ORDERED_DICT, ("torch._utils", "_rebuild_tensor_v2"): _REBUILD}
_TORCH_GLOBALS.update({("torch", name): unpickle._Sentinel(f"torch.{name}") for name in _STORAGES})


class _Storage:
    __slots__ = ("dtype", "key", "numel")

    def __init__(self, dtype: str, key: str, numel: int):
        self.dtype, self.key, self.numel = dtype, key, numel


class _Tensor:
    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


class _TorchWalker(unpickle._PickleWalker):
    """The ``.pdparams`` walker with torch's state-dict names allowed and its persistent ids read as storages."""

    def __init__(self, fh, path: Path, size: int):
        super().__init__(fh, path, size)
        self.dispatch[ord("Q")] = self._binpersid

    def corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable torch state dict ({what} in data.pkl at byte "
                               f"{self.op_at}); check that the file was copied completely.")

    def _resolve(self, module, name):
        found = _TORCH_GLOBALS.get((module, name)) if isinstance(module, str) and isinstance(name, str) else None
        if found is None:
            return super()._resolve(module, name)
        self.stack.append(found)

    def _binpersid(self):
        pid = self.stack.pop()
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], unpickle._Sentinel) and pid[1].name.startswith("torch.")
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):
            raise self.unsafe(f"loads a persistent object {pid!r:.80} that is not a torch storage")
        dtype = _STORAGES.get(pid[1].name[len("torch."):])
        if dtype is None:
            raise self.unsafe(f"loads a storage of type {pid[1].name}")
        self.stack.append(_Storage(dtype, pid[2], pid[4]))

    def _call(self, func, args: tuple):
        if func is _ORDERED_DICT:
            if args:
                raise self.unsafe("calls collections.OrderedDict with arguments")
            return {}
        if func is _REBUILD:
            if len(args) not in (6, 7) or not isinstance(args[0], _Storage) or not isinstance(args[1], int):
                raise self.crafted(f"torch's _rebuild_tensor_v2 called with {args!r:.80}")
            shape, stride = args[2], args[3]
            if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride)
                    and len(shape) <= unpickle.MAX_DIMS and all(isinstance(x, int) and x >= 0 for x in shape + stride)):
                raise self.crafted(f"a tensor shape {shape!r:.60} / stride {stride!r:.60}")
            return _Tensor(args[0], args[1], shape, stride)
        return super()._call(func, args)


def _member_offsets(zf: zipfile.ZipFile, path: Path) -> dict[str, tuple[int, int]]:
    """Each stored member's (data offset, size) in the file, from its local header; compressed members refused."""
    out = {}
    with open(path, "rb") as fh:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: {info.filename} is compressed, which torch.save never does; the file "
                                      "is not a torch state dict as saved.")
            fh.seek(info.header_offset)
            head = fh.read(30)
            if len(head) != 30 or head[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{path}: the zip entry {info.filename} has no local header; the file is "
                                      "corrupt.")
            n, m = struct.unpack("<HH", head[26:30])
            out[info.filename] = (info.header_offset + 30 + n + m, info.file_size)
    return out


def index_torch(path: str | Path) -> dict[str, TensorRef]:
    """Where every tensor of a ``torch.save`` zip lives; no tensor bytes read, no code run."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path} is not a torch zip file ({exc}); a torch.save file older than torch 1.6 is not "
                              "read here: re-save it with peft's save_pretrained(..., safe_serialization=True).") from exc
    with zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: a zip without one <name>/data.pkl is not a torch state dict.")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in zf.namelist() and zf.read(root + "byteorder").strip() not in (b"little", b""):
            raise CheckpointError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one.")
        info = zf.getinfo(pkl[0])
        if info.file_size > _MAX_PICKLE:
            raise CheckpointError(f"{path}: data.pkl is {info.file_size:,} bytes, far more than a state dict's "
                                  "names and shapes need: the file is corrupt or crafted; nothing was executed.")
        offsets = _member_offsets(zf, path)
        data = zf.read(pkl[0])
    walker = _TorchWalker(io.BytesIO(data), path, len(data))
    try:
        state = walker.run()
    except CheckpointError:
        raise
    except (OverflowError, MemoryError, RecursionError, ValueError, TypeError) as exc:
        raise walker.corrupt(f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(state).__name__}, not a state dict of tensors.")
    refs = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, _Tensor):
            raise CheckpointError(f"{path}: the entry {name!r:.60} is not a tensor; a weights file holds only tensors.")
        refs[name] = _ref(path, name, t, offsets.get(f"{root}data/{t.storage.key}"))
    return refs


def _ref(path: Path, name: str, t: _Tensor, member: tuple[int, int] | None) -> TensorRef:
    size = _ITEMSIZE[t.storage.dtype]
    if member is None:
        raise CheckpointError(f"{path}: {name}'s storage data/{t.storage.key} is not in the zip; the file is corrupt.")
    start, length = member
    if t.storage.numel * size != length:
        raise CheckpointError(f"{path}: {name}'s storage declares {t.storage.numel:,} values but holds {length:,} "
                              "bytes: the file is corrupt or crafted; nothing was allocated or executed.")
    numel = math.prod(t.shape)
    c_stride = tuple(math.prod(t.shape[i + 1:]) for i in range(len(t.shape)))
    fortran = len(t.shape) == 2 and t.stride == (1, t.shape[0]) and t.stride != c_stride
    if t.stride != c_stride and not fortran and numel > 1:
        raise CheckpointError(f"{path}: {name} is a strided view (stride {t.stride} of shape {t.shape}), which a "
                              "saved state dict never holds: re-save the adapter with peft.")
    if t.offset < 0 or t.offset + numel > t.storage.numel:
        raise CheckpointError(f"{path}: {name} runs past the end of its storage: the file is corrupt or crafted; "
                              "nothing was allocated or executed.")
    return TensorRef(file=path, name=name, shape=tuple(t.shape), dtype=t.storage.dtype, nbytes=numel * size,
                     ranges=((start + t.offset * size, numel * size),), fortran=fortran)
