"""EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors``, one folder per hookpoint.

A sparsify run saves ``<run>/<hookpoint>/{cfg.json, sae.safetensors}`` with hookpoints named by
module path (``layers.6``, ``layers.6.mlp``, ``gpt_neox.layers.6``); the folder name is the hookpoint.
Its TopK coder (``SparseCoder.encode``/``decode``, read from the sparsify sources, 2025):

    z     = (x − b_dec) @ encoder.weightᵀ + encoder.bias     # b_dec subtracted first (not for transcoders)
    f     = top-k of ReLU(z)                                   # k from cfg.json
    x̂     = f @ W_dec + b_dec                                  # W_dec (num_latents, d_in)

which is our topk with w_enc = encoder.weightᵀ and the b_dec subtraction folded into b_enc.
Transcoders (``transcode``), skip connections (``W_skip``) and the ``groupmax`` activation are refused.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SaescopeError
from ..sae import SAE, read_config
from .common import build, default_l0, hook_fields, tensor
from .safe import read_safetensors

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
_KNOWN_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


def is_sparsify(folder: Path) -> bool:
    return (folder / CFG).is_file() and (folder / WEIGHTS).is_file()


def read_sparsify(folder: str | Path) -> SAE:
    folder = Path(folder)
    where = str(folder)
    d = read_config(folder / CFG)
    if d.get("transcode"):
        raise SaescopeError(f"{where}: this is a sparsify transcoder (transcode: true); saescope imports SAEs only")
    if d.get("skip_connection") or d.get("embed_skip"):
        raise SaescopeError(f"{where}: sparsify skip connections are not supported: use a coder trained without one")
    if d.get("activation", "topk") != "topk":
        raise SaescopeError(f"{where}: sparsify activation '{d.get('activation')}' is not supported (only topk)")
    params = read_safetensors(folder / WEIGHTS)
    unknown = sorted(set(params) - _KNOWN_TENSORS)
    if unknown:
        raise SaescopeError(f"{where}: tensors {', '.join(unknown[:5])} are not part of a sparsify TopK SAE "
                            "(skip connections and transcoders are not supported)")
    enc = tensor(params, "encoder.weight", where, 2)  # (width, d_in)
    width, d_in = enc.shape
    if d.get("d_in") not in (None, d_in):
        raise SaescopeError(f"{where}: cfg.json says d_in {d.get('d_in')} but encoder.weight is {width}×{d_in}")
    k = d.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < width:
        raise SaescopeError(f"{where}: cfg.json needs an integer 'k' between 1 and {width - 1}, got {k!r}")
    out = {"w_enc": enc.T, "b_enc": tensor(params, "encoder.bias", where, 1),
           "w_dec": tensor(params, "W_dec", where, 2), "b_dec": tensor(params, "b_dec", where, 1)}
    fields = {"d_in": int(d_in), "width": int(width), "architecture": "topk", "l0": default_l0(int(width), k, where),
              "model_name": _model_name(folder), **hook_fields(folder.name)}
    fields.setdefault("extra", {}).update(source_format="sparsify", sparsify_hookpoint=folder.name)
    return build(fields, out, where, pre_bias=True)


def _model_name(folder: Path) -> str:
    """sparsify's run config (one level up) names the model when the run was saved by its CLI."""
    path = folder.parent / "config.json"
    if not path.is_file() or path.stat().st_size > 1_000_000:
        return ""
    try:
        model = read_config(path).get("model", "")
    except SaescopeError:
        return ""
    return model if isinstance(model, str) else ""
