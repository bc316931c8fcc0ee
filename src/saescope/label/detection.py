"""Held-out detection windows with exact activations: text no labeller ever saw, for scoring labels.

The analysis stores, per feature, 20 top and 10 quantile windows (half of them for
labelling, half held out) and only 4 windows where it is silent. A detection score
built on those is balanced accuracy over ~15 firing and 4 silent windows: its
true-negative rate can only be 0, ¼, ½, ¾ or 1, so a label's score is mostly noise.

This module makes the test sound, as EleutherAI's delphi does it: many held-out
firing *and* silent windows per feature, truth read from the feature's activations.

    detection_set(run)   runs the model over `n_contexts` held-out contexts that the
                         analysis did not read (the next ones in the same held-out stream),
                         encodes them with every SAE, and cuts each context into windows
                         of the analysis's width: the max activation of every feature in
                         every window, exactly (float32).
    held_out_windows(..) a feature's scoring windows: its stored held-out windows (odd-
                         ranked top/quantile, its random ones) plus up to `max_positive`
                         fresh windows where it fires and up to `max_negative` where it is
                         silent, chosen by a seed that depends only on the feature.

The fresh text is disjoint from everything the labeller reads (the analysis's contexts,
which hold every labelling window and every background window), so no label can have
been fitted on it. Without the model (moved weights, no corpus) there is no set and
the scores fall back to the stored windows alone, saying so in their details.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from dataclasses import dataclass

import numpy as np

from .evidence import Context, Evidence, TokenTable

log = logging.getLogger(__name__)

PROTOCOL_STORED = "stored"  # the analysis's held-out windows only (≈15 firing, 4 silent)
PROTOCOL_FRESH = "fresh"  # plus fresh held-out windows with exact activations (this module)


@dataclass(frozen=True)
class DetectionConfig:
    """How many fresh windows a detection score uses (defaults: bench/RESULTS.md, issue 18)."""

    n_contexts: int = 8  # fresh held-out contexts run through the model (ctx_len tokens each)
    max_positive: int = 20  # fresh firing windows per feature, on top of its stored held-out ones
    max_negative: int = 60  # fresh silent windows per feature, on top of its stored random ones
    batch_size: int = 4


@dataclass
class DetectionSet:
    """Fresh held-out windows and every feature's max activation in each (see module docstring)."""

    ids: np.ndarray  # (n_windows, window) token ids
    max_acts: dict[str, np.ndarray]  # sae_id → (n_windows, width) float32 max activation per window
    config: DetectionConfig
    tokens: list[tuple[str, ...]] | None = None  # display text per window (set by `attach_tokens`)
    id_tuples: list[tuple[int, ...]] | None = None  # the same windows' ids as tuples (set by `attach_tokens`)

    def attach_tokens(self, table: TokenTable) -> None:
        if self.tokens is None:
            self.tokens = [tuple(table.display(row.tolist())) for row in self.ids]
            self.id_tuples = [tuple(row.tolist()) for row in self.ids]  # built once, not once per feature

    def windows(self, sae_id: str, idx: int) -> list[Context]:
        """Fresh windows for one feature: up to max_positive firing, up to max_negative silent."""
        acts = self.max_acts.get(sae_id)
        if acts is None or idx >= acts.shape[1] or self.tokens is None or self.id_tuples is None:
            return []
        col = acts[:, idx]
        rng = np.random.default_rng(_seed(sae_id, idx))
        fire, silent = np.flatnonzero(col > 0), np.flatnonzero(col <= 0)
        pick = np.concatenate([rng.permutation(fire)[: self.config.max_positive],
                               rng.permutation(silent)[: self.config.max_negative]])
        return [_context(self.id_tuples[j], self.tokens[j], float(col[j]), k) for k, j in enumerate(np.sort(pick))]


def _seed(sae_id: str, idx: int) -> int:
    return int.from_bytes(hashlib.sha256(f"detect:{sae_id}:{idx}".encode()).digest()[:8], "little")


def _context(ids: tuple[int, ...], tokens: tuple[str, ...], max_act: float, rank: int) -> Context:
    # Per-token activations are not kept (only the window's max): scoring reads `fires` alone.
    return Context(kind="fresh", rank=rank, quantile=None, max_act=max_act, ids=ids, tokens=tokens,
                   acts=(max_act,) + (0.0,) * (len(ids) - 1))


def held_out_windows(evidence: Evidence, fresh: DetectionSet | None) -> tuple[list[Context], str]:
    """(contexts, protocol) that a label of this feature is scored on."""
    if fresh is None:
        return list(evidence.held_out), PROTOCOL_STORED
    extra = fresh.windows(evidence.sae_id, evidence.idx)
    return list(evidence.held_out) + extra, (PROTOCOL_FRESH if extra else PROTOCOL_STORED)


# --------------------------------------------------------------------------- building the set


def detection_set(run, sae_ids: list[str], config: DetectionConfig | None = None) -> DetectionSet | None:
    """Run the model over fresh held-out contexts and record every feature's max activation per
    window; None (with a warning) when the run's model, corpus or SAE weights cannot be read."""
    config = config or DetectionConfig()
    try:
        return _detection_set(run, sae_ids, config)
    except Exception as err:  # noqa: BLE001 (optional: labels never fail for it; e.g. a corrupt SAE file)
        log.warning("detection uses the stored held-out windows only (no fresh windows: %s: %s)",
                    type(err).__name__, err)
        return None


def _detection_set(run, sae_ids: list[str], config: DetectionConfig) -> DetectionSet | None:
    import torch

    from ..analyze import _sites, heldout_stream
    from ..harvest import activations, keep_mask

    with run.db(readonly=True) as db:
        meta = db.get_meta("analysis") or {}
    if not meta or not sae_ids:
        return None
    width = min(sum(meta.get("window", (16, 4))) + 1, int(meta.get("ctx_len", 256)) - 1)
    lm = run.model
    models = {i: run.load_sae(i).to(lm.device) for i in sae_ids}
    sites = _sites(lm, models)
    stream = heldout_stream(run.corpus(), lm.tokenizer, int(meta.get("ctx_len", 256)))  # the one analysed
    skip = int(meta.get("n_contexts", 0))  # the contexts after the analysed ones
    contexts = [list(ctx) for ctx in itertools.islice(stream, skip, skip + config.n_contexts)]
    if not contexts:
        return None
    ids_out: list = []
    acts_out: dict[str, list] = {i: [] for i in models}
    for start in range(0, len(contexts), config.batch_size):
        ids = torch.tensor(contexts[start:start + config.batch_size], dtype=torch.long)
        keep = keep_mask(lm, ids).to(lm.device)  # (B, T)
        with torch.no_grad():
            acts = activations(lm, ids, list({s.key: s for s in sites.values()}.values()))
            starts = list(range(1, ids.shape[1] - width + 1, width))  # position 0 is BOS
            ids_out += [ids[b, s:s + width].numpy() for b in range(len(ids)) for s in starts]
            for sae_id, sae in models.items():
                x = acts[sites[sae_id].key]
                f = sae.codes(x.reshape(-1, x.shape[-1]).float()).reshape(*x.shape[:2], -1) * keep[..., None]
                acts_out[sae_id] += [f[b, s:s + width].amax(0).cpu().numpy() for b in range(len(ids))
                                     for s in starts]
    return DetectionSet(ids=np.stack(ids_out), max_acts={i: np.stack(v) for i, v in acts_out.items()},
                        config=config)


