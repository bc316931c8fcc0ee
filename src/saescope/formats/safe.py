"""Reading tensors from untrusted files: size limits, no pickles, clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import SaescopeError

MAX_HEADER = 16 * 1024 * 1024  # a safetensors header larger than this is hostile or corrupt


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SaescopeError(f"{path} is truncated (not a safetensors file)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > path.stat().st_size - 8:
                raise SaescopeError(f"{path} has a corrupt or oversized header ({n} bytes): not a valid safetensors file")
            json.loads(f.read(n))
        return load_file(str(path))
    except SaescopeError:
        raise
    except Exception as err:  # safetensors raises several types for bad files
        raise SaescopeError(f"cannot read {path}: {str(err)[:200] or type(err).__name__}") from err


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {}
            for k in z.files:
                a = z[k]
                if a.dtype.kind not in "fiu":
                    raise SaescopeError(f"{path}: array '{k}' has dtype {a.dtype}, expected numbers")
                out[k] = torch.from_numpy(np.ascontiguousarray(a))
            return out
    except SaescopeError:
        raise
    except Exception as err:  # np.load raises ValueError for pickles, BadZipFile for corrupt files
        raise SaescopeError(f"cannot read {path} safely: {str(err)[:200] or type(err).__name__}") from err
