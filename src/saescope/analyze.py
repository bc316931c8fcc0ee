"""The feature atlas: what makes every feature of every SAE fire, in one pass.

`analyze(run)` runs the model once over held-out tokens of the run's corpus
(one harvest at all sites of the run's SAEs), encodes every batch with every
SAE, and keeps per feature, in memory that does not grow with the number of
tokens (no dense tokens × features matrix is kept across batches):

- **top**: the `top_k` contexts with the highest activation (a context counts
  once per feature, with its maximum), each as a token window around that
  maximum (`before` tokens before, `after` after, shifted to stay inside the
  context, never over its BOS) with the feature's activation at every token;
- **quantile**: firing tokens spread over activation levels. A random sample of
  up to ``n_quantiles × per_quantile × 2`` firing tokens per feature, at most one
  per context, is drawn during the pass by priority sampling: every firing token
  gets a uniform random key, each context offers its best-keyed token, and the
  largest keys are kept (merged exactly like the top-k). A context is picked with
  probability rising with its number of firing tokens, so the sample follows the
  token distribution closely while never repeating a context. At the end the sample
  is sorted by activation and cut into `n_quantiles` equal-count bins (quantile 0
  = weakest), `per_quantile` examples each: equal-count bins of a random sample
  estimate the activation distribution's quantiles without a second pass;
- **random**: `n_random` windows where the feature is silent (every activation
  in the window is 0), sampled uniformly from a few random centre tokens per batch;
- **statistics**: firing frequency, n_fired, mean activation when firing, max
  activation, and a histogram of firing activations over fixed log-spaced bins
  (``HIST_PER_DECADE`` per decade from 1e-3 to 1e5; the outer bins also hold
  what lies beyond), stored trimmed to the bins that are not empty;
- **logit effects**: the `n_logits` tokens the feature's decoder direction most
  promotes and suppresses through the unembedding: ``W_U @ (g ⊙ d)`` where
  d = ``w_dec[idx]``, mapped through the attention output projection first for
  ``attn_out`` SAEs (their direction lives in o_proj's input), and g the final
  norm's per-dimension gain (measured by probing the norm with a zero-mean,
  unit-RMS vector). The norm's division by the RMS is one positive number per
  token and final-logit soft-capping is monotone, so neither changes the ranking;
  values are in logit units for a unit-RMS residual. The unembedding bias (if
  any) is the same for every direction and left out.

Per-token work is vectorised over the features: codes are turned into
(row, feature, value) triples of the firing entries, reduced per (context,
feature) with scatter operations to at most one candidate per context, and every
keeper (top, quantile sample, random) holds k slots per feature in (k, width)
tensors merged with each batch's (contexts, width) candidates by one top-k. Windows
(tokens and activations) are read while their batch is in memory, for the
entries that enter a keeper only; token ids of contexts still referenced are
kept until the end (a few bytes per token).

Example fields (featuredb.Example): `max_act` is the activation at the
example's centre token (the context maximum for top, the sampled token for
quantile, 0 for random), `pos` that token's position inside the window, `ctx`
the index of the context in the held-out stream (`heldout_stream`: one passage of as many documents as
possible, so that a few thousand tokens show the source's range of topics; label detection reads the
contexts after the analysed ones from the same stream).

Resumable: SAEs whose status is 'done' in features.sqlite are skipped (unless
`force`); the others are restarted cleanly (`FeatureDB.begin_sae` clears them).
Every random draw of an SAE on a batch comes from its own stream, seeded from
(seed, SAE id, batch index) (`batch_stream`), so a resumed analysis, which
passes over the same batches with fewer SAEs, writes the same atlas as an
uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .devices import one_cpu_thread
from .errors import SaescopeError
from .featuredb import Example, FeatureDB, FeatureStats, stored_acts
from .models import LoadedModel, Site
from .runs import Run, as_run, holds_run
from .sae import SAE

log = logging.getLogger(__name__)

HIST_LOG10_MIN, HIST_LOG10_MAX, HIST_PER_DECADE = -3.0, 5.0, 8
HIST_BINS = int((HIST_LOG10_MAX - HIST_LOG10_MIN) * HIST_PER_DECADE)
RANDOM_CENTRES = 8  # random centre tokens tried per batch for non-activating windows
LOGIT_CHUNK = 16_384  # vocabulary rows per unembedding matmul
WRITE_CHUNK = 512  # features per write transaction


@dataclass
class AnalyzeReport:
    """What `analyze` did; `str()` is the CLI's summary line."""

    analysed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done
    n_tokens: int = 0
    n_contexts: int = 0
    seconds_pass: float = 0.0  # the model + SAE pass over the tokens
    seconds_write: float = 0.0  # logit effects + database writes
    examples: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds_pass if self.seconds_pass else 0.0

    def __str__(self) -> str:
        if not self.analysed:
            return f"nothing to analyse: {len(self.skipped)} SAEs already done (use --force to redo them)"
        return (f"analysed {len(self.analysed)} SAEs on {self.n_tokens:,} held-out tokens "
                f"({self.tokens_per_s:.0f} tokens/s, {self.seconds_pass:.0f}s pass + {self.seconds_write:.0f}s "
                f"logits and writes), {self.examples:,} examples"
                + (f"; {len(self.skipped)} already done" if self.skipped else ""))


# --------------------------------------------------------------------------- the pass


@holds_run("analyze")
def analyze(run: Run | str | os.PathLike, n_tokens: int = 16_384, *, top_k: int = 20, n_quantiles: int = 5, per_quantile: int = 2,
            n_random: int = 4, window: tuple[int, int] = (16, 4), n_logits: int = 10, batch_size: int = 8,
            saes: list[str] | None = None, force: bool = False, seed: int | None = None, progress: bool = True,
            lm: LoadedModel | None = None) -> AnalyzeReport:
    """Analyse every SAE of `run` (or those in `saes`) on `n_tokens` held-out tokens → features.sqlite.

    One model pass serves all SAEs. SAEs already 'done' are skipped unless `force`.
    `window` = (tokens before, tokens after) the centre of each example. `seed` (default: the run's
    training seed) seeds the quantile and random examples: each SAE and batch draws from its own
    stream (`batch_stream`), so a resumed analysis writes exactly what an uninterrupted one does.
    """
    _check_args(n_tokens, top_k, n_quantiles, per_quantile, n_random, window, n_logits, batch_size)
    run = as_run(run)
    ids = [run.resolve_sae(s) for s in saes] if saes is not None else run.sae_ids()
    if not ids:
        raise SaescopeError(f"run {run.root} has no SAEs to analyse: train some first (`saescope train`)")
    report = AnalyzeReport()
    with run.db() as db:
        todo = []
        for sae_id in ids:
            if not force and db.sae_status(sae_id) == "done":
                report.skipped.append(sae_id)
            else:
                todo.append(sae_id)
        if not todo:
            return report
        lm = lm or run.model
        models = {i: run.load_sae(i).to(lm.device) for i in todo}
        site_objs = _register(db, run, lm, models)
        corpus = run.corpus()
        config = run.manifest.get("config") or {}
        ctx_len = int(config.get("ctx_len", 256))
        before, after = window
        width_w = min(before + 1 + after, ctx_len - 1)
        if seed is None:
            seed = int((config.get("train") or {}).get("seed", 0))
        atlas = {i: _FeatureAtlas(s, top_k, n_quantiles * per_quantile * 2, n_random, width_w)
                 for i, s in models.items()}
        contexts = _ContextStore()
        t0 = time.perf_counter()
        stream = heldout_stream(corpus, lm.tokenizer, ctx_len)
        _pass(lm, stream, models, site_objs, atlas, contexts, report, n_tokens=n_tokens, batch_size=batch_size,
              before=before, window=width_w, seed=seed, progress=progress)
        report.seconds_pass = time.perf_counter() - t0
        if report.n_tokens == 0:
            raise SaescopeError(f"the held-out part of corpus '{corpus.source}' gave no tokens to analyse: "
                                "use a larger corpus or a larger heldout_fraction")
        if report.n_tokens < n_tokens:
            log.warning("the held-out corpus has only %s tokens (asked for %s): analysed all of them",
                        f"{report.n_tokens:,}", f"{n_tokens:,}")
        t1 = time.perf_counter()
        _write_all(db, lm, models, atlas, contexts, report, n_logits, n_quantiles, per_quantile, progress)
        db.set_meta("analysis", {"n_tokens": report.n_tokens, "n_contexts": report.n_contexts, "ctx_len": ctx_len,
                                 "top_k": top_k, "n_quantiles": n_quantiles, "per_quantile": per_quantile,
                                 "n_random": n_random, "window": [before, after], "n_logits": n_logits,
                                 "part": "heldout", "spread": corpus.order == "shuffled", "seed": seed})
        report.seconds_write = time.perf_counter() - t1
    return report


def _register(db: FeatureDB, run, lm: LoadedModel, models: dict[str, SAE]) -> dict[str, Site]:
    """Check every SAE against the model, store the vocabulary, and mark each SAE begun; its site per SAE id."""
    site_objs = _sites(lm, models)
    _store_vocab(db, lm)
    db.set_meta("model", run.manifest.get("model"))
    for sae_id, sae in models.items():
        site = site_objs[sae_id]
        db.upsert_sae(sae_id, site=sae.cfg.site, layer=sae.cfg.layer, width=sae.cfg.width, d_in=sae.cfg.d_in,
                      hook_name=site.hook_name, path=str(run.sae_path(sae_id)), config=sae.cfg.to_json())
        db.begin_sae(sae_id)
    return site_objs


def _pass(lm: LoadedModel, stream: Iterable[list[int]], models: dict[str, SAE], site_objs: dict[str, Site],
          atlas: dict[str, _FeatureAtlas], contexts: _ContextStore, report: AnalyzeReport, *, n_tokens: int,
          batch_size: int, before: int, window: int, seed: int, progress: bool) -> None:
    """The one model pass: every batch encoded by every SAE and folded into its atlas."""
    from .harvest import harvest

    pending: list[list[int]] = []

    def remember(stream):
        for c in stream:
            pending.append(c)
            yield c

    sites = list({s.key: s for s in site_objs.values()}.values())
    ctx0 = 0
    with torch.no_grad():
        for batch_no, hb in enumerate(harvest(lm, remember(stream), sites, batch_size=batch_size,
                                              max_tokens=n_tokens, progress=progress, desc="analyze")):
            batch_ids = torch.tensor(pending[: hb.n_contexts], dtype=torch.long)
            del pending[: hb.n_contexts]
            batch = _Batch(batch_ids, hb.ctx - ctx0, hb.pos, ctx0, before, window, lm.device)
            contexts.add(ctx0, batch_ids)
            for sae_id, sae in models.items():
                f = encode(sae, hb.acts[site_objs[sae_id].key].to(lm.device))
                with one_cpu_thread(f.device):
                    atlas[sae_id].update(f, batch, batch_stream(seed, sae_id, batch_no, f.device))
            report.n_tokens += int(hb.token_ids.numel())
            ctx0 += hb.n_contexts
            contexts.collect(atlas.values())
    report.n_contexts = ctx0


def _write_all(db: FeatureDB, lm: LoadedModel, models: dict[str, SAE], atlas: dict[str, _FeatureAtlas],
               contexts: _ContextStore, report: AnalyzeReport, n_logits: int, n_quantiles: int, per_quantile: int,
               progress: bool) -> None:
    """Logit effects and database rows of every SAE, one SAE at a time (its atlas freed once written)."""
    bar = tqdm(total=len(models), desc="logits + write", unit="SAE", disable=not progress, dynamic_ncols=True)
    for sae_id, sae in models.items():
        feature_atlas = atlas.pop(sae_id)  # freed once written
        alive = feature_atlas.n_fired.nonzero().squeeze(1)  # dead features get no logit effects
        logits = logit_effects(lm, sae, n_logits, features=alive) if n_logits and alive.numel() else None
        report.examples += _write(db, sae_id, feature_atlas, report.n_tokens, contexts, logits,
                                  n_quantiles, per_quantile)
        db.finish_sae(sae_id, report.n_tokens)
        report.analysed.append(sae_id)
        del feature_atlas
        bar.update(1)
    bar.close()


def batch_stream(seed: int, sae_id: str, batch_no: int, device) -> torch.Generator:
    """The random stream of one SAE on one batch, derived from (seed, SAE id, batch index) only: the
    same whichever other SAEs are analysed in the same pass (a resumed analysis redoes fewer)."""
    digest = hashlib.blake2b(f"{seed}/{sae_id}/{batch_no}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def heldout_stream(corpus, tokenizer, ctx_len: int):
    """The held-out contexts the atlas reads, spread (one passage of every document before a second of any: the
    most topics per token); label detection reads on past the analysed ones in the same stream."""
    return corpus.contexts(tokenizer, part="heldout", ctx_len=ctx_len, spread=True)


def _check_args(n_tokens, top_k, n_quantiles, per_quantile, n_random, window, n_logits, batch_size) -> None:
    for name, value, low in (("n_tokens", n_tokens, 1), ("top_k", top_k, 1), ("n_quantiles", n_quantiles, 1),
                             ("per_quantile", per_quantile, 0), ("n_random", n_random, 0),
                             ("n_logits", n_logits, 0), ("batch_size", batch_size, 1)):
        if int(value) < low:
            raise SaescopeError(f"{name} must be at least {low}, got {value}")
    if len(window) != 2 or min(window) < 0:
        raise SaescopeError(f"window must be (tokens before, tokens after) with both >= 0, got {window}")


def _sites(lm: LoadedModel, models: dict[str, SAE]) -> dict[str, Site]:
    out = {}
    for sae_id, sae in models.items():
        site = lm.site(sae.cfg.site, sae.cfg.layer)
        if site.width != sae.cfg.d_in:
            raise SaescopeError(f"SAE {sae_id} reads {sae.cfg.d_in} dims but {site.hook_name} has {site.width}: "
                                "it belongs to another model")
        out[sae_id] = site
    return out


def _store_vocab(db: FeatureDB, lm: LoadedModel) -> None:
    """Store the tokenizer's token strings once (skipped when the stored vocabulary matches)."""
    tok = lm.tokenizer
    n = len(tok)
    probe = [0, n // 2, n - 1]
    want = [str(t) for t in tok.convert_ids_to_tokens(probe)]
    if db.vocab(probe) == want and db.vocab([n]) == [None]:
        return
    db.set_vocab([str(t) for t in tok.convert_ids_to_tokens(list(range(n)))])


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """SAE codes (n, width), negative codes set to 0: `SAE.codes`."""
    return sae.codes(x)


# --------------------------------------------------------------------------- per-batch state


class _Batch:
    """One harvest batch: its token ids and where each emitted row sits (context b, position t)."""

    def __init__(self, ids: torch.Tensor, b: torch.Tensor, t: torch.Tensor, ctx0: int, before: int, width: int,
                 device):
        self.ids = ids  # (B, T) on CPU
        self.b, self.t = b.to(device), t.to(device)  # (n,)
        self.ctx0 = ctx0
        self.before, self.width = before, width
        n_ctx, ctx_len = ids.shape
        self.ctx_len = ctx_len
        self.rowmap = torch.full((n_ctx, ctx_len), -1, dtype=torch.long, device=device)  # (B, T) → row or -1
        self.rowmap[self.b, self.t] = torch.arange(self.b.numel(), device=device)
        self.offsets = torch.arange(width, device=device)

    @property
    def n(self) -> int:
        return int(self.b.numel())

    def start(self, rows: torch.Tensor) -> torch.Tensor:
        """First window position for centre rows: `before` tokens back, inside [1, T - width]."""
        return (self.t[rows] - self.before).clamp(min=1).clamp(max=max(self.ctx_len - self.width, 1))

    def window_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(E, width) code rows of each centre's window; -1 where a position has no code (BOS/EOS/pad)."""
        grid = self.start(rows)[:, None] + self.offsets  # (E, width)
        return _take(self.rowmap, self.b[rows][:, None] * self.ctx_len + grid)


def _window_acts(f: torch.Tensor, wrows: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """(E, width) activations of feature feats[e] at window rows wrows[e] (0 where no code)."""
    vals = _take(f, wrows.clamp(min=0) * f.shape[1] + feats[:, None])
    return vals.masked_fill_(wrows < 0, 0.0)


def _take(t: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """t.view(-1)[flat_idx] via index_select (several times faster than advanced indexing on CPU)."""
    return torch.index_select(t.reshape(-1), 0, flat_idx.reshape(-1)).view(flat_idx.shape)


def _per_context_best(seg: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, n_seg: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each segment (context × feature): the largest key (-inf if none) and a row holding it (-1)."""
    best = torch.full((n_seg,), -math.inf, device=key.device).scatter_reduce_(0, seg, key, "amax")
    holder = torch.where(key == best[seg], rows, -1)
    row = torch.full((n_seg,), -1, dtype=torch.long, device=key.device).scatter_reduce_(0, seg, holder, "amax")
    return best, row


class _Slots:
    """k slots per feature holding the entries with the largest keys seen so far.

    key (k, width): -inf marks an empty slot. Payload per slot: `val` (activation at
    the centre), `ctx`, `pos` (centre position in its context), `lo` (window start) and,
    when `with_acts`, the window's activations (k, width, window) in float16.
    """

    def __init__(self, k: int, width: int, window: int, with_acts: bool, device):
        self.k, self.window = k, window
        self.key = torch.full((k, width), -math.inf, device=device)
        self.val = torch.zeros((k, width), device=device)
        self.ctx = torch.full((k, width), -1, dtype=torch.int64, device=device)
        self.pos = torch.zeros((k, width), dtype=torch.int32, device=device)
        self.lo = torch.zeros((k, width), dtype=torch.int32, device=device)
        self.acts = torch.zeros((k, width, window), dtype=torch.float16, device=device) if with_acts else None

    def offer(self, key: torch.Tensor, val: torch.Tensor, row: torch.Tensor, f: torch.Tensor, batch: _Batch) -> None:
        """Merge one batch's candidates, given per feature as (c, width) matrices: key (-inf = none),
        activation at the centre, and the centre's code row."""
        k = self.k
        top = torch.cat([self.key, key]).topk(k, dim=0)  # (k, width) best of old ∪ new
        entering = (top.indices >= k) & (top.values > -math.inf)
        n_in = entering.sum(0)  # (width,)
        if not bool(n_in.any()):
            return
        kept = torch.zeros_like(top.indices).scatter_add_(0, top.indices.clamp(max=k - 1), (top.indices < k).long())
        free = kept == 0  # evicted, or empty and not chosen
        self.key.masked_fill_(free, -math.inf)
        # pair the j-th free slot of each feature with its j-th entering candidate
        free_i, free_f = free.nonzero(as_tuple=True)
        slot_of = torch.empty_like(top.indices)  # (j, feature) -> j-th free slot
        slot_of[free.cumsum(0)[free_i, free_f] - 1, free_f] = free_i
        in_i, fidx = entering.nonzero(as_tuple=True)
        slot = slot_of[entering.cumsum(0)[in_i, fidx] - 1, fidx]
        src = top.indices[in_i, fidx] - k  # candidate index in (c, width)
        rows = row[src, fidx]
        self.key[slot, fidx] = key[src, fidx]
        self.val[slot, fidx] = val[src, fidx]
        self.ctx[slot, fidx] = batch.b[rows] + batch.ctx0
        self.pos[slot, fidx] = batch.t[rows].to(torch.int32)
        self.lo[slot, fidx] = batch.start(rows).to(torch.int32)
        if self.acts is not None:
            self.acts[slot, fidx] = _window_acts(f, batch.window_rows(rows), fidx).to(torch.float16)

    def nbytes(self) -> int:
        ts = [self.key, self.val, self.ctx, self.pos, self.lo] + ([self.acts] if self.acts is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


class _FeatureAtlas:
    """Everything kept about one SAE's features during the pass (fixed size)."""

    def __init__(self, sae: SAE, top_k: int, n_sample: int, n_random: int, window: int):
        w = sae.cfg.width
        dev = sae.w_enc.device
        self.width = w
        self.n_fired = torch.zeros(w, dtype=torch.int64, device=dev)
        self.act_sum = torch.zeros(w, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(w * HIST_BINS, dtype=torch.int64, device=dev)
        self.top = _Slots(top_k, w, window, True, dev)
        self.sample = _Slots(n_sample, w, window, True, dev) if n_sample else None
        self.random = _Slots(n_random, w, window, False, dev) if n_random else None

    def update(self, f: torch.Tensor, batch: _Batch, gen: torch.Generator) -> None:
        """Fold one batch of codes f (n, width) in; `gen`: this SAE's random stream for this batch."""
        w = self.width
        flat = f.view(-1).nonzero().squeeze(1)  # firing entries (codes are >= 0), row-major
        vals = _take(f, flat)
        rows, feats = flat // w, flat % w
        ones = torch.ones_like(feats)
        self.n_fired.index_add_(0, feats, ones)
        self.act_sum.index_add_(0, feats, vals.double())
        bins = ((vals.log10() - HIST_LOG10_MIN) * HIST_PER_DECADE).floor_().clamp_(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, feats * HIST_BINS + bins, ones)
        n_ctx = batch.ids.shape[0]
        seg = batch.b[rows] * w + feats  # (context, feature) of each entry
        # top: each context's maximum per feature
        best, row = _per_context_best(seg, vals, rows, n_ctx * w)
        best = best.view(n_ctx, w)
        self.top.offer(best, best, row.view(n_ctx, w), f, batch)
        # quantile sample: a uniform priority per firing token; per context its best token competes
        if self.sample is not None:
            keys = torch.rand(vals.numel(), generator=gen, device=vals.device)
            key, row = _per_context_best(seg, keys, rows, n_ctx * w)
            row = row.view(n_ctx, w)
            val = _take(f, row.clamp(min=0) * w + torch.arange(w, device=f.device))
            self.sample.offer(key.view(n_ctx, w), val, row, f, batch)
        if self.random is not None and batch.n:
            self._random(self.random, f, batch, gen)

    @staticmethod
    def _random(slots: _Slots, f: torch.Tensor, batch: _Batch, gen: torch.Generator) -> None:
        n_c = min(RANDOM_CENTRES, batch.n)
        centres = torch.randperm(batch.n, generator=gen, device=f.device)[:n_c]
        wrows = batch.window_rows(centres)  # (m, window)
        silent = f[wrows.clamp(min=0)].masked_fill_((wrows < 0)[..., None], 0.0).amax(1) <= 0  # (m, width)
        keys = torch.rand(silent.shape, generator=gen, device=f.device).masked_fill_(~silent, -math.inf)
        slots.offer(keys, torch.zeros_like(keys), centres[:, None].expand_as(keys), f, batch)

    def keepers(self) -> list[_Slots]:
        return [s for s in (self.top, self.sample, self.random) if s is not None]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.keepers()) + 8 * (3 * self.width + self.hist.numel())


class _ContextStore:
    """Token ids (int32) of the contexts that examples may still point to."""

    def __init__(self):
        self.ids: dict[int, np.ndarray] = {}
        self._limit = 4096

    def add(self, ctx0: int, ids: torch.Tensor) -> None:
        arr = ids.numpy().astype(np.int32)
        for i, row in enumerate(arr):
            self.ids[ctx0 + i] = row

    def collect(self, atlases) -> None:
        """Drop contexts no slot refers to, once the store has grown past its limit."""
        if len(self.ids) <= self._limit:
            return
        used = torch.cat([s.ctx.flatten() for a in atlases if a is not None for s in a.keepers()]).unique()
        keep = set(used.cpu().tolist())
        self.ids = {c: v for c, v in self.ids.items() if c in keep}
        self._limit = max(4096, 2 * len(self.ids))

    def window(self, ctx: int, lo: int, width: int) -> np.ndarray:
        return self.ids[ctx][lo : lo + width]


# --------------------------------------------------------------------------- logit effects


def norm_gain(lm: LoadedModel) -> torch.Tensor:
    """(d_model,) per-dimension gain of the final norm, probed with a zero-mean unit-RMS vector:
    for RMSNorm and LayerNorm alike, (norm(x) − norm(−x)) / 2x is the gain."""
    norm = lm.final_norm()
    x = torch.ones(lm.d_model, device=lm.device, dtype=lm.dtype)
    x[1::2] = -1
    with torch.no_grad():
        gain = (norm(x[None]) - norm(-x[None]))[0].float() / (2 * x.float())
    return gain


def decoder_directions(lm: LoadedModel, sae: SAE) -> torch.Tensor:
    """(width, d_model) the features' directions in the residual stream: w_dec, mapped through the
    attention output projection for attn_out SAEs (their codes live in o_proj's input)."""
    d = sae.w_dec.detach().to(lm.device)
    if sae.cfg.site == "attn_out" and sae.cfg.type != "transcoder":
        proj = lm.site("attn_out", sae.cfg.layer).module
        with torch.no_grad():
            d = proj(d.to(lm.dtype)) - proj(torch.zeros_like(d[:1], dtype=lm.dtype))
    if d.shape[1] != lm.d_model:
        raise SaescopeError(f"SAE {sae.cfg.folder_name} ({sae.cfg.site}) writes {d.shape[1]} dims, not the "
                            f"model's {lm.d_model}: cannot compute its logit effects")
    return d.float()


@functools.cache
def fast_matmul_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where it multiplies ≥ 1.5× faster than float32 on this device (many recent CPUs), else float32.

    Some CPUs run bf16 matmuls hundreds of times slower than fp32, so this is measured, not assumed.
    """
    a, b = torch.randn(2048, 640, device=device), torch.randn(640, 2048, device=device)

    def best_time(dt):
        x, y = a.to(dt), b.to(dt)
        x @ y
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            x @ y
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    try:
        return torch.bfloat16 if best_time(torch.bfloat16) * 1.5 < best_time(torch.float32) else torch.float32
    except RuntimeError:
        return torch.float32


def logit_effects(lm: LoadedModel, sae: SAE, n: int = 10, features: torch.Tensor | None = None,
                  chunk: int = LOGIT_CHUNK) -> dict[str, torch.Tensor]:
    """Top-`n` promoted / suppressed token ids and values of each feature (or of `features`):
    {"features", "pos_ids", "pos", "neg_ids", "neg"}, each (n_features, n). Computed in
    vocabulary chunks (memory: n_features × chunk floats)."""
    w_u = lm.unembedding()  # (vocab, d_model)
    vocab = min(w_u.shape[0], len(lm.tokenizer))
    n = min(n, vocab)
    dirs = decoder_directions(lm, sae) * norm_gain(lm)  # (width, d_model)
    if features is None:
        features = torch.arange(dirs.shape[0], device=dirs.device)
    dirs = dirs[features.to(dirs.device)]
    width = dirs.shape[0]
    # candidates from a fast pass (bf16 where this CPU/GPU multiplies it faster), exact fp32 values after
    dt = fast_matmul_dtype(dirs.device)
    n_cand = min(4 * n, vocab) if dt != torch.float32 else n
    dirs_fast = dirs.to(dt)
    best = {s: (torch.full((width, 0), 0.0, dtype=dt, device=lm.device),
                torch.zeros((width, 0), dtype=torch.long, device=lm.device)) for s in (1, -1)}
    with torch.no_grad():
        for start in range(0, vocab, chunk):
            block = w_u[start : min(start + chunk, vocab)].to(dt)  # (c, d_model)
            logits = dirs_fast @ block.T  # (width, c) in dt: candidates by their bf16 values (no fp32 copy)
            for sign in (1, -1):
                vals, idx = best[sign]
                top = logits.topk(min(n_cand, logits.shape[1]), dim=1, largest=sign > 0)
                vals = torch.cat([vals, sign * top.values], 1)
                idx = torch.cat([idx, top.indices + start], 1)
                keep = vals.topk(min(n_cand, vals.shape[1]), dim=1).indices
                best[sign] = (vals.gather(1, keep), idx.gather(1, keep))
        if dt != torch.float32:  # exact values of the candidates, then the final top-n
            for sign in (1, -1):
                idx = best[sign][1]  # (width, n_cand)
                exact = torch.einsum("wd,wkd->wk", dirs.float(), w_u[idx].float()) * sign
                keep = exact.topk(min(n, exact.shape[1]), dim=1).indices
                best[sign] = (exact.gather(1, keep), idx.gather(1, keep))
    return {"features": features, "pos": best[1][0], "pos_ids": best[1][1], "neg": -best[-1][0],
            "neg_ids": best[-1][1]}


# --------------------------------------------------------------------------- writing


def _hist(counts: np.ndarray) -> dict | None:
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    edges = 10 ** (HIST_LOG10_MIN + np.arange(lo, hi + 1) / HIST_PER_DECADE)
    return {"edges": [float(f"{e:.6g}") for e in edges], "counts": counts[lo:hi].tolist(), "scale": "log10"}


def _slots_np(slots: _Slots, descending: bool = True) -> dict:
    """Slots as numpy arrays, sorted by key along the slot axis."""
    order = slots.key.argsort(dim=0, descending=descending)
    out = {name: getattr(slots, name).gather(0, order).cpu().numpy()
           for name in ("key", "val", "ctx", "pos", "lo")}
    if slots.acts is not None:  # converted to the stored float16 once here, not per example
        out["acts"] = stored_acts(slots.acts.gather(0, order[..., None].expand_as(slots.acts)).float().cpu().numpy())
    out["window"] = slots.window
    return out


def _write(db: FeatureDB, sae_id: str, atlas: _FeatureAtlas, n_tokens: int, contexts: _ContextStore,
           logits: dict | None, n_quantiles: int, per_quantile: int) -> int:
    """Write one SAE's feature rows and examples; return the number of examples."""
    w = atlas.width
    n_fired = atlas.n_fired.cpu().numpy()
    act_sum = atlas.act_sum.cpu().numpy()
    hist = atlas.hist.view(w, HIST_BINS).cpu().numpy()
    top = _slots_np(atlas.top)
    sample = _slots_np(atlas.sample) if atlas.sample is not None else None
    rand = _slots_np(atlas.random) if atlas.random is not None else None
    max_act = np.where(n_fired > 0, top["val"][0], 0.0)
    logit_lists = _logit_lists(db, logits) if logits is not None else {}
    n_examples = 0
    for start in range(0, w, WRITE_CHUNK):
        stats: list[FeatureStats] = []
        examples: list[Example] = []
        for i in range(start, min(start + WRITE_CHUNK, w)):
            fired = int(n_fired[i])
            lp, ln = logit_lists.get(i, (None, None))
            stats.append(FeatureStats(sae_id, i, frequency=fired / max(n_tokens, 1), n_fired=fired,
                                      max_act=float(max_act[i]), mean_act=float(act_sum[i] / fired) if fired else 0.0,
                                      hist=_hist(hist[i]), logits_pos=lp, logits_neg=ln))
            if fired:
                examples += _examples(sae_id, i, "top", top, contexts, range(top["key"].shape[0]))
                if sample is not None:
                    examples += _quantile_examples(sae_id, i, sample, contexts, n_quantiles, per_quantile)
            if rand is not None:
                examples += _examples(sae_id, i, "random", rand, contexts, range(rand["key"].shape[0]))
        db.write_features(sae_id, stats)
        db.write_examples(sae_id, examples)
        n_examples += len(examples)
    return n_examples


def _logit_lists(db: FeatureDB, logits: dict[str, torch.Tensor]) -> dict[int, tuple[list, list]]:
    """Per feature: its promoted and suppressed [token string, value] lists, as stored."""
    arr = {k: v.cpu().numpy() for k, v in logits.items()}
    all_ids = np.unique(np.concatenate([arr["pos_ids"].ravel(), arr["neg_ids"].ravel()]))
    tok_strings = dict(zip(all_ids.tolist(), db.vocab(all_ids.tolist())))

    def pairs(ids, vals) -> list:
        return [[tok_strings[int(t)], round(float(v), 4)] for t, v in zip(ids, vals)]

    return {int(f): (pairs(arr["pos_ids"][j], arr["pos"][j]), pairs(arr["neg_ids"][j], arr["neg"][j]))
            for j, f in enumerate(arr["features"])}


def _example(sae_id, i, kind, s, j, rank, quantile, contexts) -> Example:
    ctx, lo = int(s["ctx"][j, i]), int(s["lo"][j, i])
    tokens = contexts.window(ctx, lo, s["window"])
    acts = s["acts"][j, i, : len(tokens)] if "acts" in s else np.zeros(len(tokens), dtype=np.float16)
    return Example(sae_id, i, kind, rank, quantile, float(s["val"][j, i]), tokens, acts, ctx=ctx,
                   pos=int(s["pos"][j, i]) - lo)


def _examples(sae_id, i, kind, s, contexts, slots) -> list[Example]:
    out: list[Example] = []
    for j in slots:
        if not np.isfinite(s["key"][j, i]):
            break  # sorted: the rest are empty
        out.append(_example(sae_id, i, kind, s, j, len(out), None, contexts))
    return out


def _quantile_examples(sae_id, i, s, contexts, n_quantiles, per_quantile) -> list[Example]:
    """Cut the feature's sample into equal-count activation bins; `per_quantile` from each
    (the sample's random order decides which)."""
    m = int(np.isfinite(s["key"][:, i]).sum())  # slots are sorted by key: the first m are filled
    if m == 0 or per_quantile == 0:
        return []
    by_act = np.argsort(s["val"][:m, i], kind="stable")  # weakest first
    out: list[Example] = []
    for q in range(n_quantiles):
        members = by_act[q * m // n_quantiles : (q + 1) * m // n_quantiles]
        for rank, j in enumerate(sorted(members)[:per_quantile]):  # sorted slot = random-key order
            out.append(_example(sae_id, i, "quantile", s, int(j), rank, q, contexts))
    return out
