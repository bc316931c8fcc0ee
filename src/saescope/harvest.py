"""One forward pass captures every requested site of every requested layer.

The forward stops right after the last layer that is needed (no LM head), and
positions holding BOS/EOS/pad tokens are dropped from what is emitted. Values are not
judged here: the cache refuses NaN/Inf, the trainer stops only the SAEs they reach. Consumers:
- `harvest(...)`: a streaming iterator of `HarvestBatch` for the trainer (no disk);
- `store.CacheWriter`: the same batches written to an on-disk cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .errors import SaescopeError
from .models import LoadedModel, Site


class HarvestBatch(NamedTuple):
    acts: dict[str, torch.Tensor]  # site key -> (n, width), float32 on the model's device
    token_ids: torch.Tensor  # (n,) token at each emitted position
    ctx: torch.Tensor  # (n,) global index of the context the position came from
    pos: torch.Tensor  # (n,) position inside that context
    n_contexts: int  # contexts consumed by this batch


class _Stop(Exception):
    """Raised by the hook on the last needed layer to end the forward pass early."""


@contextlib.contextmanager
def capture(lm: LoadedModel, sites: list[Site], stop_early: bool = True):
    """Hook `sites`; yields a dict site key -> (batch, seq, width) filled by each forward.

    With `stop_early`, the forward raises `_Stop` after the last needed layer; use
    `run_captured` to call the model under this context.
    """
    store: dict[str, torch.Tensor] = {}
    handles = []

    def keeper(key: str):
        def keep(t: torch.Tensor) -> None:
            store[key] = t

        return keep

    def stop_hook(module, args, output):
        raise _Stop

    try:
        for s in sites:
            handles.append(s.hook(keeper(s.key)))
        if stop_early and sites:
            last = max(s.layer for s in sites)
            handles.append(lm.layers[last].register_forward_hook(stop_hook))
        yield store
    finally:
        for h in handles:
            h.remove()


def run_captured(lm: LoadedModel, input_ids: torch.Tensor, **kwargs):
    """Call the model, treating an early stop as success. Returns the model output or None."""
    try:
        with torch.no_grad():
            return lm.model(input_ids=input_ids.to(lm.device), use_cache=False, **kwargs)
    except _Stop:
        return None


def activations(lm: LoadedModel, input_ids: torch.Tensor, sites: list[Site]) -> dict[str, torch.Tensor]:
    """Activations (batch, seq, width) at `sites` for a batch of token ids (no position dropping)."""
    with capture(lm, sites) as store:
        run_captured(lm, input_ids)
        return dict(store)


@contextlib.contextmanager
def capture_layer_inputs(lm: LoadedModel):
    """Record (args, kwargs) of every decoder layer call during a forward pass."""
    seen: dict[int, tuple] = {}
    handles = []

    def hook(i):
        def fn(module, args, kwargs):
            seen[i] = (args, dict(kwargs))

        return fn

    try:
        for i, layer in enumerate(lm.layers):
            handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_site(site: Site, fn, keep: torch.Tensor):
    """Replace the activation at `site` by fn(activation) at positions where `keep` is True."""

    def swap(t: torch.Tensor) -> torch.Tensor:
        new = fn(t)
        return torch.where(keep[..., None].to(t.device), new.to(t.dtype), t)

    h = site.hook(swap)
    try:
        yield
    finally:
        h.remove()


def run_from(lm: LoadedModel, start: int, layer_inputs: dict, h: torch.Tensor | None = None) -> torch.Tensor:
    """The last layer's residual (batch, seq, d), re-running the layers from `start` on the captured inputs
    (with `h`: from that residual stream instead of layer `start`'s captured input; start = n_layers returns h)."""
    if h is None:
        h = layer_inputs[start][0][0]
    for i in range(start, lm.n_layers):
        a, kw = layer_inputs[i]
        out = lm.layers[i](h, *a[1:], **kw)
        h = out[0] if isinstance(out, tuple) else out
    return h


def keep_mask(lm: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """True where a position holds an ordinary token (not BOS/EOS/pad)."""
    special = torch.tensor(sorted(lm.special_ids), dtype=input_ids.dtype)
    return ~torch.isin(input_ids, special)


def harvest(
    lm: LoadedModel,
    contexts: Iterable[list[int]],
    sites: list[Site],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    skip_contexts: int = 0,
    progress: bool = True,
    desc: str = "harvest",
) -> Iterator[HarvestBatch]:
    """Stream activation batches at `sites` from packed `contexts`.

    Stops once `max_tokens` ordinary tokens were emitted (the last batch is trimmed to
    a whole number of contexts, so resuming by context count is exact).
    `skip_contexts` skips contexts already consumed by an earlier, interrupted run.
    """
    if not sites:
        raise SaescopeError("no sites to harvest: give at least one --sites and --layers")
    it = iter(contexts)
    for _ in range(skip_contexts):
        if next(it, None) is None:
            break
    ctx_index = skip_contexts
    emitted = 0
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        while max_tokens is None or emitted < max_tokens:
            chunk = [c for _, c in zip(range(batch_size), it)]
            if not chunk:
                break
            ids = torch.tensor(chunk, dtype=torch.long)  # (B, T)
            acts = activations(lm, ids, sites)
            keep = keep_mask(lm, ids)  # (B, T)
            b_idx, p_idx = keep.nonzero(as_tuple=True)
            n = int(b_idx.numel())
            b_dev, p_dev = b_idx.to(lm.device), p_idx.to(lm.device)
            out = {k: v[b_dev, p_dev].float() for k, v in acts.items()}  # stays on the model's device
            batch = HarvestBatch(out, ids[b_idx, p_idx], b_idx + ctx_index, p_idx, len(chunk))
            ctx_index += len(chunk)
            emitted += n
            bar.update(n if max_tokens is None else min(n, max_tokens - bar.n))
            yield batch
    finally:
        bar.close()
