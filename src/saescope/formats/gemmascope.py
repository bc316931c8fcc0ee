"""Gemma Scope 1 (params.npz) and Gemma Scope 2 / saescope (config.json + params.safetensors)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SaescopeError
from ..sae import SAE, SAEConfig, read_config
from .safe import read_npz, read_safetensors

_ARCH_ALIASES = {"jumprelu": "jump_relu", "jump_relu": "jump_relu", "topk": "topk", "batchtopk": "batchtopk",
                 "relu": "relu", "standard": "relu"}


def read_gs2(folder: Path) -> SAE:
    params = read_safetensors(folder / "params.safetensors")
    cfg_json = read_config(folder / "config.json") if (folder / "config.json").is_file() else {}
    return SAE.from_params(_config(cfg_json, params, folder), params, where=str(folder))


def read_gs1(folder: Path) -> SAE:
    """Gemma Scope 1 releases hold only params.npz; layer/width/L0 come from the path when present."""
    params = read_npz(folder / "params.npz")
    cfg_json = read_config(folder / "config.json") if (folder / "config.json").is_file() else {}
    path = str(folder)
    if "layer" not in cfg_json and (m := re.search(r"layer_(\d+)", path)):
        cfg_json["layer"] = int(m.group(1))
    if "l0" not in cfg_json and (m := re.search(r"average_l0_(\d+)", path)):
        cfg_json["l0"] = float(m.group(1))
    cfg_json.setdefault("architecture", "jump_relu")
    return SAE.from_params(_config(cfg_json, params, folder), params, where=str(folder))


def _config(d: dict, params: dict, folder: Path) -> SAEConfig:
    if "w_enc" not in params:
        raise SaescopeError(f"{folder}: missing tensor 'w_enc'")
    d_in, width = (int(s) for s in params["w_enc"].shape[:2]) if params["w_enc"].dim() == 2 else (0, 0)
    if params["w_enc"].dim() != 2:
        raise SaescopeError(f"{folder}: tensor 'w_enc' must be 2-D, got shape {tuple(params['w_enc'].shape)}")
    arch = _ARCH_ALIASES.get(str(d.get("architecture", "jump_relu")).lower())
    if arch is None:
        raise SaescopeError(f"{folder}: unknown architecture '{d.get('architecture')}' (known: {', '.join(_ARCH_ALIASES)})")
    if d.get("width") not in (None, width) or d.get("d_in") not in (None, d_in):
        raise SaescopeError(f"{folder}: config says width {d.get('width')}, d_in {d.get('d_in')} but w_enc is {d_in}×{width}")
    l0 = d.get("l0") or min(32.0, width / 2)
    merged = {**d, "d_in": d_in, "width": width, "architecture": arch, "l0": float(min(float(l0), width - 0.5))}
    return SAEConfig.from_json(merged)
