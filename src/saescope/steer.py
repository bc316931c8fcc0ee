"""Generation with SAE feature interventions (splice.py), and a measurement of what they did.

`steer(...)` generates the same prompt with and without the interventions (same
seed) and measures the effect (see `Effect`); `sweep(...)` does it for a list of
strengths and plots effect against perplexity cost.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch

from . import conceptsteer
from .analyze import logit_effects
from .devices import decode_threads
from .embed import preload
from .errors import SaescopeError
from .fsio import atomic_path
from .harvest import capture
from .models import LoadedModel
from .runs import Run, as_run
from .sae import SAE
from .splice import (  # noqa: F401  (MAX_STRENGTH, steering_rows, SharedNoiseSampling: re-exported, the public API)
    MAX_STRENGTH,
    MODES,
    Intervention,
    Mode,
    SharedNoiseSampling,
    _plans,
    check_strength,
    generate_ids,
    steering,
    steering_rows,
    until_eos,
)
from .tokens import token_text

TOP_TOKENS = 10
"""How many promoted tokens the probability metric sums over."""


# ---------------------------------------------------------------------------- generation


def _encode_prompt(lm: LoadedModel, prompt: str, max_new_tokens: int) -> torch.Tensor:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SaescopeError("the prompt is empty: give some text to continue")
    if int(max_new_tokens) < 1:
        raise SaescopeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, P)
    lm.check_fits(ids.shape[1], int(max_new_tokens), what="the prompt")
    return ids


def generate(lm: LoadedModel, prompt: str, max_new_tokens: int = 40, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0) -> str:
    """The model's continuation of `prompt` (the new text only). Steer it by calling inside `steering`."""
    ids = _encode_prompt(lm, prompt, max_new_tokens)
    new = generate_ids(lm, ids, max_new_tokens, greedy, temperature, seed)
    return _text(lm, new)


def _text(lm: LoadedModel, ids: torch.Tensor) -> str:
    """The text of new token ids (special tokens dropped)."""
    return str(lm.tokenizer.decode(ids, skip_special_tokens=True))


# ---------------------------------------------------------------------------- measurement


@dataclass
class Effect:
    """What one intervention did, measured on the generated continuations (new tokens only).

    Activations are the feature's SAE code averaged over continuation positions:
    `act_unsteered` / `act_steered_text` re-encode each continuation read by the
    *unsteered* model (what the text contains); `act_during` is the code of the
    steered activation while generating (what the model was made to carry).
    `prob_*` is the probability mass the model puts on the feature's top promoted
    tokens, averaged over generated positions (unsteered model on its own text,
    steered model on its own text). NaN where a continuation is empty.
    """

    sae_id: str
    idx: int
    mode: str
    value: float
    typical: float
    act_unsteered: float
    act_steered_text: float
    act_during: float
    promoted_tokens: list[str]
    prob_unsteered: float
    prob_steered: float

    @property
    def act_change(self) -> float:
        return self.act_steered_text - self.act_unsteered

    @property
    def prob_change(self) -> float:
        return self.prob_steered - self.prob_unsteered


@dataclass
class SteerResult:
    """Unsteered and steered continuations of one prompt (same seed), and what changed.

    `ce_*` are mean cross-entropies (nats/token) of each continuation under the
    unsteered model; `ppl_cost` = ce_steered − ce_unsteered.
    """

    prompt: str
    unsteered: str
    steered: str
    interventions: list[Intervention]
    effects: list[Effect]
    ce_unsteered: float
    ce_steered: float
    concept: conceptsteer.ConceptEffect | None = None  # steering by concept: the choice and the concept's rise

    @property
    def ppl_cost(self) -> float:
        return self.ce_steered - self.ce_unsteered

    @property
    def effect(self) -> Effect:
        """The effect on the first (target) intervention's feature."""
        return self.effects[0]


@dataclass
class _Pass:
    """One forward over prompt + continuation: per-SAE codes and per-position measures on the continuation."""

    acts: dict[tuple[str, int], float]
    probs: dict[tuple[str, int], float]
    ce: float


def _forward_measure(lm: LoadedModel, prompt_ids: torch.Tensor, new_ids: torch.Tensor, saes: dict[str, SAE],
                     targets: list[Intervention], promoted: dict[tuple[str, int], list[int]]) -> _Pass:
    """Run the model (under whatever hooks are active) and measure the continuation."""
    return _forward_measures(lm, prompt_ids, [new_ids], saes, targets, promoted)[0]


def _forward_measures(lm: LoadedModel, prompt_ids: torch.Tensor, news: list[torch.Tensor], saes: dict[str, SAE],
                      targets: list[Intervention], promoted: dict[tuple[str, int], list[int]]) -> list[_Pass]:
    """Measure each continuation of the prompt in one forward (a batch padded after the texts, so each row's
    positions are as in its own forward; under whatever hooks are active, `steering_rows` included)."""
    keys = [(t.sae_id, t.idx) for t in targets]
    nothing = _Pass(dict.fromkeys(keys, math.nan), dict.fromkeys(keys, math.nan), math.nan)  # an empty continuation
    p, width = prompt_ids.shape[1], max(new.numel() for new in news)
    if width == 0:
        return [nothing for _ in news]
    ids = torch.zeros(len(news), p + width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, new in enumerate(news):
        ids[r, :p + new.numel()], mask[r, :p + new.numel()] = torch.cat([prompt_ids[0], new]), 1
    sites = {t.sae_id: lm.site(saes[t.sae_id].cfg.site, saes[t.sae_id].cfg.layer) for t in targets}
    with capture(lm, list({s.key: s for s in sites.values()}.values()), stop_early=False) as store, \
            torch.no_grad():
        logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False).logits
        passes = []
        for r, new in enumerate(news):
            n = new.numel()
            if n == 0:
                passes.append(nothing)
                continue
            acts = {}
            for t in targets:
                sae = saes[t.sae_id]
                x = store[sites[t.sae_id].key][r, p:p + n].float().to(sae.w_enc.device)  # (n, d_in)
                acts[(t.sae_id, t.idx)] = float(sae.feature_code(x, t.idx).mean())
            passes.append(_measure_logits(logits[r, p - 1:p + n - 1].float(), new, keys, promoted, acts))
    return passes


def _measure_logits(logits: torch.Tensor, new: torch.Tensor, keys, promoted, acts) -> _Pass:
    """CE of the continuation `new` (n,) under `logits` (n, vocab), and the mass on each feature's promoted tokens."""
    logp = logits.log_softmax(-1)
    ce = float(-logp.gather(1, new.to(logp.device)[:, None]).mean())
    probs = {}
    for k in keys:
        tokens = promoted.get(k) or []
        probs[k] = float(logp[:, tokens].exp().sum(-1).mean()) if tokens else math.nan
    return _Pass(acts, probs, ce)


def promoted_token_ids(lm: LoadedModel, sae: SAE, idx: int, db_tokens: list | None = None,
                       k: int = TOP_TOKENS) -> list[int]:
    """The feature's top promoted tokens: `logits_pos` from the feature DB when its tokens map to ids,
    else the top-k of its direct logit effect (`analyze.logit_effects`, as the atlas computes it)."""
    if db_tokens:
        tok = lm.tokenizer
        found = [tok.convert_tokens_to_ids(str(t[0])) for t in db_tokens[:k] if t]
        ids = [i for i in found if isinstance(i, int) and i != tok.unk_token_id]
        if len(ids) * 2 >= min(k, len(db_tokens)):
            return ids
    try:  # the one computation of a feature's logit effects (analyze.py), for one feature
        effects = logit_effects(lm, sae, n=k, features=torch.tensor([idx]))
    except SaescopeError:  # a decoder that does not write the residual stream: no promoted tokens
        return []
    return effects["pos_ids"][0].tolist()


def _promoted_strings(lm: LoadedModel, ids: list[int]) -> list[str]:
    return [token_text(str(t)) for t in lm.tokenizer.convert_ids_to_tokens(ids)]


# ---------------------------------------------------------------------------- parsing specs

_SPEC = re.compile(r"^(?P<sae>[^:]+):(?P<idx>-?\d+)(?:@(?P<mode>[a-z]+))?(?:=(?P<value>[^=]+))?$")


def parse_feature_spec(spec: str) -> tuple[str, int, Mode, float]:
    """'LAYER:INDEX=STRENGTH', 'site/LAYER:INDEX=S', '...:INDEX@clamp=V', '...:INDEX@ablate' →
    (sae_ref, idx, mode, value). `sae_ref` is what `Run.resolve_sae` accepts."""
    hint = "write LAYER:INDEX=STRENGTH, site/LAYER:INDEX=STRENGTH, ...:INDEX@clamp=VALUE or ...:INDEX@ablate"
    m = _SPEC.match(str(spec).strip().replace(" ", ""))
    if not m:
        raise SaescopeError(f"cannot read feature '{spec}': {hint}")
    sae_ref, idx, name, raw = m["sae"], int(m["idx"]), m["mode"] or "add", m["value"]
    if name not in MODES:
        raise SaescopeError(f"unknown mode '@{name}' in '{spec}': use @clamp or @ablate (no @ means add)")
    mode = cast(Mode, name)
    if idx < 0:
        raise SaescopeError(f"feature index {idx} in '{spec}' is negative: indices start at 0")
    if mode == "ablate":
        if raw is not None:
            raise SaescopeError(f"'{spec}': @ablate takes no value ({hint})")
        return sae_ref, idx, mode, 0.0
    if raw is None:
        raise SaescopeError(f"'{spec}' has no {'value' if mode == 'clamp' else 'strength'}: {hint}")
    try:
        value = float(raw)
    except ValueError:
        raise SaescopeError(f"'{raw}' in '{spec}' is not a number: {hint}") from None
    return sae_ref, idx, mode, check_strength(value, mode, f"'{spec}'")


# ---------------------------------------------------------------------------- steer / sweep


@dataclass
class _Setup:
    lm: LoadedModel
    saes: dict[str, SAE]
    interventions: list[Intervention]
    typical: dict[tuple[str, int], float]
    promoted: dict[tuple[str, int], list[int]]


def _open_run(source):
    """A run (`runs.as_run`) when `source` is one or a folder; None for a bare LoadedModel."""
    return as_run(source) if isinstance(source, Run | str | Path) else None


def _setup(source, interventions, saes, typical, concept, typical_stat) -> _Setup:
    if typical_stat not in ("max_act", "mean_act"):
        raise SaescopeError(f"typical_stat must be 'max_act' or 'mean_act', got '{typical_stat}'")
    run = _open_run(source)
    if run is None and not isinstance(source, LoadedModel):
        raise SaescopeError(f"cannot steer {type(source).__name__}: give a run folder, a Run or a LoadedModel")
    lm = run.generation_model if run is not None else source
    saes = dict(saes or {})
    ivs: list[Intervention] = []
    for iv in interventions or ():
        if isinstance(iv, str):
            if run is None:
                raise SaescopeError(f"feature '{iv}' names an SAE by layer: steer a run, or pass Intervention "
                                    "objects and `saes`")
            ref, idx, mode, value = parse_feature_spec(iv)
            iv = Intervention(run.resolve_sae(ref), idx, mode, value)
        elif run is not None and iv.sae_id not in saes:
            iv = replace(iv, sae_id=run.resolve_sae(iv.sae_id))
        ivs.append(iv)
    if concept is not None:
        ivs[:0] = concept.interventions()
    if not ivs:
        raise SaescopeError("nothing to steer: give at least one feature (e.g. 5:123=4) or a concept")
    for iv in ivs:
        if iv.sae_id not in saes:
            if run is None:
                raise SaescopeError(f"no SAE '{iv.sae_id}' was given: pass it in `saes`")
            saes[iv.sae_id] = run.load_sae(iv.sae_id)
    typical = dict(typical or {})
    db_feats = _db_features(run, ivs) if run is not None else {}
    promoted = {}
    for iv in ivs:
        key = (iv.sae_id, iv.idx)
        row = db_feats.get(key) or {}
        stat = row.get(typical_stat)
        if key not in typical:
            typical[key] = float(stat) if stat and math.isfinite(stat) and stat > 0 else 1.0
        if 0 <= iv.idx < saes[iv.sae_id].cfg.width:
            promoted[key] = promoted_token_ids(lm, saes[iv.sae_id], iv.idx, row.get("logits_pos"))
    return _Setup(lm, saes, ivs, typical, promoted)


def _db_features(run, ivs: list[Intervention]) -> dict:
    if not run.db_path.is_file():
        return {}
    out = {}
    with run.db(readonly=True) as db:
        for iv in ivs:
            row = db.feature(iv.sae_id, iv.idx)
            if row is not None:
                out[(iv.sae_id, iv.idx)] = row
    return out


@dataclass
class _Baseline:
    text: str
    ids: torch.Tensor
    measured: _Pass


def _baseline(s: _Setup, prompt_ids, max_new_tokens, greedy, temperature, seed, on_token=None) -> _Baseline:
    new = generate_ids(s.lm, prompt_ids, max_new_tokens, greedy, temperature, seed, on_token)
    measured = _forward_measure(s.lm, prompt_ids, new, s.saes, s.interventions, s.promoted)
    return _Baseline(_text(s.lm, new), new, measured)


def _generate_steered(s: _Setup, prompt_ids, max_new_tokens, greedy, temperature, seed,
                      on_token=None) -> tuple[torch.Tensor, _Pass]:
    """The steered continuation's ids, and its measures while steering."""
    with steering(s.lm, s.saes, s.interventions, s.typical):
        new = generate_ids(s.lm, prompt_ids, max_new_tokens, greedy, temperature, seed, on_token)
        during = _forward_measure(s.lm, prompt_ids, new, s.saes, s.interventions, s.promoted)
    return new, during


def _steered(s: _Setup, prompt: str, prompt_ids, base: _Baseline, max_new_tokens, greedy, temperature,
             seed) -> SteerResult:
    new, during = _generate_steered(s, prompt_ids, max_new_tokens, greedy, temperature, seed)
    as_text = _forward_measure(s.lm, prompt_ids, new, s.saes, s.interventions, s.promoted)
    return _result(s, prompt, base, new, during, as_text)


def _result(s: _Setup, prompt: str, base: _Baseline, new: torch.Tensor, during: _Pass, as_text: _Pass
            ) -> SteerResult:
    """The result of one steered continuation; `as_text` measures it read by the unsteered model."""
    effects = []
    for iv in s.interventions:
        key = (iv.sae_id, iv.idx)
        effects.append(Effect(iv.sae_id, iv.idx, iv.mode, iv.value, s.typical[key],
                              act_unsteered=base.measured.acts[key], act_steered_text=as_text.acts[key],
                              act_during=during.acts[key],
                              promoted_tokens=_promoted_strings(s.lm, s.promoted.get(key, [])),
                              prob_unsteered=base.measured.probs[key], prob_steered=during.probs[key]))
    return SteerResult(prompt, base.text, _text(s.lm, new),
                       list(s.interventions), effects, ce_unsteered=base.measured.ce, ce_steered=as_text.ce)


def steer(source, prompt: str, interventions: Sequence[Intervention | str] = (), *,
          saes: dict[str, SAE] | None = None, typical: dict[tuple[str, int], float] | None = None,
          max_new_tokens: int = 40, greedy: bool = True, temperature: float = 1.0, seed: int = 0,
          concept: str | None = None, concept_strength: float | None = None, concept_config=None,
          typical_stat: str = "max_act", on_token: Callable[[str, int], None] | None = None) -> SteerResult:
    """Continue `prompt` without and with `interventions` (same seed) and measure the difference.

    `source` is a run (folder or `Run`: SAEs, typical activations and promoted tokens come
    from it, and features may be spec strings like "5:123=4") or a `LoadedModel` (then give
    `saes`). `concept` steers the features whose output writes the concept (added first), at the
    strength `conceptsteer.choose` calibrates (cached per concept in the run), or at
    `concept_strength` × their max activation when given; `result.concept` says what was chosen
    and why, and how much the concept rose in the text.

    `on_token(which, id)` sees each new token as it is generated, which = "steered" (generated
    first) then "unsteered"; an exception it raises stops the call (how a caller cancels).
    """
    run = _open_run(source)
    source = run if run is not None else source  # open a folder once: choose and _setup share its model
    choice = _concept_choice(run, concept, concept_strength, concept_config)
    s = _setup(source, interventions, saes, typical, choice, typical_stat)
    prompt_ids = _encode_prompt(s.lm, prompt, max_new_tokens)
    _plans(s.lm, s.saes, s.interventions, s.typical)  # fail on bad input before generating anything
    if choice is not None:
        preload()  # measure_effect embeds the texts: load MiniLM while the model generates them
    with decode_threads(s.lm.device):
        if on_token is None and all(iv.mode == "add" for iv in s.interventions):
            new, base_new = _generate_both(s, prompt_ids, max_new_tokens, greedy, temperature, seed)
            with steering_rows(s.lm, s.saes, [s.interventions, [], []], s.typical):  # during, baseline, as text
                during, base_pass, as_text = _forward_measures(s.lm, prompt_ids, [new, base_new, new], s.saes,
                                                               s.interventions, s.promoted)
            base = _Baseline(_text(s.lm, base_new), base_new, base_pass)
        else:
            stream = {w: (lambda t, w=w: on_token(w, t)) if on_token else None for w in ("steered", "unsteered")}
            new, during = _generate_steered(s, prompt_ids, max_new_tokens, greedy, temperature, seed,
                                            stream["steered"])
            base = _baseline(s, prompt_ids, max_new_tokens, greedy, temperature, seed, stream["unsteered"])
            as_text = _forward_measure(s.lm, prompt_ids, new, s.saes, s.interventions, s.promoted)
        result = _result(s, prompt, base, new, during, as_text)
    if choice is not None:
        result.concept = conceptsteer.measure_effect(choice, result.unsteered, result.steered)
    return result


def _generate_both(s: _Setup, prompt_ids, max_new_tokens, greedy, temperature, seed
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The steered and the unsteered continuation in one batched generate (rows differ only by their `add`
    interventions and share the sampling noise, so each row is what its own generate would give)."""
    ids = prompt_ids.repeat(2, 1)
    with steering_rows(s.lm, s.saes, [s.interventions, []], s.typical):
        new = generate_ids(s.lm, ids, max_new_tokens, greedy, temperature, seed, attention_mask=torch.ones_like(ids))
    steered, unsteered = (until_eos(row, s.lm.tokenizer) for row in new)
    return steered, unsteered


def _concept_choice(run, concept, strength, config):
    if concept is None:
        return None
    if run is None:
        raise SaescopeError("steering by concept searches a run's features: give a run, not a bare model")
    cfg = config or conceptsteer.ConceptSteerConfig()
    if strength is not None:
        return conceptsteer.fixed(run, concept, check_strength(strength, "add", f"concept '{concept}'"), cfg)
    return conceptsteer.choose(run, concept, cfg, lm=run.generation_model)


def sweep(source, prompt: str, feature: Intervention | str, strengths: Sequence[float], *,
          png: str | Path | None = None, saes: dict[str, SAE] | None = None,
          typical: dict[tuple[str, int], float] | None = None, max_new_tokens: int = 40, greedy: bool = True,
          temperature: float = 1.0, seed: int = 0, typical_stat: str = "max_act") -> list[SteerResult]:
    """Steer one feature at each of `strengths` (add strength or clamp value); the unsteered
    continuation is generated once. With `png`, plot effect and cost against strength."""
    if not strengths:
        raise SaescopeError("give at least one strength to sweep")
    if png is not None and Path(png).is_dir():
        raise SaescopeError(f"{png} is a folder: give the plot a file name, e.g. --png sweep.png")
    s = _setup(source, [feature], saes, typical, None, typical_stat)
    target = s.interventions[0]
    if target.mode == "ablate":
        raise SaescopeError(f"'{target}' is an ablation, which has no strength to sweep: use add or @clamp")
    strengths = [check_strength(v, target.mode, "the sweep") for v in strengths]
    prompt_ids = _encode_prompt(s.lm, prompt, max_new_tokens)
    _plans(s.lm, s.saes, s.interventions, s.typical)  # fail on bad input before generating anything
    base = _baseline(s, prompt_ids, max_new_tokens, greedy, temperature, seed)
    results = []
    for v in strengths:
        s.interventions = [replace(target, value=v)]
        results.append(_steered(s, prompt, prompt_ids, base, max_new_tokens, greedy, temperature, seed))
    if png is not None:
        plot_sweep(results, png)
    return results


def plot_sweep(results: list[SteerResult], png: str | Path) -> Path:
    """Two panels: effect and cost against strength; effect against cost. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise SaescopeError("no sweep results to plot")
    png = Path(png)
    xs = [r.effect.value for r in results]
    act = [r.effect.act_steered_text for r in results]
    during = [r.effect.act_during for r in results]
    cost = [r.ppl_cost for r in results]
    dprob = [r.effect.prob_change for r in results]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    label = "strength (× typical act)" if results[0].effect.mode == "add" else "clamp value"
    ax1.plot(xs, act, "o-", label="feature act. in steered text")
    ax1.plot(xs, during, "s--", label="feature act. while steering")
    ax1.axhline(results[0].effect.act_unsteered, color="grey", lw=0.8, label="unsteered text")
    ax1.set_xlabel(label)
    ax1.set_ylabel("mean SAE code")
    twin = ax1.twinx()
    twin.plot(xs, cost, "^:", color="tab:red", label="CE cost (nats/token)")
    twin.set_ylabel("CE cost (nats/token)", color="tab:red")
    lines = ax1.get_lines() + twin.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    ax2.plot(cost, dprob, "o-")
    for x, c, p in zip(xs, cost, dprob):
        ax2.annotate(f"{x:g}", (c, p), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel("CE cost of steered text (nats/token)")
    ax2.set_ylabel("Δ prob. of promoted tokens")
    fig.suptitle(f"steering {results[0].interventions[0].sae_id}:{results[0].effect.idx}", fontsize=10)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return png
