"""Steering by concept: pick the features whose output writes the concept, and calibrate their strength.

    choice = choose(run, "farm animals")     # → ConceptChoice: features, strength, why, runners-up
    steer(run, prompt, concept="farm animals")   # uses it (steer.py)

1. **Candidates by output.** Features are ranked by their output side (`search.concept_ranking`
   with `STEER_WEIGHTS`: the words their decoder direction promotes, a little of their contexts
   and label), over every layer of the run: features picked by what they write steer far
   better than features picked by what makes them fire (2025 results, DESIGN.md §7). When even
   the best output side is below `min_output`, no feature matches and `choose` says so. The
   output side read through the unembedding is only a guess for features of early and middle
   layers (the later layers transform what they write), so the `pool` best are *probed*: each is
   steered at ×`probe` on the calibration prompts in one forward pass, and the `candidates` that
   raise the next-token probability of the concept's words most (their *pull*) go on, if they pull
   at least `min_pull` of the best one's pull (a layer-0 token feature that barely moves the words
   is not worth calibrating, nor pairing with the best).
2. **Strength by a climb.** Every candidate (and, with `combine`, the top candidates together,
   the strength split evenly between them) is steered on the library's own neutral calibration
   prompts, sampled, `tokens` new tokens, all candidates and the unsteered texts in one batched
   `generate` per round (`splice.generate_ids`: the rows share the sampling noise, so a steered text
   differs from the unsteered one by the steering, not by luck). Each text is judged on its own:
   - it *mentions the concept* when it holds at least one concept word (the query's own words,
     and the index's and the candidates' promoted words at least `word_similarity` close to it); a word
     repeated counts once, so a loop of "animals animals …" is one mention, not forty;
   - it *loops* when its distinct-bigram ratio is below `min_distinct2`, one word repeats
     `max_run` times in a row, or one token 2 × `max_run` times.
   A strength *shows the concept* when at least `min_shown` of its texts mention it (more than
   unsteered) and their embedding moves toward the query; it is *degenerate* when the share of its
   texts that loop passes the unsteered share by more than `max_looped`, or when its texts cost more
   than `max_cost` nats/token over the unsteered ones (cross-entropy under the unsteered model, one
   forward pass per strength): word salad such as "Stocksack Line A,aseloteas Voloolas" does not
   repeat itself, so only its cost shows it is no longer language. Round 1 tries `start`; each
   later round steps by `step` on a geometric grid: up from a strength whose texts are clean, down
   from one that looped, never to or past a strength that looped (`rounds` rounds; a candidate whose
   every strength looped steps on down until one is clean or `min_strength` is reached). Each
   candidate proposes its *strongest* clean strength that showed the concept: the smallest one that
   shows on a few short texts is the edge where the concept barely shows, and on another prompt it
   shows nothing.
3. **Confirm and take.** The `verify` best proposals are steered again on fresh texts (other
   sampling noise, `verify_tokens` new tokens, the length `steer` writes by default) at their
   strength and a step below, in one batched `generate`; each candidate takes the strongest of the
   two that still shows the concept without looping, at most `max_cost` nats/token above the
   unsteered texts' cross-entropy (under the unsteered model). Of the candidates that pass, the one
   whose texts mention the concept most often wins; the others are reported as runners-up. When
   every strength of every candidate degenerated, the next `candidates` features of the probed pool
   (by pull) are calibrated the same way (`_runners_up`). When none passes, the candidate that showed
   the concept most is steered at its strongest clean strength (never below what was tried), checked first
   on fresh `verify_tokens`-token texts with a step below (`_check_fallback`: a strength clean on 24
   tokens may loop by 40), and reported as uncalibrated.
4. **Cache.** The choice is stored per concept in run/steer_calibration.json (atomic write),
   keyed by the concept index (re-analysis invalidates it), the calibration settings and the dtype
   the model generates in (`models.generation_dtype`: bf16 on a CPU with fast bf16), so a repeated
   request skips steps 1-3.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .devices import decode_threads
from .errors import SaescopeError
from .fsio import read_json, write_json
from .runs import Run
from .splice import Intervention, generate_ids, steering_rows, until_eos

CALIBRATION_FILE = "steer_calibration.json"
RULES = 3  # the calibration's rules, in the cache key (2: word salad is degenerate; 3: the fallback is checked on long texts)
CALIBRATION_PROMPTS = ("Here is what I wrote about it:", "Let me tell you something.", "It all started when",
                       "This is the next part of the text.", "I have been thinking about this for a while, and",
                       "The next morning,", "You may not believe it, but", "As I said before,")
"""Neutral prompts of the library's own, never an evaluation's."""


@dataclass(frozen=True)
class ConceptSteerConfig:
    """How `choose` picks features and strengths for a concept."""

    start: float = 2.0
    """The first strength tried (× each feature's max activation, split between combined features)."""
    step: float = 1.4142
    """Each later round tries the strength × or ÷ this (a geometric grid)."""
    rounds: int = 2
    """Rounds of the search: round 1 tries `start`; each later one steps up from a strength whose texts are
    clean and down from one that looped (a candidate with no clean strength yet goes on stepping down)."""
    min_strength: float = 0.5
    max_strength: float = 8.0
    pool: int = 12
    """Features (by output match) whose pull on the concept's words is measured (`probe`) when more than
    `candidates` (one batched forward pass, no generation)."""
    candidates: int = 2
    """Features of the pool that pull most, calibrated per concept."""
    min_pull: float = 0.25
    """A feature of the pool is calibrated only when it pulls at least this share of the best one's pull."""
    probe: float = 2.0
    """The strength at which the pool's pull is measured."""
    combine: int = 1
    """Also try this many top candidates (different layers) together, sharing the strength (1: never, the
    default: where a pair won the calibration, each of its features at half strength, the request's text held
    fewer of the concept's words than with the best single feature; bench/RESULTS.md "Concept steering,
    session 16")."""
    word_similarity: float = 0.5
    """The concept's words (counted in the texts, pulled in the probe): the query's own words and the words of
    the index (contexts and promoted tokens) and of the candidates' promoted words at least this similar to the
    query. One bar for all: a candidate's own words do not count as the concept unless they are as close to it as
    any other word (at 0.4 a "corporations" feature passed for "computers and technology" on its own words)."""
    max_words: int = 60
    """At most this many of the index's words (the closest)."""
    min_output: float = 0.35
    """Below this output-side similarity no feature matches the concept."""
    tokens: int = 24
    """New tokens per text in the search."""
    seed: int = 1234
    min_shown: float = 0.5
    """A strength shows the concept when at least this share of its texts mention it."""
    min_distinct2: float = 0.6
    """A text whose distinct-bigram ratio is below this loops."""
    max_run: int = 4
    """A text where one word repeats this many times in a row (one token: twice as many) loops."""
    max_looped: float = 0.125
    """A strength is degenerate when the share of its texts that loop passes the unsteered share by more than
    this (one text in eight; with four texts, one more loop than unsteered)."""
    max_cost: float = 2.5
    """Largest CE cost (nats/token of the steered texts under the unsteered model, above the unsteered texts)."""
    verify: int = 1
    """Proposals confirmed on fresh texts (the best by how often the concept showed)."""
    verify_tokens: int = 40
    """New tokens per text in the confirmation."""

    def __post_init__(self):
        if not (0 < self.min_strength <= self.start <= self.max_strength) or not self.step > 1 or self.rounds < 1:
            raise SaescopeError(f"calibration settings cannot work: need 0 < min_strength ≤ start ≤ max_strength, "
                                f"step > 1 and rounds ≥ 1 (got {self.min_strength:g} ≤ {self.start:g} ≤ "
                                f"{self.max_strength:g}, step {self.step:g}, rounds {self.rounds})")

    def key(self) -> str:
        raw = json.dumps([dataclasses.asdict(self), CALIBRATION_PROMPTS, RULES], sort_keys=True)
        return hashlib.sha1(raw.encode()).hexdigest()[:12]


@dataclass
class Rung:
    """One strength tried for one candidate, pooled over its texts."""

    strength: float
    words_unsteered: int  # distinct concept words per text, summed over the texts
    words_steered: int
    similarity_unsteered: float
    similarity_steered: float
    distinct2: float
    longest_run: int
    cost: float | None = None  # CE cost (nats/token over the unsteered texts); degenerate above max_cost
    shows: bool = False
    degenerate: bool = False
    example: str = ""  # the first prompt's steered text
    shown_unsteered: float = 0.0  # share of the texts that mention the concept
    shown_steered: float = 0.0
    looped_unsteered: int = 0  # texts that loop
    looped_steered: int = 0
    texts: int = 0
    verified: bool = False  # measured in the confirmation on fresh texts


@dataclass
class Candidate:
    """A feature (or, with `combine`, several) tried for the concept, and the strengths tried."""

    features: list[tuple[str, int]]
    layer: list[int | None]
    label: str
    output_match: float
    context_match: float
    rungs: list[Rung] = field(default_factory=list)
    strength: float | None = None  # the rung taken, None if none passed
    why: str = ""
    pull: float | None = None  # next-token probability of the concept's words, steered minus unsteered


@dataclass
class ConceptChoice:
    """What `choose` decided for a concept: which features at which strength, and why."""

    concept: str
    features: list[tuple[str, int]]
    strength: float  # × max activation in all, split evenly between the features
    reason: str
    candidates: list[Candidate]
    words: list[str]  # concept words counted
    calibrated: bool  # a rung showed the concept without degenerating
    cached: bool = False
    seconds: float = 0.0

    def interventions(self):
        return concept_interventions(self.features, self.strength)


def concept_interventions(features: list[tuple[str, int]], strength: float):
    """Add `features` together at `strength` (× max activation) in all: each gets strength / len(features)."""
    return [Intervention(sid, idx, "add", strength / len(features)) for sid, idx in features]


def _steer_weights():
    """Candidates are ranked mainly by what they write (the search's weights favour contexts)."""
    from .search import ConceptWeights

    return ConceptWeights(contexts=0.15, output=1.0, label=0.15)


# ---------------------------------------------------------------------------- choose


def choose(run: Run, concept: str, cfg: ConceptSteerConfig = ConceptSteerConfig(), lm=None) -> ConceptChoice:
    """The features and strength to steer toward `concept` (cached per concept in the run folder)."""
    from .conceptindex import index_key
    from .models import dtype_name

    concept = " ".join(str(concept or "").split())
    if not concept:
        raise SaescopeError("the concept is empty: name a topic, e.g. --concept 'farm animals'")
    t0 = time.time()
    dtype = lm.dtype if lm is not None else run.generation_dtype
    with run.db(readonly=True) as db:  # a strength calibrated in one dtype is not reused in another
        key = (index_key(db), f"{cfg.key()}-{dtype_name(dtype)}")
    cached = _read_cache(run, key).get(concept.lower())
    if cached is not None:
        choice = _choice_from_dict(cached)
        choice.cached, choice.seconds = True, time.time() - t0
        return choice
    choice = _calibrate(run, concept, cfg, lm)
    choice.seconds = time.time() - t0
    _write_cache(run, key, concept.lower(), choice)
    return choice


def _candidates(run: Run, concept: str, cfg: ConceptSteerConfig, n: int) -> tuple[list[Candidate], list[str],
                                                                                   np.ndarray]:
    """The `n` features whose output matches the concept best (single), the concept's words, the query vector."""
    from .conceptindex import as_word, concept_index
    from .search import concept_ranking, encode

    with run.db(readonly=True) as db:
        ranking = concept_ranking(run, db, concept, _steer_weights())
        layers = {s["id"]: s["layer"] for s in db.saes()}
        index = concept_index(run, db)
        alive = [m for m in ranking[:200] if (db.feature_stats(m.sae_id, m.idx) or {}).get("max_act")]
    if not alive or alive[0].output < cfg.min_output:
        best = f"best: layer {layers.get(alive[0].sae_id)} #{alive[0].idx}, output similarity " \
               f"{alive[0].output:.2f}" if alive else "no analysed features"
        raise SaescopeError(f"no feature writes '{concept}' ({best} < {cfg.min_output}): try a more everyday word")
    picked = alive[:n]
    qvec = encode([concept])[0]
    words = {w for w in (as_word(t) for t in re.findall(r"[A-Za-z]+", concept)) if w}
    words |= set(index.related_words(qvec, cfg.word_similarity, cfg.max_words))
    sims = index.word_similarity(qvec)
    cands = []
    for m in picked:
        row = index.position(m.sae_id, m.idx)
        out_ids = [i for i in index.out_words[row].tolist() if i >= 0] if row is not None else []
        words |= {index.words[i] for i in out_ids if sims[i] >= cfg.word_similarity}
        label = m.label_row["text"] if m.label_row else "(no label)"
        cands.append(Candidate([(m.sae_id, m.idx)], [layers.get(m.sae_id)], label, m.output, m.contexts))
    return cands, sorted(words), qvec


def _select(lm, saes, typical, pool: list[Candidate], words: list[str], cfg: ConceptSteerConfig) -> list[Candidate]:
    """The `candidates` features of the pool that pull the concept's words most (probed when the pool is larger;
    those pulling less than `min_pull` of the best are dropped), and with `combine` the top ones together."""
    if len(pool) > cfg.candidates:
        _probe(lm, saes, typical, pool, words, cfg)
        pool = sorted(pool, key=lambda c: -math.inf if c.pull is None else c.pull, reverse=True)
        best = pool[0].pull
        if best is not None and best > 0:  # a feature that barely moves the words is not worth calibrating
            pool = [c for c in pool if c.pull is not None and c.pull >= cfg.min_pull * best]
    cands = pool[:cfg.candidates]
    pair = _combined(cands, cfg.combine) if cfg.combine > 1 else None
    return cands + ([pair] if pair is not None and len(pair.features) > 1 else [])


def _combined(cands: list[Candidate], k: int) -> Candidate:
    """The top candidates from different layers, steered together (one feature when all share a layer)."""
    chosen: list[Candidate] = []
    for c in cands:
        if c.layer[0] not in [x.layer[0] for x in chosen]:
            chosen.append(c)
        if len(chosen) == k:
            break
    return Candidate([f for c in chosen for f in c.features], [c.layer[0] for c in chosen],
                     " + ".join(c.label for c in chosen), float(np.mean([c.output_match for c in chosen])),
                     float(np.mean([c.context_match for c in chosen])))


def fixed(run: Run, concept: str, strength: float, cfg: ConceptSteerConfig = ConceptSteerConfig()) -> ConceptChoice:
    """The best output-matching feature at a strength the caller chose (no calibration)."""
    cands, words, _ = _candidates(run, concept, cfg, cfg.candidates)
    best = cands[0]
    reason = (f"{_name(best)} writes '{concept}' best (output similarity {best.output_match:.2f}); "
              f"strength ×{strength:g} as given")
    return ConceptChoice(concept, best.features, float(strength), reason, cands, words, calibrated=False)


def _calibrate(run: Run, concept: str, cfg: ConceptSteerConfig, lm) -> ConceptChoice:
    pool, words, qvec = _candidates(run, concept, cfg, cfg.pool)
    lm = lm or run.generation_model
    saes, typical = _load(run, [f for c in pool for f in c.features])
    measure = _Measure(words, qvec, cfg)
    with decode_threads(getattr(lm, "device", torch.device("cpu"))):
        cands = _select(lm, saes, typical, pool, words, cfg)
        _search(lm, saes, typical, cands, measure, cfg)
        if not any(_safe(c) for c in cands):  # every strength tried degenerated: calibrate the runners-up too
            more = _runners_up(pool, cands, cfg)
            _search(lm, saes, typical, more, measure, cfg)
            cands += more
        if all(c.strength is None for c in cands) and any(_safe(c) for c in cands):
            _check_fallback(lm, saes, typical, cands, measure, cfg)
    return _decide(concept, cands, words, cfg)


def _check_fallback(lm, saes, typical, cands: list[Candidate], measure: _Measure, cfg: ConceptSteerConfig) -> None:
    """No candidate passed: steer the fallback's strength and a step below on fresh `verify_tokens`-token texts (one
    batched generate) and add them as rungs, so that `_fallback` takes neither when it loops or turns to word salad
    on the longer texts a request writes (a strength clean on 24 tokens may loop by 40)."""
    best, strength = _fallback(cands)
    steps = _confirm_steps(strength, cfg)
    for judge in _fresh(lm, saes, typical, [(best.features, s) for s in steps], measure, cfg):
        best.rungs.append(rung := judge())
        if not rung.degenerate:
            break  # the stronger step is clean on the longer texts: keep it


def _judge(lm, prompts: list[str], strength: float, base: _Texts, base_ce: float, texts: list[str],
           ids: list[torch.Tensor], measure: _Measure, cfg: ConceptSteerConfig, verified: bool = False) -> Rung:
    """A strength's rung from its texts; texts that do not loop are costed too (one forward pass): still language?"""
    steered = measure.texts(texts, ids)
    rung = _rung(strength, base, steered, cfg, texts[0], verified)
    if rung.degenerate:
        return rung
    cost = continuation_ce(lm, prompts, ids) - base_ce  # NaN (a side wrote nothing): not measured
    return _rung(strength, base, steered, cfg, texts[0], verified, None if math.isnan(cost) else round(cost, 4))


def _runners_up(pool: list[Candidate], taken: list[Candidate], cfg: ConceptSteerConfig) -> list[Candidate]:
    """The next `candidates` single features of the probed pool by pull (below `min_pull` too): a second chance
    when every strength of the first ones turned the text into loops or word salad."""
    used = {f for c in taken for f in c.features}
    rest = [c for c in pool if c.pull is not None and not used & set(c.features)]
    return sorted(rest, key=lambda c: c.pull or 0.0, reverse=True)[:cfg.candidates]


def _search(lm, saes, typical, cands: list[Candidate], measure: _Measure, cfg: ConceptSteerConfig) -> None:
    """Every candidate's strength, by `rounds` rounds of one batched generate each (all open candidates
    together, the unsteered texts once: the same seed gives every round the same sampling noise), then the
    best proposals confirmed on fresh texts (`_confirm`)."""
    prompts = list(CALIBRATION_PROMPTS)
    plan = {i: _grid(cfg.start, cfg) for i in range(len(cands))}
    base = None
    for n in itertools.count():  # after `rounds`, only a candidate whose every strength looped steps on down
        todo = [(i, s) for i, s in plan.items() if s is not None and (n < cfg.rounds or not _safe(cands[i]))]
        if not todo:
            break
        groups = ([[]] if base is None else []) + [concept_interventions(cands[i].features, s) for i, s in todo]
        texts, ids = _generate_groups(lm, saes, typical, groups, prompts, cfg.tokens, cfg.seed)
        if base is None:
            base, base_ce = measure.texts(texts[0], ids[0]), continuation_ce(lm, prompts, ids[0])
            texts, ids = texts[1:], ids[1:]
        for (i, s), t, d in zip(todo, texts, ids):
            cands[i].rungs.append(_judge(lm, prompts, s, base, base_ce, t, d, measure, cfg))
            plan[i] = _next_strength(cands[i], cfg)
    proposals = [(i, r) for i, c in enumerate(cands) if (r := _proposal(c)) is not None]
    _confirm(lm, saes, typical, cands, proposals, measure, cfg)


def _confirm(lm, saes, typical, cands: list[Candidate], proposals: list[tuple[int, Rung]], measure: _Measure,
             cfg: ConceptSteerConfig) -> None:
    """Steer the `verify` best proposals again on fresh texts (other noise, `verify_tokens` tokens) at their
    strength and a step below, one batched generate; each takes the strongest that still shows the concept
    without looping, within the cost cap (costed strongest first, only until one passes)."""
    ranked = sorted(proposals, key=lambda ir: _merit(ir[1]), reverse=True)
    for i, r in ranked[cfg.verify:]:
        cands[i].why = f"concept shows at ×{r.strength:g}; not confirmed (others showed it more)"
    plan = [(i, s) for i, r in ranked[:cfg.verify] for s in _confirm_steps(r.strength, cfg)]
    if not plan:
        return
    for (i, s), judge in zip(plan, _fresh(lm, saes, typical, [(cands[i].features, s) for i, s in plan], measure, cfg)):
        c = cands[i]
        if c.strength is not None:
            continue  # the stronger step passed
        c.rungs.append(r := judge())
        if r.degenerate:
            costly = r.cost is not None and r.cost > cfg.max_cost
            c.why = (f"costs {r.cost:.2f} nats/token at ×{s:g}, over the cap {cfg.max_cost:g}" if costly
                     else f"loops at ×{s:g} on fresh texts")
        elif not r.shows:
            c.why = f"the concept did not show at ×{s:g} on fresh texts"
        else:
            c.strength, c.why = s, f"concept shows at ×{s:g} on fresh {cfg.verify_tokens}-token texts"


def _fresh(lm, saes, typical, rows: list[tuple[list, float]], measure: _Measure,
           cfg: ConceptSteerConfig) -> list[Callable[[], Rung]]:
    """Each (features, strength) steered on fresh texts (other sampling noise, `verify_tokens` new tokens) beside
    the unsteered ones, in one batched generate; for each row, a call that judges it (`_judge`: costed only
    when called, so a caller that stops at the first passing row costs no more)."""
    prompts = list(CALIBRATION_PROMPTS)
    groups = [[]] + [concept_interventions(features, s) for features, s in rows]
    texts, ids = _generate_groups(lm, saes, typical, groups, prompts, cfg.verify_tokens, cfg.seed + 1)
    base, base_ce = measure.texts(texts[0], ids[0]), continuation_ce(lm, prompts, ids[0])
    return [functools.partial(_judge, lm, prompts, s, base, base_ce, texts[g], ids[g], measure, cfg, True)
            for g, (_, s) in enumerate(rows, 1)]


def _confirm_steps(strength: float, cfg: ConceptSteerConfig) -> list[float]:
    """The proposed strength and one grid step below it (when in range), strongest first."""
    below = _grid(strength / cfg.step, cfg)
    return [strength] + ([below] if below is not None else [])


def _grid(strength: float, cfg: ConceptSteerConfig) -> float | None:
    """`strength` rounded to 3 decimals, None outside [min_strength, max_strength] (to those 3 decimals: two
    steps of 1.4142 down from ×1 land on 0.49993, which is ×0.5)."""
    return round(strength, 3) if cfg.min_strength - 5e-4 <= strength <= cfg.max_strength + 5e-4 else None


def _next_strength(c: Candidate, cfg: ConceptSteerConfig) -> float | None:
    """The strength to try next (None: done). Up a step from one whose texts were clean, down a step from one
    that looped; never at or above a strength that looped, never at or below a clean one, never twice. The
    rule stops before degeneration: it only climbs from clean text."""
    last = c.rungs[-1]
    looped = min((r.strength for r in c.rungs if r.degenerate), default=math.inf)
    clean = max((r.strength for r in c.rungs if not r.degenerate), default=-math.inf)
    nxt = _grid(last.strength / cfg.step if last.degenerate else last.strength * cfg.step, cfg)
    if nxt is None or not clean < nxt < looped:
        return None
    return nxt


def _proposal(c: Candidate) -> Rung | None:
    """The candidate's strongest strength below its loops that showed the concept (None: says why). The
    smallest that shows on a few short texts is the edge of showing, not a strength with margin."""
    shown = [r for r in _safe(c) if r.shows]
    if shown:
        return max(shown, key=lambda x: x.strength)
    looped = [r.strength for r in c.rungs if r.degenerate]
    c.why = (f"degenerates (loops or word salad) at ×{min(looped):g} before the concept shows" if looped else
             f"the concept did not show at {', '.join(f'×{r.strength:g}' for r in c.rungs)}")
    return None


def _decide(concept: str, cands: list[Candidate], words: list[str], cfg: ConceptSteerConfig) -> ConceptChoice:
    passed = [(c, _taken(c)) for c in cands if c.strength is not None]
    if passed:  # the candidate whose fresh texts mention the concept most often
        best, rung = max(passed, key=lambda cr: _merit(cr[1]))
        assert best.strength is not None
        pull = "" if best.pull is None else f", {best.pull:+.1%} next-token probability on its words at ×{cfg.probe:g}"
        each = f" (×{best.strength / len(best.features):.3g} each)" if len(best.features) > 1 else ""
        reason = (f"{_name(best)} writes '{concept}' (output similarity {best.output_match:.2f}{pull}); "
                  f"×{best.strength:g}{each} is the strongest strength tried below its loops at which "
                  f"{_shown(rung)} (unsteered {rung.shown_unsteered:.0%}) of {rung.texts} fresh sampled texts "
                  f"on {len(CALIBRATION_PROMPTS)} calibration prompts mention the concept with no more loops than "
                  f"unsteered (distinct bigrams {rung.distinct2:.2f}, CE cost {rung.cost:+.2f})")
        return ConceptChoice(concept, best.features, best.strength, reason, cands, words, calibrated=True)
    best, strength = _fallback(cands)
    reason = (f"no strength made '{concept}' show on fresh texts without degenerating them; steering {_name(best)} "
              f"(output similarity {best.output_match:.2f}) at ×{strength:g}, its strongest tried below its loops")
    return ConceptChoice(concept, best.features, strength, reason, cands, words, calibrated=False)


def _fallback(cands: list[Candidate]) -> tuple[Candidate, float]:
    """Uncalibrated: the candidate whose strongest clean strength showed the concept most, at that strength;
    when every strength tried looped, the first candidate at its weakest tried. Never below what was tried."""
    tops = [(c, max(safe, key=lambda r: r.strength)) for c in cands if (safe := _safe(c))]
    if tops:
        best, rung = max(tops, key=lambda cr: _merit(cr[1]))
        return best, rung.strength
    tried = [r.strength for r in cands[0].rungs]
    return cands[0], min(tried) if tried else 1.0


def _taken(c: Candidate) -> Rung:
    return next(r for r in reversed(c.rungs) if r.strength == c.strength)


def _merit(r: Rung) -> tuple[float, float]:
    """How well a rung shows the concept: more texts mentioning it, then a larger move toward it."""
    return r.shown_steered - r.shown_unsteered, r.similarity_steered - r.similarity_unsteered


def _safe(c: Candidate) -> list[Rung]:
    """The candidate's rungs below its weakest degenerate strength."""
    limit = min((r.strength for r in c.rungs if r.degenerate), default=math.inf)
    return [r for r in c.rungs if r.strength < limit]


def _shown(r: Rung) -> str:
    return f"{round(r.shown_steered * r.texts)}/{r.texts}"


def _name(c: Candidate) -> str:
    return " + ".join(f"layer {layer} #{idx}" for layer, (_, idx) in zip(c.layer, c.features))


# ---------------------------------------------------------------------------- loading, probing, generating


def _load(run: Run, features: list[tuple[str, int]]):
    saes, typical = {}, {}
    with run.db(readonly=True) as db:
        for sid, idx in features:
            if sid not in saes:
                saes[sid] = run.load_sae(sid)
            typical[(sid, idx)] = float((db.feature_stats(sid, idx) or {}).get("max_act") or 1.0)
    return saes, typical


def _probe(lm, saes, typical, pool: list[Candidate], words: list[str], cfg: ConceptSteerConfig) -> None:
    """Set each candidate's `pull`: steered at ×`probe` on the calibration prompts (one batched forward pass,
    no sampling), how much more probability the next tokens put on the concept's words (those
    that are one token) than unsteered, averaged over the prompts' last positions (as many as the shortest
    prompt has, so no row counts padding: the logits of the other positions are never computed, the
    262k-token unembedding is most of the cost). A feature whose unembedded direction names
    the concept may still not move the model's output once the later layers have read it; this measures
    that. A difference, not a ratio: a feature that only flattens the distribution gains rare words a
    large ratio but little probability."""
    targets = _word_tokens(lm.tokenizer, words)
    if not targets:
        return
    prompts = list(CALIBRATION_PROMPTS)
    ids, mask = _left_padded(lm, prompts)
    keep = mask.bool() if lm.bos_id is None else mask.bool() & (ids != lm.bos_id)
    last = int(keep.sum(1).min())  # left-padded: the last `last` positions are words in every row
    groups = [[]] + [concept_interventions(c.features, cfg.probe) for c in pool]
    n = len(prompts)
    with torch.no_grad(), steering_rows(lm, saes, [ivs for ivs in groups for _ in prompts], typical):
        logits = lm.model(input_ids=ids.repeat(len(groups), 1), attention_mask=mask.repeat(len(groups), 1),
                          use_cache=False, logits_to_keep=last).logits  # (groups × prompts, last, vocab)
    mass = [float(logits[g * n:(g + 1) * n].float().softmax(-1)[..., targets].sum(-1).mean())
            for g in range(len(groups))]
    for c, m in zip(pool, mass[1:]):
        c.pull = round(m - mass[0], 5)


def _word_tokens(tok, words: list[str]) -> list[int]:
    """The token ids of the concept words that are one token (with a leading space, lower or capitalised)."""
    ids, special = set(), set(tok.all_special_ids)  # the unknown token is no concept word
    for w in words:
        for form in (w, w.capitalize()):
            t = tok.encode(" " + form, add_special_tokens=False)
            if len(t) == 1 and t[0] not in special:
                ids.add(int(t[0]))
    return sorted(ids)


def _left_padded(lm, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = lm.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        batch = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    return batch["input_ids"].to(lm.device), batch["attention_mask"].to(lm.device)


def _generate_groups(lm, saes, typical, groups: list[list], prompts: list[str], tokens: int, seed: int):
    """Texts and new ids per group of interventions, each a list over the prompts (one batched generate)."""
    rows = [g for g in groups for _ in prompts]
    new = generate_rows(lm, saes, typical, prompts * len(groups), rows, tokens, seed)
    texts = [lm.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
    n = len(prompts)
    return ([texts[i:i + n] for i in range(0, len(texts), n)], [new[i:i + n] for i in range(0, len(new), n)])


def generate_rows(lm, saes, typical, prompts: list[str], rows: list[list], tokens: int, seed: int,
                  sample: bool = True) -> list[torch.Tensor]:
    """Continue every prompt under its own interventions (one batched, left-padded generate)."""
    ids, mask = _left_padded(lm, prompts)
    with steering_rows(lm, saes, rows, typical):
        new = generate_ids(lm, ids, tokens, greedy=not sample, seed=seed, attention_mask=mask)
    return [until_eos(r, lm.tokenizer) for r in new]


def continuation_ce(lm, prompts, new_ids: list[torch.Tensor]) -> float:
    """Mean cross-entropy (nats/token) of the continuations under the unsteered model (one right-padded
    forward: padding after a row's text leaves its logits as they are)."""
    rows = [(lm.tokenizer(p, return_tensors="pt")["input_ids"][0], new) for p, new in zip(prompts, new_ids)]
    rows = [(p, new) for p, new in rows if new.numel()]
    if not rows:
        return float("nan")
    width = max(len(p) + len(new) for p, new in rows)
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, (p, new) in enumerate(rows):
        ids[r, :len(p) + len(new)], mask[r, :len(p) + len(new)] = torch.cat([p, new]), 1
    with torch.no_grad():
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
    total = 0.0
    for r, (p, new) in enumerate(rows):
        logp = logits[r, len(p) - 1:len(p) + len(new) - 1].float().log_softmax(-1)  # (n, vocab)
        total += float(-logp.gather(1, new.to(logp.device)[:, None]).sum())
    return total / sum(len(new) for _, new in rows)


# ---------------------------------------------------------------------------- measures


def distinct2(text: str) -> float:
    """Distinct word bigrams / word bigrams (1 for fewer than two words): low means a loop."""
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def longest_run(items) -> int:
    """The longest run of one item (a token id, a word) repeated back to back."""
    best = run = 0
    prev = None
    for t in list(items):
        run = run + 1 if t == prev else 1
        best, prev = max(best, run), t
    return best


def loops(text: str, ids, cfg: ConceptSteerConfig) -> bool:
    """A text loops: few distinct bigrams, one word `max_run` times in a row, or one token twice as many."""
    return (distinct2(text) < cfg.min_distinct2 or longest_run(re.findall(r"\w+", text.lower())) >= cfg.max_run
            or longest_run(list(ids)) >= 2 * cfg.max_run)


def count_words(words: list[str], text: str) -> int:
    """Occurrences of the concept words in `text`, matched at word starts ("planet" counts "planets")."""
    low = text.lower()
    return sum(len(re.findall(r"\b" + re.escape(_stem(w)), low)) for w in words)


def words_in(words: list[str], text: str) -> set[str]:
    """The concept words `text` holds, each once however often it repeats (matched as `count_words` does)."""
    low = text.lower()
    return {_stem(w) for w in words if re.search(r"\b" + re.escape(_stem(w)), low)}


def _stem(word: str) -> str:
    w = word.lower()
    for end in ("ies", "es", "s"):
        if w.endswith(end) and len(w) - len(end) >= 4:
            return w[: len(w) - len(end)]
    return w


@dataclass
class _Texts:
    words: int  # distinct concept words per text, summed
    shown: float  # share of texts holding a concept word
    similarity: float
    distinct2: float
    longest_run: int
    looped: int  # texts that loop
    n: int


class _Measure:
    def __init__(self, words: list[str], qvec: np.ndarray, cfg: ConceptSteerConfig):
        self.words, self.qvec, self.cfg = words, qvec, cfg

    def texts(self, texts: list[str], ids: list[torch.Tensor]) -> _Texts:
        from .search import encode

        sims = encode(texts) @ self.qvec if texts else np.zeros(0)
        found = [words_in(self.words, t) for t in texts]
        return _Texts(words=sum(len(f) for f in found), shown=float(np.mean([bool(f) for f in found])),
                      similarity=float(np.mean(sims)), distinct2=float(np.mean([distinct2(t) for t in texts])),
                      longest_run=max((longest_run(i.tolist()) for i in ids), default=0),
                      looped=sum(loops(t, i.tolist(), self.cfg) for t, i in zip(texts, ids)), n=len(texts))


def _rung(strength: float, base: _Texts, steered: _Texts, cfg: ConceptSteerConfig, example: str,
          verified: bool = False, cost: float | None = None) -> Rung:
    """One strength's verdict: does it show the concept; is it degenerate (its texts loop more than unsteered,
    or, where `cost` was measured, cost more than `max_cost` nats/token: word salad that does not repeat)."""
    shows = (steered.shown >= cfg.min_shown and steered.shown > base.shown and steered.similarity > base.similarity)
    loops_more = (steered.looped - base.looped) > cfg.max_looped * max(steered.n, 1)
    too_costly = cost is not None and cost > cfg.max_cost
    return Rung(strength, base.words, steered.words, round(base.similarity, 4), round(steered.similarity, 4),
                round(steered.distinct2, 3), steered.longest_run, shows=shows, cost=cost,
                degenerate=loops_more or too_costly,
                example=example, shown_unsteered=round(base.shown, 4), shown_steered=round(steered.shown, 4),
                looped_unsteered=base.looped, looped_steered=steered.looped, texts=steered.n, verified=verified)


@dataclass
class ConceptEffect:
    """A concept steering's choice, and the concept in the unsteered vs steered text of the request."""

    choice: ConceptChoice
    words_unsteered: int
    words_steered: int
    similarity_unsteered: float
    similarity_steered: float


def measure_effect(choice: ConceptChoice, unsteered: str, steered: str) -> ConceptEffect:
    """Count the concept's words and measure the texts' similarity to the concept."""
    from .search import encode

    q, a, b = encode([choice.concept, unsteered, steered])
    return ConceptEffect(choice, count_words(choice.words, unsteered), count_words(choice.words, steered),
                         round(float(a @ q), 4), round(float(b @ q), 4))


# ---------------------------------------------------------------------------- cache


def _read_cache(run: Run, key: tuple[str, str]) -> dict:
    """{concept: choice dict} for these settings; nothing when the index changed since."""
    return _read_all(run, key[0]).get(key[1], {})


def _read_all(run: Run, index: str) -> dict:
    path = run.root / CALIBRATION_FILE
    if not path.exists():
        return {}
    try:
        data = read_json(path, "steering calibration")
    except SaescopeError:
        return {}  # unreadable: calibrate again and rewrite it
    return data.get("settings", {}) if data.get("index") == index else {}


def _write_cache(run: Run, key: tuple[str, str], concept: str, choice: ConceptChoice) -> None:
    settings = _read_all(run, key[0])  # choices made under an older index are dropped
    settings.setdefault(key[1], {})[concept] = dataclasses.asdict(choice)
    write_json(run.root / CALIBRATION_FILE, {"index": key[0], "settings": settings})


def _choice_from_dict(d: dict) -> ConceptChoice:
    cands = []
    for c in d["candidates"]:
        rungs = [Rung(**r) for r in c.pop("rungs")]
        cands.append(Candidate(**{**c, "features": [tuple(f) for f in c["features"]]}, rungs=rungs))
    return ConceptChoice(**{**d, "features": [tuple(f) for f in d["features"]], "candidates": cands})
