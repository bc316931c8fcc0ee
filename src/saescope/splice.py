"""Splicing SAEs into a model: hooks that change one feature of one SAE while the model runs.

Three interventions, each on one feature of one SAE (``w_dec[idx]`` is the feature's
direction in model activation units; ``f`` are the SAE's codes of the activation x):

    add     x' = x + value · typical · w_dec[idx]            at every position
    clamp   x' = x + (value − f_idx(x)) · w_dec[idx]         = decode(f') + (x − decode(f)), f'_idx = value
    ablate  clamp with value 0 (an inactive feature leaves x bit-identical)

``typical`` makes ``add`` strengths comparable between features: it is the feature's
``max_act`` in features.sqlite (the largest activation seen by the analysis, so
strength 1 adds the feature "as strongly as it ever fires"), or 1 when the run has
no statistics for it (then the strength is in activation units). Clamp values are
always in activation units.

`steering(...)` is a context manager: one hook per site (adds first, then clamps,
so a clamp holds on the final activation), removed in ``finally`` whatever happens.
Positions holding the BOS token are never modified (the attention sink). Hooks act
on every forward, including the one-token forwards of cached generation.

`generate_ids(...)` generates under whatever hooks are in place (seeded, batched rows share the
sampling noise: `SharedNoiseSampling`); steer.py and conceptsteer.py both generate through it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from .devices import decode_threads
from .errors import SaescopeError
from .models import LoadedModel, Site
from .sae import SAE

Mode = Literal["add", "clamp", "ablate"]
MODES = ("add", "clamp", "ablate")
MAX_STRENGTH = 1000.0
"""Largest |strength| of an `add` (× the feature's typical activation): beyond it the text is noise or NaN."""
MAX_CLAMP = 1e5
"""Largest |value| of a clamp (activation units)."""


@dataclass(frozen=True)
class Intervention:
    """Change feature `idx` of SAE `sae_id`: add `value`·typical·w_dec, clamp to `value`, or ablate."""

    sae_id: str
    idx: int
    mode: Mode = "add"
    value: float = 0.0
    """add: strength (× typical activation); clamp: the feature's value in activation units; ablate: ignored."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise SaescopeError(f"unknown intervention mode '{self.mode}': choose from {', '.join(MODES)}")
        check_strength(self.value, self.mode, f"feature {self.sae_id}:{self.idx}")
        if self.mode == "ablate" and self.value != 0:
            object.__setattr__(self, "value", 0.0)

    def __str__(self) -> str:
        tail = {"add": f"={self.value:g}", "clamp": f"@clamp={self.value:g}", "ablate": "@ablate"}[self.mode]
        return f"{self.sae_id}:{self.idx}{tail}"


def check_strength(value: float, mode: Mode = "add", what: str = "the strength") -> float:
    """The one check of a steering strength (CLI, API, web): finite and within ±MAX_STRENGTH (±MAX_CLAMP for clamps)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SaescopeError(f"{what} has strength {value!r}: give a number") from None
    bound, word = (MAX_CLAMP, "value") if mode == "clamp" else (MAX_STRENGTH, "strength")
    if not math.isfinite(value):
        raise SaescopeError(f"{what} has {word} {value}: give a finite number")
    if abs(value) > bound:
        raise SaescopeError(f"{what} has {word} {value:g}, beyond ±{bound:g}: give a smaller number")
    return value


# ---------------------------------------------------------------------------- hooks


@dataclass
class _Clamp:
    sae: SAE
    idx: int
    value: float
    direction: torch.Tensor  # (d_in,) w_dec[idx]


@dataclass
class _SitePlan:
    site: Site
    add: torch.Tensor | None = None  # (d_in,) sum of every add vector at this site
    clamps: list[_Clamp] = field(default_factory=list)


class _Steerer:
    """The hooks of one `steering` context. `keep` masks the BOS positions of the current forward."""

    def __init__(self, lm: LoadedModel, plans: list[_SitePlan]):
        self.lm = lm
        self.plans = plans
        self.keep: torch.Tensor | None = None  # (batch, seq, 1) True where a position may change

    def record_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        bos = self.lm.bos_id
        self.keep = None if ids is None or bos is None else (ids != bos).unsqueeze(-1)

    def after_forward(self, module, args, kwargs, output):
        self.keep = None  # also runs when the forward raised (always_call); output is then None
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor) and not torch.isfinite(logits).all():
            raise SaescopeError("steering made the model's output NaN or Inf: lower the strengths")

    def apply(self, plan: _SitePlan, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != plan.site.width:
            return x  # not the activation we planned for (a direct call of a submodule)
        new = x.float()
        if plan.add is not None:
            new = new + plan.add.to(new.device)
        for c in plan.clamps:
            sae_x = new.to(c.sae.w_enc.device)
            delta = (c.value - c.sae.feature_code(sae_x, c.idx)).unsqueeze(-1) * c.direction
            new = new + delta.to(new.device)
        if not torch.isfinite(new).all():
            raise SaescopeError(f"steering made the activation at {plan.site.key} NaN or Inf: lower the strengths")
        new = new.to(x.dtype)
        keep = self.keep
        if keep is not None and keep.shape[:2] == x.shape[:2]:
            new = torch.where(keep.to(x.device), new, x)
        return new


def _plans(lm: LoadedModel, saes: dict[str, SAE], interventions: Sequence[Intervention],
           typical: dict | None) -> list[_SitePlan]:
    """Check every intervention and group them by site (one hook per site)."""
    by_site: dict[str, _SitePlan] = {}
    typical = typical or {}
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise SaescopeError(f"expected an Intervention, got {iv!r}: use parse_feature_spec for strings")
        sae = saes.get(iv.sae_id)
        if sae is None:
            raise SaescopeError(f"no SAE '{iv.sae_id}' was given for feature {iv}: pass it in `saes`")
        if not 0 <= int(iv.idx) < sae.cfg.width:
            raise SaescopeError(f"feature index {iv.idx} is out of range: {iv.sae_id} has features "
                                f"0..{sae.cfg.width - 1}")
        site = lm.site(sae.cfg.site, sae.cfg.layer)
        if site.width != sae.cfg.d_in:
            raise SaescopeError(f"SAE {iv.sae_id} reads {sae.cfg.d_in}-wide activations but {site.key} of "
                                f"{lm.name} is {site.width} wide: use SAEs trained on this model")
        plan = by_site.setdefault(site.key, _SitePlan(site))
        direction = sae.w_dec[int(iv.idx)].detach().float()
        if iv.mode == "add":
            vec = float(iv.value) * float(typical.get((iv.sae_id, int(iv.idx)), 1.0)) * direction
            if not torch.isfinite(vec).all():
                raise SaescopeError(f"feature {iv} gives a NaN/Inf steering vector: lower the strength")
            vec = vec.to(lm.device)
            plan.add = vec if plan.add is None else plan.add + vec
        else:
            plan.clamps.append(_Clamp(sae, int(iv.idx), float(iv.value), direction.to(sae.w_enc.device)))
    return list(by_site.values())


@contextlib.contextmanager
def steering(lm: LoadedModel, saes: dict[str, SAE], interventions: Sequence[Intervention],
             typical: dict[tuple[str, int], float] | None = None) -> Iterator[None]:
    """Apply `interventions` to every forward of `lm.model` inside the block.

    `saes` maps each intervention's `sae_id` to its SAE; `typical[(sae_id, idx)]` scales
    `add` strengths (missing: 1). Hooks are removed on exit, also after an exception.
    """
    with _hooked(lm, _plans(lm, saes, interventions, typical)):
        yield


@contextlib.contextmanager
def steering_rows(lm: LoadedModel, saes: dict[str, SAE], rows: Sequence[Sequence[Intervention]],
                  typical: dict[tuple[str, int], float] | None = None) -> Iterator[None]:
    """Like `steering`, but batch row r gets its own `add` interventions `rows[r]` (an empty list:
    unsteered), so one batched `generate` tries many features and strengths at once."""
    by_site: dict[str, _SitePlan] = {}
    per_row = [_plans(lm, saes, ivs, typical) for ivs in rows]
    for r, plans in enumerate(per_row):
        for plan in plans:
            if plan.clamps:
                raise SaescopeError("steering_rows takes add interventions only")
            merged = by_site.setdefault(plan.site.key, _SitePlan(plan.site))
            if merged.add is None:
                merged.add = torch.zeros(len(rows), 1, plan.site.width, device=lm.device)
            if plan.add is not None:
                merged.add[r, 0] += plan.add
    with _hooked(lm, list(by_site.values())):
        yield


@contextlib.contextmanager
def _hooked(lm: LoadedModel, plans: list[_SitePlan]) -> Iterator[None]:
    """One hook per site plan (and the BOS bookkeeping), removed in `finally`."""
    steerer = _Steerer(lm, plans)
    handles = []
    try:
        if plans:
            handles.append(lm.model.register_forward_pre_hook(steerer.record_ids, with_kwargs=True))
            handles.append(lm.model.register_forward_hook(steerer.after_forward, with_kwargs=True, always_call=True))
        for plan in plans:
            handles.append(plan.site.hook(functools.partial(steerer.apply, plan)))
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------- generation under the hooks


def generate_ids(lm: LoadedModel, input_ids: torch.Tensor, max_new_tokens: int = 40, greedy: bool = True,
                 temperature: float = 1.0, seed: int = 0, on_token: Callable[[int], None] | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """New token ids (batch, n) continuing `input_ids` (batch, P; left-padded where `attention_mask` says).
    Sampling is seeded, draws the same noise for every row (`SharedNoiseSampling`) and leaves the global RNG
    alone.

    `on_token(id)` is called with each new token as it is generated (batch of one); an exception it raises
    stops the generation and propagates (how a caller cancels)."""
    from transformers import GenerationConfig, LogitsProcessorList

    if not greedy and not (math.isfinite(temperature) and temperature > 0):
        raise SaescopeError(f"temperature must be a positive number, got {temperature}")
    tok = lm.tokenizer
    gen_cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), do_sample=False, temperature=None, top_k=None,
                               top_p=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ids = input_ids.to(lm.device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(lm.device)
    processors = LogitsProcessorList([] if greedy else [SharedNoiseSampling(temperature, seed, lm.device)])
    streamer = _TokenStreamer(on_token) if on_token is not None else None
    with torch.no_grad(), decode_threads(lm.device):
        out = lm.model.generate(  # type: ignore[operator]  # transformers' stubs type `generate` as a Tensor
            input_ids=ids, attention_mask=mask, generation_config=gen_cfg, logits_processor=processors,
            streamer=streamer)
    new = out[:, ids.shape[1]:].cpu()
    return new[0] if input_ids.shape[0] == 1 and attention_mask is None else new


class SharedNoiseSampling:
    """Sampling at `temperature` as a logits processor for greedy decoding: the Gumbel-max trick,
    argmax(logits / T + G) with G ~ Gumbel(0, 1), draws a token from softmax(logits / T). One noise
    vector per step, drawn from a generator seeded with `seed`, is shared by every row of the batch, so
    rows that differ only by their steering see the same random numbers (as separate generations with
    one seed do), and a batched generate gives each row what it would get alone."""

    def __init__(self, temperature: float, seed: int, device: torch.device):
        self.temperature = float(temperature)
        self.gen = torch.Generator(device=device).manual_seed(int(seed))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.rand(scores.shape[-1], generator=self.gen, device=scores.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))  # (vocab,)
        return scores.float() / self.temperature + gumbel


class _TokenStreamer:
    """The streamer interface of transformers' `generate` (put/end): the first put is the prompt, each
    later put one new token (batch of one)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.on_token(int(t))

    def end(self) -> None:
        pass


def until_eos(ids: torch.Tensor, tok) -> torch.Tensor:
    """A generated row up to and including its first EOS (a batched generate pads the rows that finished
    early; a generate of one row stops there)."""
    hits = (ids == tok.eos_token_id).nonzero() if tok.eos_token_id is not None else []
    return ids[:int(hits[0]) + 1] if len(hits) else ids
