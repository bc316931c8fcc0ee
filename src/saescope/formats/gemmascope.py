"""Gemma Scope 1 (params.npz) and Gemma Scope 2 / saescope (config.json + params.safetensors)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SaescopeError
from ..sae import SAE, SAEConfig, config_problems, read_config
from .hooks import parse_hook_name
from .safe import read_npz, read_safetensors

_ARCH_ALIASES = {"jumprelu": "jump_relu", "jump_relu": "jump_relu", "topk": "topk", "batchtopk": "batchtopk",
                 "relu": "relu", "standard": "relu"}


def read_gs2(folder: Path) -> SAE:
    params = read_safetensors(folder / "params.safetensors")
    if "affine_skip_connection" in params:
        raise SaescopeError(f"{folder}: skip transcoders (affine_skip_connection) are not supported yet: "
                            "use a Gemma Scope 2 SAE or plain transcoder")
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
    if "site" not in cfg_json and (m := re.search(r"gemma-scope-[^/]*-(res|att|mlp)(?:-|/|$)", path)):
        cfg_json["site"] = {"res": "resid_post", "att": "attn_out", "mlp": "mlp_out"}[m.group(1)]
    cfg_json.setdefault("architecture", "jump_relu")
    return SAE.from_params(_config(cfg_json, params, folder), params, where=str(folder))


def _config(d: dict, params: dict, folder: Path) -> SAEConfig:
    """Our config from a config.json (or what a release path says) and the weights' shapes.

    Every field is checked for type and range first: all problems are reported, one line each.
    """
    if "w_enc" not in params:
        raise SaescopeError(f"{folder}: missing tensor 'w_enc'")
    if params["w_enc"].dim() != 2:
        raise SaescopeError(f"{folder}: tensor 'w_enc' must be 2-D, got shape {tuple(params['w_enc'].shape)}")
    d_in, width = (int(s) for s in params["w_enc"].shape)
    problems = config_problems(d, width=width)
    arch = d.get("architecture") or "jump_relu"
    if isinstance(arch, str) and _ARCH_ALIASES.get(arch.lower()) is None:
        problems.append(f"unknown architecture '{arch}' (known: {', '.join(_ARCH_ALIASES)})")
    for name, size in (("width", width), ("d_in", d_in)):
        if isinstance(d.get(name), int) and not isinstance(d[name], bool) and d[name] != size:
            problems.append(f"config says {name} {d[name]} but the weights (w_enc {d_in}×{width}) have {size}")
    if problems:
        where = folder / "config.json" if (folder / "config.json").is_file() else folder
        raise SaescopeError("\n".join(f"{where}: {p}" for p in problems))
    merged = {**d, "d_in": d_in, "width": width, "architecture": _ARCH_ALIASES[arch.lower()]}
    if "l0" not in d:  # the files do not give a target L0: a nominal one (measure it with `saescope eval`)
        merged["l0"] = min(32.0, width / 2)
        merged["l0_nominal"] = True
    ref = parse_hook_name(d.get("hf_hook_point_in") or "")
    if ref is not None and ref.site:  # Gemma Scope 2 configs name the hook, not our site/layer
        if not merged.get("site"):
            merged["site"] = ref.site
        if merged.get("layer", -1) in (-1, None):
            merged["layer"] = ref.layer
    return SAEConfig.from_json(merged)
