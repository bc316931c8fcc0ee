"""Helpers the format readers share: typed tensor access, config building, exact pre-bias folding."""

from __future__ import annotations

import torch

from ..errors import SaescopeError
from ..sae import SAE, SAEConfig, l0_problem
from .hooks import HookRef, parse_hook_name


def tensor(params: dict[str, torch.Tensor], name: str, where: str, ndim: int | None = None) -> torch.Tensor:
    """A float tensor from a checkpoint, as float64 for exact folding; clear errors for anything else."""
    if name not in params:
        raise SaescopeError(f"{where}: missing tensor '{name}' (the file is incomplete or not this format)")
    t = params[name]
    if not torch.is_floating_point(t):
        raise SaescopeError(f"{where}: tensor '{name}' has dtype {t.dtype}, expected a float type")
    if ndim is not None and t.dim() != ndim:
        raise SaescopeError(f"{where}: tensor '{name}' must be {ndim}-D, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def default_l0(width: int, l0=None, where: str = "", name: str = "k") -> float:
    """The target L0 a file gives (checked: a finite number above 0, below the width), or the
    nominal 32 (or width/2) when it gives none. Never clamps a given value."""
    if l0 is None:
        return min(32.0, width / 2)
    if (problem := l0_problem(l0, width, name)) is not None:
        raise SaescopeError(f"{where}: {problem}")
    return float(l0)


def hook_fields(name: str, *, transcode: bool = False) -> dict:
    """SAEConfig fields (site, layer, hf_hook_point_in) from another tool's hook name."""
    ref = parse_hook_name(name, transcode=transcode)
    if ref is None:
        return {"extra": {"hook_name": name}} if name else {}
    out = {"layer": ref.layer, "site": ref.site, "extra": {"hook_name": name, "hook_style": ref.style}}
    if ref.hf_name:
        out["hf_hook_point_in"] = ref.hf_name
    return out


def hook_ref(cfg: SAEConfig) -> HookRef | None:
    """Where an SAE reads, from its recorded hook names (HF name first)."""
    for name in (cfg.hf_hook_point_in, cfg.extra.get("hook_name", "")):
        if name and (ref := parse_hook_name(name)) is not None:
            return ref
    return None


def build(cfg_fields: dict, params: dict[str, torch.Tensor], where: str, *, pre_bias: bool) -> SAE:
    """Check the parameters with `SAE.from_params`, then fold the pre-encoder bias in float64.

    With pre_bias, z = (x − b_dec) @ w_enc + b_enc = x @ w_enc + (b_enc − b_dec @ w_enc): same codes.
    """
    extra = cfg_fields.pop("extra", {})
    cfg = SAEConfig.from_json({**cfg_fields, "pre_bias": False, **extra})
    folded = dict(params)
    if pre_bias:
        b_dec, w_enc = tensor(params, "b_dec", where, 1), tensor(params, "w_enc", where, 2)
        if b_dec.shape[0] != w_enc.shape[0]:
            raise SaescopeError(f"{where}: b_dec has {b_dec.shape[0]} entries but w_enc reads {w_enc.shape[0]}")
        b_enc = tensor(params, "b_enc", where, 1)
        if b_enc.shape[0] != w_enc.shape[1]:
            raise SaescopeError(f"{where}: b_enc has {b_enc.shape[0]} entries but w_enc has {w_enc.shape[1]} columns")
        folded["b_enc"] = b_enc - b_dec @ w_enc
    return SAE.from_params(cfg, folded, where=where)
