"""SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (read and write).

Targeted: the format that sae-lens 6.x writes with ``SAE.save_model`` and reads with
``SAE.load_from_disk`` (checked against sae-lens 6.54.12 by bench/saelens_crosscheck.py), plus the
pre-6.0 configs it still reads (``hook_point``, ``activation_fn: topk`` with ``activation_fn_kwargs``).

Their tensors: ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``, ``b_dec``, and by architecture

    standard   f = ReLU(x̃ W_enc + b_enc)                                → our relu
    jumprelu   f = ReLU(z)·H(z − θ), z = x̃ W_enc + b_enc  (threshold, or log_threshold)  → jump_relu, θ clamped at 0
    topk       f = ReLU(topk(z)), optionally z·‖W_dec‖ (rescale_acts_by_decoder_norm, folded) → topk
    batchtopk  saved by SAELens as jumprelu with one shared threshold    → batchtopk (runs as jump_relu)
    gated      f = H(x̃ W_enc + b_gate)·ReLU(x̃ (W_enc·e^r_mag) + b_mag)
               = JumpReLU with w_enc = W_enc·e^r_mag, b_enc = b_mag, θ = max(0, b_mag − b_gate·e^r_mag) → jump_relu

with x̃ = x − b_dec when ``apply_b_dec_to_input`` (folded into b_enc on read) and old
``scaling_factor`` tensors (features scaled before decoding) folded into W_dec. Per-token input
normalisations (layer_norm, constant_norm_rescale, covariance_whitening) and dataset-level scaling
that the files do not store (``expected_average_only_in``) cannot be folded: they are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SaescopeError
from ..fsio import atomic_path, write_json
from ..sae import SAE, Architecture
from .common import build, default_l0, hook_fields, tensor
from .hooks import tl_hook_name
from .safe import read_safetensors

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the sae-lens release whose save/load format export targets
SUPPORTED = ("standard", "jumprelu", "topk", "batchtopk", "gated")
_KNOWN_TENSORS = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold", "log_threshold", "b_gate", "b_mag", "r_mag",
                  "scaling_factor", "finetuning_scaling_factor", "topk_threshold"}
_META_KEYS = ("model_name", "hook_name", "hook_point", "hook_head_index", "hook_point_head_index", "hf_hook_name",
              "context_size", "dataset_path", "prepend_bos", "neuronpedia_id", "sae_lens_version",
              "sae_lens_training_version")


def is_saelens(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def read_saelens(folder: str | Path) -> SAE:
    folder = Path(folder)
    where = str(folder)
    from ..sae import read_config

    d = read_config(folder / CFG)
    meta = {k: d[k] for k in _META_KEYS if k in d}
    if isinstance(d.get("metadata"), dict):
        meta.update({k: v for k, v in d["metadata"].items() if v is not None})
    params = read_safetensors(folder / WEIGHTS)
    unknown = sorted(set(params) - _KNOWN_TENSORS)
    if unknown:
        raise SaescopeError(f"{where}: tensors {', '.join(unknown[:5])} are not part of any SAELens SAE saescope "
                            f"can run ({', '.join(SUPPORTED)}): is it a transcoder or another architecture?")
    arch = _architecture(d, params, where)
    if meta.get("hook_head_index", meta.get("hook_point_head_index")) is not None:
        raise SaescopeError(f"{where}: the SAE reads a single attention head (hook_head_index); "
                            "saescope SAEs read whole sites: use an SAE trained on all heads")
    _check_normalisation(d, where)
    out, ours, l0 = _weights(d, params, arch, where)
    fields = _fields(d, meta, arch, ours, l0, tuple(out["w_enc"].shape), where)
    return build(fields, out, where, pre_bias=bool(d.get("apply_b_dec_to_input", True)))


def _weights(d: dict, params: dict[str, torch.Tensor], arch: str,
             where: str) -> tuple[dict[str, torch.Tensor], Architecture, Any]:
    """Our parameters (w_enc, b_enc, w_dec, b_dec, threshold) folded from a SAELens architecture's tensors,
    with our architecture and the L0 the file gives (None when it gives none)."""
    w_enc, b_dec = tensor(params, "W_enc", where, 2), tensor(params, "b_dec", where, 1)
    w_dec = tensor(params, "W_dec", where, 2)
    width = w_enc.shape[1]
    if any("scaling_factor" in n for n in params):
        s = tensor(params, "finetuning_scaling_factor" if "finetuning_scaling_factor" in params
                   else "scaling_factor", where, 1)
        w_dec = w_dec * s[:, None]  # old SAELens scaled features before decoding: (f·s) W_dec = f (s·W_dec)
    out = {"w_dec": w_dec, "b_dec": b_dec}
    ours: Architecture = "relu"
    l0 = None
    if arch == "standard":
        out.update(w_enc=w_enc, b_enc=tensor(params, "b_enc", where, 1))
    elif arch in ("jumprelu", "batchtopk"):
        theta = (tensor(params, "threshold", where, 1) if "threshold" in params
                 else tensor(params, "log_threshold", where, 1).exp() if "log_threshold" in params
                 else tensor(params, "topk_threshold", where).reshape(-1).expand(width))
        out.update(w_enc=w_enc, b_enc=tensor(params, "b_enc", where, 1), threshold=theta.clamp(min=0.0))
        ours = "batchtopk" if arch == "batchtopk" else "jump_relu"
        l0 = d.get("k") if arch == "batchtopk" else None
    elif arch == "topk":
        b_enc = tensor(params, "b_enc", where, 1)
        if d.get("rescale_acts_by_decoder_norm"):
            norm = w_dec.norm(dim=1)  # (width,) z·‖W_dec‖ then decode with W_dec/‖W_dec‖: fold both
            w_enc, b_enc, w_dec = w_enc * norm, b_enc * norm, w_dec / norm[:, None]
            out["w_dec"] = w_dec
        out.update(w_enc=w_enc, b_enc=b_enc)
        given = d.get("activation_fn_kwargs")
        kwargs = given if isinstance(given, dict) else {}
        ours, l0 = "topk", d.get("k", kwargs.get("k"))
        if isinstance(l0, bool) or not isinstance(l0, int | float) or not l0 >= 1:
            raise SaescopeError(f"{where}: a topk SAE needs a positive 'k' in {CFG}, got {l0!r}")
    elif arch == "gated":
        r = tensor(params, "r_mag", where, 1).exp()
        b_mag, b_gate = tensor(params, "b_mag", where, 1), tensor(params, "b_gate", where, 1)
        out.update(w_enc=w_enc * r, b_enc=b_mag, threshold=(b_mag - b_gate * r).clamp(min=0.0))
        ours = "jump_relu"
    return out, ours, l0


def _fields(d: dict, meta: dict, arch: str, ours: Architecture, l0: Any, shape: tuple[int, ...],
            where: str) -> dict:
    """SAEConfig fields from the config and its metadata; `shape` is W_enc's (d_in, width)."""
    d_in, width = shape
    given = meta.get("saescope")
    ours_meta = given if isinstance(given, dict) else {}
    if ours_meta.get("architecture") == "batchtopk" and ours == "jump_relu":
        ours = "batchtopk"  # written by saescope: keep what it was trained as
    l0_name = "k"
    if l0 is None and "l0" in ours_meta:
        l0, l0_name = ours_meta["l0"], "metadata.saescope.l0"
    hook = str(meta.get("hf_hook_name") or meta.get("hook_name") or meta.get("hook_point") or "")
    fields = {"d_in": int(d_in), "width": int(width), "architecture": ours,
              "l0": default_l0(int(width), l0, where, l0_name), "model_name": str(meta.get("model_name") or ""),
              **hook_fields(hook)}
    extra = fields.setdefault("extra", {})
    if meta.get("hook_name") and meta.get("hf_hook_name"):
        extra["tl_hook_name"] = meta["hook_name"]
    extra.update(source_format="saelens", saelens_architecture=arch,
                 saelens_version=meta.get("sae_lens_version") or d.get("sae_lens_version"))
    if l0 is None and ours != "relu":
        extra["l0_nominal"] = True  # the files do not say; measure it with `saescope eval`
    if meta.get("neuronpedia_id"):
        extra["neuronpedia_id"] = meta["neuronpedia_id"]
    return fields


def _architecture(d: dict, params: dict, where: str) -> str:
    arch = str(d.get("architecture") or "standard").lower().replace("_", "")
    if arch == "standard" and d.get("activation_fn", d.get("activation_fn_str")) == "topk":
        arch = "topk"  # pre-6.0 configs
    if arch in ("batchtopk", "matryoshkabatchtopk") and ("threshold" in params or "topk_threshold" in params):
        return "batchtopk"  # saved in inference form: a JumpReLU with one shared threshold
    if arch not in SUPPORTED:
        raise SaescopeError(f"{where}: SAELens architecture '{d.get('architecture')}' is not supported "
                            f"(saescope reads {', '.join(SUPPORTED)})")
    if arch == "standard" and d.get("activation_fn") not in (None, "relu"):
        raise SaescopeError(f"{where}: activation '{d.get('activation_fn')}' is not supported (only relu/topk)")
    return arch


def _check_normalisation(d: dict, where: str) -> None:
    norm = d.get("normalize_activations", "none")
    if norm is True:
        norm = "expected_average_only_in"
    if norm in (None, False, "none"):
        return
    if norm == "expected_average_only_in":
        raise SaescopeError(
            f"{where}: the SAE expects inputs multiplied by a dataset-wide scaling factor that its files do not "
            "store: in SAELens call sae.fold_activation_norm_scaling_factor(factor) and save_model, then import that")
    raise SaescopeError(f"{where}: normalize_activations='{norm}' normalises each token at run time, which "
                        "saescope SAEs cannot express: use an SAE saved with normalize_activations='none'")


# ---------------------------------------------------------------------------- writing


def write_saelens(sae: SAE, folder: str | Path) -> Path:
    """Write one SAE as SAELens' ``save_model`` would, loadable by ``SAE.load_from_disk`` (sae-lens 6.x).

    Weights are written as they are (fp32); the pre-encoder bias is already folded in our SAEs, so
    ``apply_b_dec_to_input`` is false. batchtopk SAEs are written in SAELens' own inference form (jumprelu).
    """
    folder = Path(folder)
    cfg = sae.cfg
    t = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("w_enc", "b_enc", "w_dec", "b_dec")}
    tensors = {"W_enc": t["w_enc"], "W_dec": t["w_dec"], "b_enc": t["b_enc"], "b_dec": t["b_dec"]}
    arch = {"relu": "standard", "jump_relu": "jumprelu", "batchtopk": "jumprelu", "topk": "topk"}[cfg.architecture]
    extra_cfg: dict = {}
    if arch == "jumprelu":
        theta = sae.threshold.detach().float().cpu().contiguous()
        if (theta < 0).any():
            raise SaescopeError(f"SAE {cfg.folder_name} has negative thresholds, which SAELens' JumpReLU "
                                "(ReLU(z)·H(z−θ)) cannot express: clamp them at 0 or retrain")
        tensors["threshold"] = theta
    if arch == "topk":
        extra_cfg = {"k": cfg.k, "rescale_acts_by_decoder_norm": False}
    if cfg.pre_bias:  # not folded (a training form): SAELens subtracts b_dec itself
        extra_cfg["apply_b_dec_to_input"] = True
    tl = tl_hook_name(cfg.site, cfg.layer)
    meta = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None,
            "model_name": cfg.model_name, "hook_name": tl or cfg.hf_hook_point_in, "hook_head_index": None,
            "hf_hook_name": cfg.hf_hook_point_in or None, "prepend_bos": True,
            "saescope": {"site": cfg.site, "layer": cfg.layer, "architecture": cfg.architecture, "l0": cfg.l0}}
    cfg_json = {"architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.width, "dtype": "float32", "device": "cpu",
                "apply_b_dec_to_input": False, "normalize_activations": "none",
                "reshape_activations": "hook_z" if tl.endswith("hook_z") else "none", **extra_cfg, "metadata": meta}
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json(folder / CFG, cfg_json)
    return folder

