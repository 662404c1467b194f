"""The restricted pickle walker behind every ``.pdparams`` read: it records where array bytes live and
reads none of them, and refuses anything a weights file never needs.

A ``.pdparams`` file is a pickle. ``paddle.load`` unpickles it with the full pickle machinery, so a
crafted file can run any code on load. Legitimate files only reference numpy's array
reconstruction (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``, and in
``protocol=2`` files ``_codecs.encode``); this module allows exactly those and refuses everything
else by name.

**Our own pickle walker, not ``pickle.Unpickler``.** A restricted ``find_class`` bounds what runs,
not what is allocated. numpy's ``_reconstruct(ndarray, shape, dtype)`` allocates the shape it is
handed before ``__setstate__`` supplies the bytes: with the previous unpickler a crafted 166-byte
file declaring ``(10**12,)`` raised a bare ``MemoryError`` ("Unable to allocate 931 GiB"), and one
declaring ``(4 * 10**9,)`` had 4 GB allocated (tracemalloc) before numpy noticed the 8 data bytes.
``pickle.Unpickler`` itself allocates a ``BINBYTES8`` payload at the declared length before it
finds the file shorter (4 GB traced for a 112-byte file). So ``.pdparams`` files are interpreted by
``_PickleWalker``, a small opcode loop in the spirit of ``pickletools.genops`` that implements only
the ~40 opcodes ``pickle`` writes for a dict of arrays (protocols 2-5) and:

- refuses every other global by name (:class:`UnsafeCheckpointError`), and the opcodes that import
  or instantiate by themselves (INST, OBJ, NEWOBJ, EXT*, PERSID) by name too;
- never calls ``_reconstruct``: arrays are stubs that only keep their ``__setstate__`` tuple;
- builds dtypes itself, always as copies (``numpy.dtype('f4', False, False)`` followed by ``BUILD``
  would otherwise let a file rewrite numpy's process-wide float32 dtype), and only numeric ones;
- never reads tensor bytes: byte payloads are skipped with a seek and recorded as
  ``(offset, length)``, after checking that they fit inside the file;
- stops after 8 million opcodes (``_MAX_OPS``), so its own small objects stay under ~1 GB;
- allows ``_codecs.encode`` (protocol 2 pickles bytes as ``_codecs.encode(<str>, 'latin1')``) only
  with the latin1 / latin-1 encoding and a string argument; that string (UTF-8 in the file) is not
  read either: it becomes a "latin1-utf8" range, decoded at read time in 1 MiB chunks with an exact
  length check (the index checks ``n <= utf8 length <= 2n``, which any latin-1 text satisfies).

Then, before anything is allocated, each array's declared size (shape x itemsize) must equal the
length of the bytes behind it; a mismatch, a negative dimension or an object/structured dtype is a
:class:`CheckpointError` naming the file and the entry ("... the file is corrupt or crafted; nothing
was allocated or executed"). Protocol 4 writes payloads under 64 KiB inside ``FRAME``s and larger
ones outside them; the walker reads opcodes straight from the file and treats ``FRAME`` as the
prefetch hint it is, so both kinds have exact file offsets. A Paddle "big param" that
``paddle.save(protocol<4)`` sliced into ``name@@.0``, ``name@@.1``, ... (``UnpackBigParamInfor@@``)
becomes one :class:`TensorRef` with one range per slice.
"""

from __future__ import annotations

import io
import os
import pickletools
import struct
from pathlib import Path

import numpy as np

from paddle_scorer.errors import CheckpointError, UnsafeCheckpointError

# --------------------------------------------------------------------------------------------------
# .pdparams: a restricted pickle walker that records where array bytes live and reads none of them
# --------------------------------------------------------------------------------------------------


class _Sentinel:
    """An allowed global: a name we recognise, never the real callable."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_RECONSTRUCT = _Sentinel("numpy.core.multiarray._reconstruct")
_NDARRAY = _Sentinel("numpy.ndarray")
_DTYPE = _Sentinel("numpy.dtype")
_SCALAR = _Sentinel("numpy.core.multiarray.scalar")
_FROMBUFFER = _Sentinel("numpy.core.numeric._frombuffer")
_ENCODE = _Sentinel("_codecs.encode")
_BYTES = _Sentinel("builtins.bytes")

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    # protocol 5 (Python >= 3.14's default): in-band buffers
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    # protocol 2: bytes are pickled as _codecs.encode(<latin-1 str>, 'latin1'), and b'' as bytes()
    ("_codecs", "encode"): _ENCODE,
    ("__builtin__", "bytes"): _BYTES,
    ("builtins", "bytes"): _BYTES,
}


class _Payload:
    """Bytes that the pickle holds at ``offset`` (``length`` stored bytes), not read."""

    __slots__ = ("offset", "length", "encoding", "data")

    def __init__(self, offset: int | None, length: int, encoding: str = "raw", data: bytes | None = None):
        self.offset = offset
        self.length = length
        self.encoding = encoding
        self.data = data


class _LazyStr:
    """A pickled string that was not read: protocol-2 tensor data (UTF-8 of latin-1 text)."""

    __slots__ = ("offset", "length")

    def __init__(self, offset: int, length: int):
        self.offset = offset
        self.length = length


class _ArrayStub:
    """What ``_reconstruct`` / ``_frombuffer`` return here: nothing allocated, the state kept for checks."""

    __slots__ = ("at", "state")

    def __init__(self, at: int):
        self.at = at
        self.state = None


class _Other:
    """A value we recognise but that is not a tensor (a numpy scalar)."""

    def __init__(self, what: str):
        self.what = what


_EAGER_STR_MAX = 64 * 1024  # longer strings are only ever tensor data (or an attack): never read them here
# Every opcode makes at most one small object (~64-200 bytes with its memo entry), so this bounds the walker's own
# memory to ~1 GB whatever the file says. pickle spends 22-30 opcodes per tensor (measured: 10,000 one-element
# tensors took 240,071 opcodes with protocol 4, 300,059 with protocol 2): room for ~270,000 tensors in one file.
_MAX_OPS = 8_000_000
_MAX_LONG_BYTES = 16
MAX_DIMS = 64
_PICKLE_OPNAMES = {ord(op.code): op.name for op in pickletools.opcodes}
# Opcodes that import or instantiate arbitrary classes: refused as unsafe, by name.
_UNSAFE_OPS = {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "BINPERSID"}


class _PickleWalker:
    """Interprets the pickle opcodes a Paddle state dict uses, reading from ``fh`` and seeking past payloads."""

    def __init__(self, fh, path: Path, size: int):
        self.fh = fh
        self.path = path
        self.size = size
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, object] = {}
        self.own_dtypes: dict[int, np.dtype] = {}
        self.op_at = 0
        self.dispatch = {
            0x80: self._proto, 0x95: self._frame, ord("."): None, ord("("): self._mark, ord("0"): self._pop,
            ord("1"): self._pop_mark, ord("2"): self._dup, ord("}"): lambda: self.stack.append({}),
            ord("]"): lambda: self.stack.append([]), ord(")"): lambda: self.stack.append(()),
            ord("t"): self._tuple,
            0x85: lambda: self._tuple_n(1), 0x86: lambda: self._tuple_n(2), 0x87: lambda: self._tuple_n(3),
            ord("l"): self._list, ord("d"): self._dict,
            ord("a"): self._append, ord("e"): self._appends, ord("s"): self._setitem, ord("u"): self._setitems,
            ord("q"): lambda: self._put(self._u(1)), ord("r"): lambda: self._put(self._u(4)),
            0x94: lambda: self._put(len(self.memo)), ord("h"): lambda: self._get(self._u(1)),
            ord("j"): lambda: self._get(self._u(4)), ord("N"): lambda: self.stack.append(None),
            0x88: lambda: self.stack.append(True), 0x89: lambda: self.stack.append(False),
            ord("J"): lambda: self.stack.append(int.from_bytes(self._read(4), "little", signed=True)),
            ord("K"): lambda: self.stack.append(self._u(1)), ord("M"): lambda: self.stack.append(self._u(2)),
            0x8A: lambda: self._long(self._u(1)), 0x8B: lambda: self._long(self._u(4)),
            ord("G"): lambda: self.stack.append(struct.unpack(">d", self._read(8))[0]),
            ord("X"): lambda: self._string(self._u(4)), 0x8C: lambda: self._string(self._u(1)),
            0x8D: lambda: self._string(self._u(8)), ord("B"): lambda: self._bytes(self._u(4)),
            ord("C"): lambda: self._bytes(self._u(1)), 0x8E: lambda: self._bytes(self._u(8)),
            0x96: lambda: self._bytes(self._u(8)), ord("c"): self._global, 0x93: self._stack_global,
            ord("R"): self._reduce, ord("b"): self._build,
        }

    # -- errors ---------------------------------------------------------------------------------------
    def corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a readable .pdparams file ({what} at byte {self.op_at}); "
            "check that the file was copied completely."
        )

    def crafted(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: {what} at byte {self.op_at}: the file is corrupt or crafted; nothing was allocated "
            "or executed."
        )

    def unsafe(self, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.path} {what}, which a weights file never needs: it may run code when loaded, so it was not "
            "loaded (nothing was executed); re-export the weights from a trusted source (e.g. as .safetensors)."
        )

    # -- input ----------------------------------------------------------------------------------------
    def _read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise self.corrupt(f"the file ends inside a {n}-byte field")
        return data

    def _u(self, n: int) -> int:
        return int.from_bytes(self._read(n), "little")

    def _skip(self, n: int) -> int:
        """Seek past ``n`` payload bytes without reading them; returns their offset."""
        at = self.fh.tell()
        if n > self.size - at:
            raise self.corrupt(f"a {n:,}-byte value at byte {at} runs past the end of the {self.size:,}-byte file")
        self.fh.seek(n, io.SEEK_CUR)
        return at

    # -- the loop -------------------------------------------------------------------------------------
    def run(self):
        fh, dispatch = self.fh, self.dispatch
        for _ in range(_MAX_OPS):
            self.op_at = fh.tell()
            op = fh.read(1)
            if not op:
                raise self.corrupt("the file ends before the pickle's STOP opcode")
            code = op[0]
            if code == 0x2E:  # STOP
                if len(self.stack) != 1 or self.metastack:
                    raise self.corrupt("unbalanced pickle stack at STOP")
                return self.stack.pop()
            handler = dispatch.get(code)
            if handler is None:
                name = _PICKLE_OPNAMES.get(code)
                if name in _UNSAFE_OPS:
                    raise self.unsafe(f"uses the pickle opcode {name} (it builds arbitrary objects)")
                if name is None:
                    raise self.corrupt(f"invalid pickle opcode 0x{code:02x}")
                raise self.corrupt(f"the pickle opcode {name}, which paddle.save never writes,")
            try:
                handler()
            except IndexError as exc:  # pop from an empty stack / metastack
                raise self.corrupt("pickle stack underflow") from exc
        raise self.crafted(f"more than {_MAX_OPS:,} pickle opcodes (a Paddle state dict needs ~30 per tensor)")

    # -- opcodes --------------------------------------------------------------------------------------
    def _proto(self):
        v = self._u(1)
        if not 2 <= v <= 5:
            raise self.corrupt(f"pickle protocol {v} (paddle.save writes 2 to 4)")

    def _frame(self):
        n = self._u(8)
        if n > self.size - self.fh.tell():
            raise self.corrupt(f"a {n:,}-byte pickle frame runs past the end of the {self.size:,}-byte file")

    def _mark(self):
        self.metastack.append(self.stack)
        self.stack = []

    def _pop_mark_items(self) -> list:
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _pop(self):
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark_items()

    def _pop_mark(self):
        self._pop_mark_items()

    def _dup(self):
        self.stack.append(self.stack[-1])

    def _tuple(self):
        items = tuple(self._pop_mark_items())  # (not stack.append(...(pop_mark)): that binds the inner stack)
        self.stack.append(items)

    def _list(self):
        items = self._pop_mark_items()
        self.stack.append(items)

    def _tuple_n(self, n: int):
        if len(self.stack) < n:
            raise IndexError
        items = tuple(self.stack[-n:])
        del self.stack[-n:]
        self.stack.append(items)

    def _dict(self):
        items = self._pop_mark_items()
        if len(items) % 2:
            raise self.corrupt("odd number of items for a dict")
        d: dict = {}
        self._fill_dict(d, items)
        self.stack.append(d)

    def _fill_dict(self, d, items):
        if not isinstance(d, dict):
            raise self.corrupt(f"SETITEM on a {type(d).__name__}")
        for i in range(0, len(items) - 1, 2):
            try:
                d[items[i]] = items[i + 1]
            except TypeError as exc:
                raise self.corrupt(f"unhashable dict key ({exc})") from exc

    def _append(self):
        v = self.stack.pop()
        if not isinstance(self.stack[-1], list):
            raise self.corrupt(f"APPEND to a {type(self.stack[-1]).__name__}")
        self.stack[-1].append(v)

    def _appends(self):
        items = self._pop_mark_items()
        if not isinstance(self.stack[-1], list):
            raise self.corrupt(f"APPENDS to a {type(self.stack[-1]).__name__}")
        self.stack[-1].extend(items)

    def _setitem(self):
        v = self.stack.pop()
        k = self.stack.pop()
        self._fill_dict(self.stack[-1], [k, v])

    def _setitems(self):
        items = self._pop_mark_items()
        if len(items) % 2:
            raise self.corrupt("odd number of items for SETITEMS")
        self._fill_dict(self.stack[-1], items)

    def _put(self, idx: int):
        self.memo[idx] = self.stack[-1]

    def _get(self, idx: int):
        try:
            self.stack.append(self.memo[idx])
        except KeyError:
            raise self.corrupt(f"memo entry {idx} used before it was stored") from None

    def _long(self, n: int):
        if n > _MAX_LONG_BYTES:
            raise self.crafted(f"a {n:,}-byte integer")
        self.stack.append(int.from_bytes(self._read(n), "little", signed=True))

    def _string(self, n: int):
        if (self.stack and self.stack[-1] is _ENCODE) or n > _EAGER_STR_MAX:
            # The argument of _codecs.encode: protocol-2 tensor bytes. Note where they are; read nothing.
            self.stack.append(_LazyStr(self._skip(n), n))
            return
        if n > self.size - self.fh.tell():
            raise self.corrupt(f"a {n:,}-byte string runs past the end of the {self.size:,}-byte file")
        try:
            self.stack.append(self._read(n).decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError as exc:
            raise self.corrupt(f"a string that is not UTF-8 ({exc.reason})") from exc

    def _bytes(self, n: int):
        self.stack.append(_Payload(self._skip(n), n))

    def _resolve(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.corrupt("a global whose name is not a string")
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise self.unsafe(f"references `{module}.{name}`")
        self.stack.append(found)

    def _global(self):
        lines = []
        for _ in range(2):
            line = self.fh.readline(512)
            if not line.endswith(b"\n"):
                raise self.corrupt("an unterminated GLOBAL name")
            lines.append(line[:-1].decode("utf-8", "replace"))
        self._resolve(*lines)

    def _stack_global(self):
        name = self.stack.pop()
        module = self.stack.pop()
        self._resolve(module, name)

    def _reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise self.corrupt("REDUCE with arguments that are not a tuple")
        self.stack[-1] = self._call(func, args)

    def _call(self, func, args: tuple):
        if func is _RECONSTRUCT:
            # numpy's _reconstruct would allocate the shape given here; the real state comes in BUILD.
            if len(args) != 3 or args[0] is not _NDARRAY:
                raise self.unsafe(f"calls numpy's _reconstruct on {args[0] if args else 'nothing'!r}")
            return _ArrayStub(self.op_at)
        if func is _DTYPE:
            if not 1 <= len(args) <= 3 or not isinstance(args[0], str) or len(args[0]) > 32:
                raise self.crafted(f"numpy.dtype called with {args!r:.80}")
            try:
                # copy=True always: BUILD then edits our copy, never numpy's shared float32/... singletons.
                dt = np.dtype(args[0], False, True)
            except (TypeError, ValueError) as exc:
                raise self.crafted(f"an invalid dtype {args[0]!r} ({exc})") from exc
            self.own_dtypes[id(dt)] = dt
            return dt
        if func is _ENCODE:
            if len(args) != 2 or not isinstance(args[1], str) or args[1].lower() not in ("latin1", "latin-1"):
                raise self.unsafe(f"calls `_codecs.encode` with {args[1:]!r:.80} (only 'latin1' is allowed)")
            data = args[0]
            if isinstance(data, _LazyStr):
                return _Payload(data.offset, data.length, "latin1-utf8")
            if isinstance(data, str):
                try:
                    raw = data.encode("latin-1")
                except UnicodeEncodeError as exc:
                    raise self.crafted("`_codecs.encode` of a string that is not latin-1") from exc
                return _Payload(None, len(raw), "raw", raw)
            raise self.unsafe(f"calls `_codecs.encode` on a {type(data).__name__} (only a string is allowed)")
        if func is _BYTES:
            if args:
                raise self.unsafe("calls `bytes` with arguments")
            return _Payload(None, 0, "raw", b"")
        if func is _SCALAR:
            return _Other("a numpy scalar")
        if func is _FROMBUFFER:
            if len(args) != 4 or not isinstance(args[0], _Payload) or args[3] not in ("C", "F"):
                raise self.crafted(f"numpy's _frombuffer called with {args!r:.80}")
            stub = _ArrayStub(self.op_at)
            stub.state = (1, args[2], args[1], args[3] == "F", args[0])
            return stub
        what = func.name if isinstance(func, _Sentinel) else type(func).__name__
        raise self.unsafe(f"calls {what}")

    def _build(self):
        state = self.stack.pop()
        obj = self.stack[-1]
        if isinstance(obj, _ArrayStub):
            if obj.state is not None:
                raise self.crafted("an array whose state is set twice")
            obj.state = state
            return
        if isinstance(obj, np.dtype) and self.own_dtypes.get(id(obj)) is obj:
            if not isinstance(state, tuple) or not all(
                s is None or isinstance(s, (bool, int, str)) for s in state
            ):
                raise self.crafted("a dtype state that is not a flat tuple (structured dtypes are not weights)")
            try:
                obj.__setstate__(state)
            except (TypeError, ValueError) as exc:
                raise self.crafted(f"an invalid dtype state ({exc})") from exc
            return
        raise self.unsafe(f"sets the state of a {type(obj).__name__}")


def _open_pickle(path: Path):
    try:
        fh = open(path, "rb", buffering=1 << 16)
    except OSError as exc:
        raise CheckpointError(f"{path} could not be opened ({exc}).") from exc
    return fh


def sniff_other_format(head: bytes, size: int) -> str | None:
    """What a file that is not a pickle is, from its first bytes: a zip (PyTorch's ``torch.save``, or any zip)
    or a safetensors file saved under a ``.pdparams`` name. None: let the pickle reader judge it."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return ("a zip archive (the format of PyTorch's torch.save), not a Paddle .pdparams pickle; convert it to "
                "Paddle weights (e.g. save_pretrained in PaddleNLP, or safetensors named model.safetensors)")
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return ("a safetensors file, not a Paddle .pdparams pickle; rename it to model.safetensors (an adapter's: "
                "lora_model.safetensors)")
    return None


def walk_pdparams(path: Path):
    with _open_pickle(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        other = sniff_other_format(fh.peek(16)[:16], size)
        if other:
            raise CheckpointError(f"{path} is {other}.")
        walker = _PickleWalker(fh, path, size)
        try:
            return walker.run()
        except CheckpointError:
            raise
        except (OverflowError, MemoryError, RecursionError, ValueError, TypeError, OSError) as exc:
            raise walker.corrupt(f"{type(exc).__name__}: {exc}") from exc
