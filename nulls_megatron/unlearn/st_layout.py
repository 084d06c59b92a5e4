"""Where each tensor's bytes sit in a safetensors file (8-byte header length, JSON header, data), so
that rows can be checked or zeroed in the file's own bytes without a load/serialise round trip."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "U8": np.uint8,
          "I64": np.int64, "I32": np.int32, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpan:
    start: int  # absolute byte offset in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(_NUMPY[self.dtype]).itemsize

    def rows(self, raw: bytes | bytearray | memoryview, rows: np.ndarray) -> np.ndarray:
        """The given rows as a numpy array [len(rows), row_bytes / itemsize] (BF16 as its raw uint16 bits)."""
        kind = np.dtype(_NUMPY[self.dtype])
        table = np.frombuffer(raw, dtype=kind, count=self.shape[0] * self.row_bytes // kind.itemsize,
                              offset=self.start).reshape(self.shape[0], -1)
        return table[rows]


def tensor_spans(raw: bytes | bytearray, where: Path) -> dict[str, TensorSpan]:
    """Every tensor's span in the safetensors bytes ``raw`` (from ``where``, named in errors)."""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(bytes(raw[8:8 + n]))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a safetensors file ({e})") from None
    spans = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _NUMPY:
            raise ValueError(f"{where}: tensor {name} has unsupported dtype {info.get('dtype')}")
        spans[name] = TensorSpan(8 + n + info["data_offsets"][0], tuple(info["shape"]), info["dtype"])
    return spans
