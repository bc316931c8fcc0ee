"""A feature's evidence, read from features.sqlite, split into labelling and held-out parts.

The analysis stores three kinds of example contexts per feature: `top` (highest
activations), `quantile` (spread over activation levels) and `random` (contexts
where the feature does not fire). A label must be judged on contexts it was not
written from, so the split is fixed and deterministic:

    top / quantile, even rank  → labelling   (shown to the labeller)
    top / quantile, odd rank   → held out    (activating contexts for scoring)
    random, every rank         → held out    (non-activating contexts for scoring)

Ranks count within (kind, quantile), so every activation level lands on both sides.
Truth for scoring is `max_act > 0`, read from the data, never assumed from the kind.

Also here: the plumbing every labeller shares (which SAEs and features to label,
token strings with a cache, and the `LabelReport` they return).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import SaescopeError
from ..featuredb import FeatureDB
from ..runs import Run, as_run  # noqa: F401  (as_run: the labellers' import of runs.as_run)
from ..tokens import _BYTE_PIECE, one_line, texts, token_text, visible
from ..tokens import token_text as display_token  # noqa: F401  (labellers import it from here)

MARK_OPEN, MARK_CLOSE = "<<", ">>"



class TokenTable:
    """Token id → vocabulary string, fetched from the DB once per id (thread-safe enough: a lost race
    only fetches an id twice); `display` turns a sequence of ids into text (see saescope.tokens).

    Each id's display text is computed once; a window without byte-fallback pieces is shown from
    those, and only a window holding byte pieces goes through `texts` (which merges them)."""

    def __init__(self, db: FeatureDB):
        self._db = db
        self._cache: dict[int, str] = {}
        self._shown: dict[int, str] = {}  # id → token_text, for ids that are not byte pieces

    def display(self, ids: Sequence[int]) -> list[str]:
        key = tuple(ids)
        cache, shown = self._cache, self._shown
        missing = sorted({i for i in key if i not in cache})
        if missing:
            cache.update((i, f"<unk:{i}>" if s is None else s) for i, s in zip(missing, self._db.vocab(missing)))
            for i in missing:
                if not _BYTE_PIECE.match(cache[i]):
                    shown[i] = token_text(cache[i])
        if all(i in shown for i in key):
            return [shown[i] for i in key]
        return texts([cache[i] for i in key])


@dataclass(frozen=True)
class Context:
    """One example window: raw vocabulary strings with the feature's activation per token."""

    kind: str
    rank: int
    quantile: int | None
    max_act: float
    ids: tuple[int, ...]
    tokens: tuple[str, ...]  # display text of each token (markers decoded)
    acts: tuple[float, ...]

    @property
    def fires(self) -> bool:
        return self.max_act > 0

    def text(self) -> str:
        """Plain text, one line (newlines shown as ↵)."""
        return one_line("".join(self.tokens))

    def marked(self) -> str:
        """Text with each run of firing tokens wrapped <<like this>>, one line."""
        out, inside = [], False
        for tok, act in zip(self.tokens, self.acts):
            if act > 0 and not inside:  # " Paris" → " <<Paris": the word, not its space, is marked
                core = tok.lstrip()
                if core:
                    out.append(tok[: len(tok) - len(core)] + MARK_OPEN)
                    tok = core
                else:  # a whitespace token fires (Gemma's lone space before digits): shown as ␣
                    out.append(MARK_OPEN)
                    tok = visible(tok)
            elif act <= 0 and inside:
                out.append(MARK_CLOSE)
            inside = act > 0
            out.append(tok)
        if inside:
            out.append(MARK_CLOSE)
        return one_line("".join(out))

    def firing_tokens(self) -> list[tuple[str, float]]:
        return [(t, a) for t, a in zip(self.tokens, self.acts) if a > 0]


@dataclass(frozen=True)
class Evidence:
    sae_id: str
    idx: int
    stats: dict
    labelling: tuple[Context, ...]  # activating contexts the labeller sees
    held_out: tuple[Context, ...]  # activating and non-activating contexts kept for scoring

    @property
    def logits_pos(self) -> list:
        return self.stats.get("logits_pos") or []

    @property
    def logits_neg(self) -> list:
        return self.stats.get("logits_neg") or []


def is_labelling(kind: str, rank: int) -> bool:
    """The split rule (module docstring): even-ranked top/quantile examples are for labelling."""
    return kind != "random" and rank % 2 == 0


def gather(db: FeatureDB, sae_id: str, idx: int, table: TokenTable | None = None,
           stats: dict | None = None) -> Evidence | None:
    """The evidence of one feature, or None when the feature has no statistics.

    `stats`: the feature's row when the caller has it already (e.g. from `db.top_features`).
    """
    table = table or TokenTable(db)
    if stats is None:
        stats = db.feature(sae_id, idx)
        if stats is None:
            return None
        stats.pop("examples")
    labelling: list[Context] = []
    held_out: list[Context] = []
    for ex in db.examples(sae_id, idx):
        ids = list(ex.tokens)
        ctx = Context(kind=ex.kind, rank=ex.rank, quantile=ex.quantile, max_act=float(ex.max_act),
                      ids=tuple(ids), tokens=tuple(table.display(ids)), acts=tuple(ex.acts))
        (labelling if is_labelling(ctx.kind, ctx.rank) else held_out).append(ctx)
    return Evidence(sae_id=sae_id, idx=int(idx), stats=stats, labelling=tuple(labelling),
                    held_out=tuple(held_out))


# --------------------------------------------------------------------------- which features


def resolve_saes(db: FeatureDB, refs: Sequence[str | int] | str | int | None = None) -> list[dict]:
    """SAE rows (from `db.saes()`) for `refs`: full ids, "site/LAYER" or "LAYER"; None = every
    analysed SAE. SAEs come from the database, not the saes/ folder, so a run whose
    weights were moved can still be labelled."""
    rows = db.saes()
    if refs is None:
        return [r for r in rows if r["status"] == "done"]
    if isinstance(refs, str | int):
        refs = [refs]
    by_id = {r["id"]: r for r in rows}
    out = []
    for ref in refs:
        ref = str(ref)
        if ref in by_id:
            hits = [by_id[ref]]
        else:
            site, _, layer = ref.rpartition("/")
            hits = [r for r in rows if layer.isdigit() and r["layer"] == int(layer)
                    and (not site or r["site"] == site)]
        if not hits:
            known = ", ".join(list(by_id)[:8]) or "none"
            raise SaescopeError(f"no SAE '{ref}' in the run's feature database (known: {known}): give one of these "
                                "ids (or its LAYER), or run `saescope analyze` on the run first")
        if len(hits) > 1:
            raise SaescopeError(f"'{ref}' matches several SAEs ({', '.join(h['id'] for h in hits)}): "
                                "give the full id")
        if hits[0]["status"] != "done":
            raise SaescopeError(f"SAE {hits[0]['id']!r} has not been analysed (status {hits[0]['status']!r}): "
                                "run the analysis first")
        if hits[0] not in out:
            out.append(hits[0])
    return out


def alive_features(db: FeatureDB, sae: dict, limit: int | None = None) -> list[dict]:
    """Stats rows of the features that fired at least once; with `limit`, the `limit` most
    frequently firing ones, else all of them in index order."""
    if limit is not None and int(limit) < 1:
        raise SaescopeError(f"limit must be at least 1, got {limit}")
    if limit is None:
        rows = db.top_features(sae["id"], order_by="idx", limit=max(int(sae["width"] or 0), 1))
    else:
        rows = db.top_features(sae["id"], order_by="frequency", limit=int(limit))
    return [r for r in rows if (r["n_fired"] or 0) > 0]


@dataclass
class LabelReport:
    """What a labelling pass did; `str()` is the summary line the CLI prints."""

    source: str
    model: str | None = None
    features: int = 0  # alive features considered
    labelled: int = 0  # labels written (or confirmed unchanged) in this pass
    skipped: int = 0  # already labelled by this labeller (resume)
    failed: int = 0  # answers rejected or requests that failed for this feature
    scored: int = 0
    unscored: int = 0  # not enough held-out evidence (needs activating and non-activating contexts)
    unclear: int = 0  # offline: neither a concept nor a rule explained the activations
    concepts: int = 0  # offline: labels that name a concept
    output_scored: int = 0
    output_sum: float = 0.0
    requests: int = 0  # HTTP requests actually sent
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    seconds_setup: float = 0.0  # offline: building the concept space and the fresh detection windows
    score_sum: float = 0.0
    errors: list[str] = field(default_factory=list)  # first few failure reasons

    @property
    def mean_score(self) -> float | None:
        return self.score_sum / self.scored if self.scored else None

    def note_error(self, message: str) -> None:
        self.failed += 1
        if len(self.errors) < 10:
            self.errors.append(message)

    def __str__(self) -> str:
        parts = [f"{self.labelled} labelled", f"{self.skipped} already done", f"{self.failed} failed",
                 f"{self.scored} scored"]
        if self.mean_score is not None:
            parts.append(f"mean detection score {self.mean_score:.2f}")
        if self.output_scored:
            parts.append(f"mean output score {self.output_sum / self.output_scored:.2f}")
        if self.concepts:
            parts.append(f"{self.concepts} concepts")
        if self.unclear:
            parts.append(f"{self.unclear} unclear")
        if self.requests or self.cache_hits:
            parts.append(f"{self.requests} requests ({self.cache_hits} cached, {self.retries} retries), "
                         f"{self.prompt_tokens}+{self.completion_tokens} tokens")
        setup = f" ({self.seconds_setup:.1f}s of it setting up)" if self.seconds_setup else ""
        return f"{self.source} labels for {self.features} features: " + ", ".join(parts) + \
            f" in {self.seconds:.1f}s" + setup
