"""Hand-made .pdparams pickles for tests/test_checkpoint_weights.py: crafted, corrupt and unusual-but-legal files.

Each helper pickles objects whose ``__reduce__`` mimics numpy's, so the files reference only the
globals a real Paddle file references, yet declare whatever shape, dtype or bytes the test wants.
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path

import numpy as np


class FakeArray:
    """Pickles like ``numpy.ndarray`` (``_reconstruct`` + ``__setstate__`` state), with any state."""

    def __init__(self, shape, dtype, data, fortran=False, version=1, alloc_shape=(0,)):
        self.shape, self.dtype, self.data, self.fortran, self.version = shape, dtype, data, fortran, version
        self.alloc_shape = alloc_shape  # what numpy's own _reconstruct would allocate (numpy writes (0,))

    def __reduce__(self):
        dtype = self.dtype if not isinstance(self.dtype, str) else np.dtype(self.dtype)
        return (np.core.multiarray._reconstruct, (np.ndarray, self.alloc_shape, b"b"),
                (self.version, self.shape, dtype, self.fortran, self.data))


class SharedDtype:
    """Pickles like ``numpy.dtype('f4')`` but asks for *no copy* and a big-endian state: with the real
    ``pickle.load`` this rewrites numpy's process-wide float32 dtype object."""

    def __reduce__(self):
        return (np.dtype, ("f4", False, False), (3, ">", None, None, None, -1, -1, 0))


class Encode:
    """``_codecs.encode(text, encoding)`` as a pickled call."""

    def __init__(self, text, encoding):
        self.text, self.encoding = text, encoding

    def __reduce__(self):
        return (_codecs.encode, (self.text, self.encoding))


def dump(obj, path: Path, protocol: int = 4) -> Path:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)
    return path


def huge_declared(path: Path, protocol: int = 4, shape=(10**12,)) -> Path:
    """A ~170-byte file: one float64 array that declares ``shape`` and carries 8 bytes.

    ``shape`` is also handed to ``_reconstruct``, which (the real one) allocates it before the state is checked.
    """
    return dump({"w": FakeArray(shape, "float64", b"\0" * 8, alloc_shape=shape)}, path, protocol)


def sliced_like_paddle(arrays: dict[str, np.ndarray], max_elements: int, path: Path, protocol: int) -> Path:
    """The ``UnpackBigParamInfor@@`` layout of paddle's ``_unpack_saved_dict`` (protocol < 4), with a small slice size.

    paddle only slices tensors over 2**30 - 1 bytes; this writes the same structure for small arrays so
    ``paddle.load`` (which glues the slices back) can be compared with our reader in a fast test.
    """
    saved, info = {}, {}
    for key, value in arrays.items():
        n = int(np.prod(value.shape))
        if n > max_elements:
            info[key] = {"OriginShape": value.shape, "slices": []}
            flat = value.flatten()
            for i in range(-(-n // max_elements)):
                part = f"{key}@@.{i}"
                info[key]["slices"].append(part)
                saved[part] = flat[i * max_elements:(i + 1) * max_elements]
        else:
            saved[key] = value
    saved["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(arrays)}
    saved["UnpackBigParamInfor@@"] = info
    return dump(saved, path, protocol)


def os_system_protocol2(path: Path, marker: Path) -> Path:
    """The classic pickle bomb written with protocol 2 (a GLOBAL opcode, not STACK_GLOBAL)."""

    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    return dump({"w": Payload()}, path, protocol=2)


def inst_opcode_bomb(path: Path, marker: Path) -> Path:
    """The INST opcode imports and calls ``os.system`` by itself, without any GLOBAL or REDUCE."""
    cmd = f"touch {marker}".encode()
    path.write_bytes(b"(X" + len(cmd).to_bytes(4, "little") + cmd + b"ios\nsystem\n.")
    return path
