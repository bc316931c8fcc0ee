"""Readers and writers for SAE files made by other tools.

`read_sae_folder` recognises a folder by the files in it; each format module
turns its files into (SAEConfig, params) and `SAE.from_params` checks them.

    saescope / Gemma Scope 2   config.json + params.safetensors     gemmascope.read_gs2
    Gemma Scope 1              params.npz                           gemmascope.read_gs1
    SAELens                    cfg.json + sae_weights.safetensors   saelens.read_saelens
    sparsify (EleutherAI)      cfg.json + sae.safetensors           sparsify.read_sparsify

Files are only ever parsed as safetensors / npz without pickles; pickle-based
checkpoints (.pt, .pth, .bin, .pkl, .ckpt) are refused because loading them can run code.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SaescopeError
from ..sae import SAE
from . import gemmascope, saelens, sparsify

KNOWN = ("saescope / Gemma Scope 2 (config.json + params.safetensors), Gemma Scope 1 (params.npz), "
         "SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors)")
FORMATS = ("saescope", "gemmascope1", "saelens", "sparsify")
_PICKLES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def detect_format(folder: Path) -> str | None:
    """The format of one SAE folder by the files present, or None."""
    folder = Path(folder)
    if (folder / "params.safetensors").is_file():
        return "saescope"
    if (folder / "params.npz").is_file():
        return "gemmascope1"
    if saelens.is_saelens(folder):
        return "saelens"
    if sparsify.is_sparsify(folder):
        return "sparsify"
    return None


def read_sae_folder(folder: Path) -> SAE:
    folder = Path(folder)
    if not folder.is_dir():
        raise SaescopeError(f"SAE folder not found: {folder}")
    fmt = detect_format(folder)
    if fmt == "saescope":
        return gemmascope.read_gs2(folder)
    if fmt == "gemmascope1":
        return gemmascope.read_gs1(folder)
    if fmt == "saelens":
        return saelens.read_saelens(folder)
    if fmt == "sparsify":
        return sparsify.read_sparsify(folder)
    raise SaescopeError(_unknown(folder))


def find_sae_folders(root: Path, max_depth: int = 2) -> list[Path]:
    """SAE folders at or below `root` (e.g. a sparsify run with one folder per hookpoint), sorted."""
    root = Path(root)
    if detect_format(root):
        return [root]
    found: list[Path] = []
    level = [root]
    for _ in range(max_depth):
        level = sorted(p for d in level if d.is_dir() for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        found += [p for p in level if detect_format(p)]
        level = [p for p in level if not detect_format(p)]
    return found


def _unknown(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())[:50]
    # SAE folders below come first: a sparsify run keeps its trainer state as .pt files beside them
    subs = find_sae_folders(folder)
    if subs:
        shown = ", ".join(str(p.relative_to(folder)) for p in subs[:5])
        return f"{folder} holds {len(subs)} SAE folders, not one: give one of them ({shown}{' ...' if len(subs) > 5 else ''})"
    pickles = [n for n in names if n.endswith(_PICKLES)]
    if pickles:
        return (f"{folder} holds {', '.join(pickles[:3])}: pickle-based checkpoints are never loaded (they can run "
                f"code); convert them to safetensors first (known formats: {KNOWN})")
    if (folder / "cfg.json").is_file() or (folder / "config.json").is_file():
        return (f"{folder} has a config but no weights file saescope knows (sae_weights.safetensors, sae.safetensors, "
                f"params.safetensors, params.npz): the folder is incomplete (known: {KNOWN})")
    return f"{folder} holds no SAE format saescope knows (known: {KNOWN})"


def load_sae(folder: str | Path) -> SAE:
    """Load an SAE folder in any format saescope reads (ours / Gemma Scope 2, Gemma Scope 1, SAELens, sparsify)."""
    return read_sae_folder(Path(folder))
