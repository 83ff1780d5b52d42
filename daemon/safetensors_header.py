"""Reading a safetensors file's header (tensor names, metadata) without loading a tensor, nor numpy or torch.

The daemon reads headers of base checkpoints (their architecture) and of trained LoRAs (their layout); importing
safetensors' numpy loader for that would keep numpy in the daemon for its whole life.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

# safetensors' own limit on the JSON header; a larger one is not a file we can read.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata from a safetensors file without loading a tensor (nor numpy, nor torch).

    The format: an 8-byte little-endian header length, that many bytes of JSON ({name: {dtype, shape,
    data_offsets}, "__metadata__": {str: str}}), then the tensor bytes, which must end exactly at the file's
    end: a file cut short while saving fails here, as it would in safetensors itself.
    """
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("the file is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"the header claims {length} bytes")
        raw = fh.read(length)
        size = os.fstat(fh.fileno()).st_size
    if len(raw) != length:
        raise ValueError("the header is cut short")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not a string map")
    end = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + length + end != size:
        raise ValueError(f"the tensor data should end at byte {8 + length + end} but the file has {size}")
    return list(header), metadata
