"""Hook names other tools use, mapped to saescope sites (resid_post, attn_out, mlp_out, mlp_in) and layers.

Two naming schemes exist in the wild:

- TransformerLens (SAELens): ``blocks.{L}.hook_resid_post``, ``blocks.{L}.attn.hook_z`` (concatenated
  heads before the output projection = our attn_out), ``blocks.{L}.hook_mlp_out``, and
  ``blocks.{L+1}.hook_resid_pre`` (the same tensor as ``blocks.{L}.hook_resid_post``).
- Hugging Face module paths (Gemma Scope 2, sparsify, saescope): ``model.layers.{L}.output``,
  ``model.layers.{L}.self_attn.o_proj.input``, ``model.layers.{L}.post_feedforward_layernorm.output``,
  ``layers.{L}.mlp`` (sparsify hooks a module's output unless it trains a transcoder).

A parsed HF name keeps the module path inside the layer, so `interop.import_sae` can check that it is
the very module saescope hooks for that site in the run's model (Gemma's ``mlp.output`` is not its
``post_feedforward_layernorm.output``). TransformerLens names carry no module path; they are mapped by
meaning only (note: TransformerLens may centre the residual stream of a processed model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TL_SITES = {"hook_resid_post": "resid_post", "attn.hook_z": "attn_out", "hook_mlp_out": "mlp_out"}
_HF = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)(?:\.(.+))?$")
_ATTN = ("self_attn", "attn", "attention", "self_attention")
_ATTN_PROJ = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_MLP = ("mlp", "feed_forward", "ffn")


@dataclass(frozen=True)
class HookRef:
    """Where an SAE reads: our site kind and layer, plus how the other tool named it."""

    site: str  # one of saescope's site kinds, or "" when saescope has no such site
    layer: int
    name: str  # the name as the other tool wrote it
    style: str  # "tl" (TransformerLens) or "hf" (Hugging Face module path)
    path_in_layer: str = ""  # HF only: module path inside the layer ("" = the layer itself)
    io: str = "output"  # HF only: "input" or "output" of that module

    @property
    def hf_name(self) -> str:
        """The Gemma Scope 2 style name (``model.layers.3.output``) when known, else ""."""
        if self.style != "hf":
            return ""
        return self.name if self.name.endswith((".input", ".output")) else f"{self.name}.{self.io}"


def parse_hook_name(name: str, *, transcode: bool = False) -> HookRef | None:
    """Map a TransformerLens or Hugging Face hook name to a site; None when it names no layer.

    `transcode` is sparsify's flag: a transcoder reads its module's *input*.
    """
    name = str(name or "").strip()
    if not name or len(name) > 500:
        return None
    if m := _TL.match(name):
        layer, rest = int(m.group(1)), m.group(2)
        if rest == "hook_resid_pre":
            return HookRef("resid_post", layer - 1, name, "tl") if layer > 0 else HookRef("", 0, name, "tl")
        return HookRef(_TL_SITES.get(rest, ""), layer, name, "tl")
    base, dot, suffix = name.rpartition(".")
    io = suffix if dot and suffix in ("input", "output") else ("input" if transcode else "output")
    m = _HF.match(base if dot and suffix in ("input", "output") else name)
    if not m:
        return None
    layer, path = int(m.group(1)), m.group(2) or ""
    return HookRef(_hf_site(path, io), layer, name, "hf", path, io)


def _hf_site(path: str, io: str) -> str:
    parts = path.split(".") if path else []
    if not parts:
        return "resid_post" if io == "output" else ""
    if len(parts) == 2 and parts[0] in _ATTN and parts[1] in _ATTN_PROJ and io == "input":
        return "attn_out"
    if parts == ["post_feedforward_layernorm"] and io == "output":
        return "mlp_out"
    if parts == ["pre_feedforward_layernorm"] and io == "output":
        return "mlp_in"
    if len(parts) == 1 and parts[0] in _MLP:
        return "mlp_out" if io == "output" else "mlp_in"
    return ""


def tl_hook_name(site: str, layer: int) -> str:
    """The TransformerLens name SAELens uses for one of our sites ("" where TransformerLens has none)."""
    return {"resid_post": f"blocks.{layer}.hook_resid_post", "attn_out": f"blocks.{layer}.attn.hook_z",
            "mlp_out": f"blocks.{layer}.hook_mlp_out"}.get(site, "")
