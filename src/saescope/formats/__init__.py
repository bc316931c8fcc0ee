"""Readers and writers for SAE files made by other tools.

`read_sae_folder` recognises a folder by the files in it; each format module
turns its files into (SAEConfig, params) and `SAE.from_params` checks them.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SaescopeError
from ..sae import SAE
from . import gemmascope

KNOWN = "saescope / Gemma Scope 2 (config.json + params.safetensors), Gemma Scope 1 (params.npz)"


def read_sae_folder(folder: Path) -> SAE:
    folder = Path(folder)
    if not folder.is_dir():
        raise SaescopeError(f"SAE folder not found: {folder}")
    if (folder / "params.safetensors").is_file():
        return gemmascope.read_gs2(folder)
    if (folder / "params.npz").is_file():
        return gemmascope.read_gs1(folder)
    raise SaescopeError(f"{folder} holds no SAE format saescope knows (known: {KNOWN})")
