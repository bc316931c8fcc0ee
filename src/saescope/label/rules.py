"""Token rules: the attributes of a token position and the smallest rule that explains where a feature fires.

Every position is described by its normalised token ("▁Paris" → "paris"), a crude stem, the one or two tokens
before it, its character classes and its position in the window; `explain` finds, per attribute, the smallest set of
values that covers most of the activation mass while matching few silent positions (fit = F1 of precision and
recall, minus a small penalty for complex rules). Used by the offline labeller (offline.py), the concept
labeller (concepts.py), the LLM labeller (llm.py) and scoring.py (every rule is a predicate on tokens and position).
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..tokens import describe
from .evidence import Evidence, display_token

MIN_FIT = 0.5
MAX_VALUES = {"tokens": 4, "stems": 3, "prev": 3, "prev2": 2}
# Small preferences between rules that fit about equally well: simpler kinds first.
KIND_PENALTY = {"tokens": 0.0, "class": 0.0, "prev": 0.01, "stems": 0.02, "prev2": 0.03, "position": 0.03}
PER_VALUE_PENALTY = 0.01
POSITIONS = (1, 2, 4)
CLASSES = ("digits", "punctuation", "capitalised", "whitespace", "newline")
CLASS_LABELS = {"digits": "digits", "capitalised": "capitalised words", "whitespace": "whitespace",
                "newline": "newlines"}
_SUFFIXES = (("ingly", ""), ("edly", ""), ("ations", "ate"), ("ation", "ate"), ("ings", ""), ("ing", ""),
             ("ies", "y"), ("ied", "y"), ("ers", ""), ("er", ""), ("es", ""), ("ed", ""), ("ly", ""),
             ("s", ""))


# --------------------------------------------------------------------------- token attributes


@functools.lru_cache(maxsize=200_000)
def normalise(tok: str) -> str:
    """Lowercased token text without word-start markers or surrounding whitespace; a token that is
    only whitespace (Gemma's lone "▁" before digits, a no-break space merged from its byte pieces,
    newlines) or the empty first bytes of a merged character is named in brackets ("[space]",
    "[no-break space]", "[2 newlines]"), so rules can name it and no bracket name is a word."""
    text = display_token(tok)
    key = text.strip().lower()
    return key if key else f"[{describe(text)}]"


def is_named_whitespace(key: str) -> bool:
    """A `normalise` key that names a whitespace token rather than spelling it."""
    return key.startswith("[") and key.endswith("]") and len(key) > 2


@functools.lru_cache(maxsize=200_000)
def stem(key: str) -> str:
    """A crude stem: strip one common English suffix, keeping at least 3 letters."""
    if not key.isalpha():
        return key
    for suffix, repl in _SUFFIXES:
        if key.endswith(suffix) and len(key) - len(suffix) >= 3:
            return key[: -len(suffix)] + repl
    return key


@functools.lru_cache(maxsize=200_000)
def char_classes(tok: str) -> tuple[str, ...]:
    text = display_token(tok)
    core = text.strip()
    out = set()
    if not core:
        return ("newline",) if ("\n" in text or "\r" in text) else ("whitespace",)
    if any(c.isdigit() for c in core) and all(c.isdigit() or c in ".,:" for c in core):
        out.add("digits")
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        out.add("punctuation")
    first_letter = next((c for c in core if c.isalpha()), None)
    if first_letter is not None and core[0] == first_letter and first_letter.isupper():
        out.add("capitalised")
    return tuple(sorted(out))


def context_attributes(tokens: Sequence[str], kinds: Sequence[str] = tuple(KIND_PENALTY)
                       ) -> dict[str, list[tuple[str, ...]]]:
    """Per rule kind, the attribute values at each position of a context (several values
    for classes and position cut-offs, none where an attribute does not apply)."""
    n = len(tokens)
    keys = [normalise(t) for t in tokens] if {"tokens", "stems", "prev", "prev2"} & set(kinds) else []
    out: dict[str, list[tuple[str, ...]]] = {}
    for kind in kinds:
        if kind == "tokens":
            out[kind] = [(k,) for k in keys]
        elif kind == "stems":
            out[kind] = [(stem(k),) for k in keys]
        elif kind == "prev":
            before: list[tuple[str, ...]] = [()]
            out[kind] = (before + [(k,) for k in keys[:-1]])[:n]
        elif kind == "prev2":
            empty: list[tuple[str, ...]] = [(), ()]
            pairs: list[tuple[str, ...]] = [(f"{a} {b}",) if a and b else () for a, b in zip(keys, keys[1:-1])]
            out[kind] = empty[:n] + pairs
        elif kind == "class":
            out[kind] = [char_classes(t) for t in tokens]
        elif kind == "position":
            out[kind] = _positions(n)
        else:
            raise ValueError(f"unknown rule kind {kind!r}")
    return out


@functools.lru_cache(maxsize=20_000)
def window_values(tokens: tuple[str, ...], kind: str) -> frozenset[str]:
    """Every value of one attribute anywhere in a window (cached: scoring windows, such as the
    fresh held-out ones, are the same for every feature of a run)."""
    return frozenset(_flat_attributes(tokens)[kind])


@functools.lru_cache(maxsize=32_768)
def _all_attributes(tokens: tuple[str, ...]) -> dict[str, list[tuple[str, ...]]]:
    """Every kind's attributes of a window (cached: a feature's labelling windows recur across features, ~4×
    on the default run; read only)."""
    return context_attributes(tokens)


@functools.lru_cache(maxsize=32_768)
def _flat_attributes(tokens: tuple[str, ...]) -> dict[str, list[str]]:
    """Per kind, every value at every position of a window, in order (cached, read only)."""
    return {kind: [v for at in per_position for v in at] for kind, per_position in _all_attributes(tokens).items()}


@functools.lru_cache(maxsize=64)
def _positions(n: int) -> list[tuple[str, ...]]:
    return [tuple(str(k) for k in POSITIONS if pos < k) for pos in range(n)]


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A predicate on (tokens, position) with the label that describes it.

    kind: tokens | stems | prev | prev2 | class | position; `values` are matched
    against the attribute of that kind (any value matches). `fit` is the F1 on the
    labelling evidence; `certain` is False for "unclear (...)" labels.
    """

    kind: str
    values: tuple[str, ...]
    label: str
    fit: float = 0.0
    certain: bool = True

    def __call__(self, tokens: Sequence[str], pos: int) -> bool:
        """Does the rule predict the feature fires at `pos` of `tokens`?"""
        return not self.values_set.isdisjoint(context_attributes(tokens, (self.kind,))[self.kind][pos])

    def fires_in(self, tokens: Sequence[str]) -> bool:
        """Does the rule predict the feature fires somewhere in this context?"""
        return not self.values_set.isdisjoint(window_values(tuple(tokens), self.kind))

    @property
    def values_set(self) -> frozenset[str]:
        return frozenset(self.values)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "values": list(self.values), "label": self.label, "fit": self.fit,
                "certain": self.certain}

    @classmethod
    def from_dict(cls, d: dict) -> Rule:
        return cls(d["kind"], tuple(d["values"]), d["label"], float(d.get("fit", 0.0)), bool(d.get("certain", True)))

    @classmethod
    def tokens(cls, words: Sequence[str], label: str | None = None) -> Rule:
        """A rule "fires on these tokens" (normalised), e.g. to score a hand-written label."""
        values = tuple(normalise(w) for w in words)
        return cls("tokens", values, label or " / ".join(f'"{w}"' for w in words) + " (token)")


@dataclass
class _Stat:
    n_match: int = 0
    n_fire: int = 0
    mass: float = 0.0
    forms: dict | None = None  # display forms → activation mass (tokens, stems, punctuation)


def _tally(evidence: Evidence) -> tuple[dict[str, Counter[str]], dict[str, dict[str, _Stat]], float]:
    """Per kind, every value's matches over the labelling contexts; per kind, the values at firing positions with their
    firing count, activation mass and display forms; and the total activation mass.

    The matches are counted per window in C (`Counter.update`: a window's values are the same for every feature);
    only firing positions are walked one by one. A Counter keeps each value's first occurrence in order, and
    `explain`'s tables keep that order, so ties break as a single walk over every position would break them."""
    matches: dict[str, Counter[str]] = {k: Counter() for k in KIND_PENALTY}
    fired: dict[str, dict[str, _Stat]] = {k: {} for k in KIND_PENALTY}
    total_mass = 0.0
    for ctx in evidence.labelling:
        toks, acts = ctx.tokens, ctx.acts
        key = tuple(toks)
        for kind, flat in _flat_attributes(key).items():
            matches[kind].update(flat)
        total_mass += sum(a for a in acts if a > 0)
        firing = [pos for pos, a in enumerate(acts[: len(toks)]) if a > 0]
        if not firing:
            continue
        for kind, per_position in _all_attributes(key).items():
            table = fired[kind]
            keep_forms = kind in ("tokens", "stems", "class")
            for pos in firing:
                act = acts[pos]
                for value in per_position[pos]:
                    s = table.get(value)
                    if s is None:
                        s = table[value] = _Stat()
                    s.n_fire += 1
                    s.mass += act
                    if keep_forms:
                        form = toks[pos].strip() or f"[{describe(toks[pos])}]"
                        s.forms = s.forms or {}
                        s.forms[form] = s.forms.get(form, 0.0) + act
    return matches, fired, total_mass


def explain(evidence: Evidence) -> Rule:
    """The rule that best explains where the feature fires in the labelling contexts."""
    matches, fired, total_mass = _tally(evidence)
    if total_mass <= 0:
        return Rule("tokens", (), "unclear (no activating contexts to label from)", 0.0, certain=False)
    stats: dict[str, dict[str, _Stat]] = {}
    for kind, counts in matches.items():  # the values that fire, in order of first occurrence, with their matches
        table = fired[kind]
        stats[kind] = {v: table[v] for v in counts if v in table}
        for v, st in stats[kind].items():
            st.n_match = counts[v]

    candidates: list[tuple[float, Rule]] = []
    for kind, table in stats.items():
        if kind in MAX_VALUES:
            values, fit = _best_set(table, total_mass, MAX_VALUES[kind])
        else:  # single-value rules: each class, each position cut-off
            values, fit = (), 0.0
            for value in table:
                f = _fit(table[value].n_match, table[value].n_fire, table[value].mass, total_mass)
                if f > fit:
                    values, fit = (value,), f
        if values:
            penalty = KIND_PENALTY[kind] + PER_VALUE_PENALTY * (len(values) - 1)
            candidates.append((fit - penalty, Rule(kind, values, _describe(kind, values, table), round(fit, 4))))
    _, best = max(candidates, key=lambda c: c[0])
    if best.fit >= MIN_FIT:
        return best
    every = {v: stats["tokens"].get(v) or _Stat(n) for v, n in matches["tokens"].items()}  # silent tokens too
    top = sorted(every.items(), key=lambda kv: -kv[1].mass)[:3]
    words = [_plain(_top_form(s)) for _, s in top]
    label = "unclear (top tokens: " + ", ".join(words) + ")" if words else "unclear"
    return Rule("tokens", tuple(k for k, _ in top), label, round(best.fit, 4), certain=False)


def _fit(n_match: int, n_fire: int, mass: float, total_mass: float) -> float:
    if n_match == 0 or mass <= 0:
        return 0.0
    precision, recall = n_fire / n_match, mass / total_mass
    return 2 * precision * recall / (precision + recall)


def _best_set(table: dict[str, _Stat], total_mass: float, max_values: int) -> tuple[tuple[str, ...], float]:
    """Greedy: add values by activation mass (skipping imprecise ones); keep the best prefix."""
    ranked = sorted((v for v, s in table.items() if s.mass > 0), key=lambda v: -table[v].mass)
    chosen: list[str] = []
    n_match = n_fire = 0
    mass = 0.0
    best: tuple[tuple[str, ...], float] = ((), 0.0)
    best_score = 0.0
    for value in ranked:
        s = table[value]
        if s.n_fire / s.n_match < 0.3:
            continue
        chosen.append(value)
        n_match, n_fire, mass = n_match + s.n_match, n_fire + s.n_fire, mass + s.mass
        fit = _fit(n_match, n_fire, mass, total_mass)
        score = fit - PER_VALUE_PENALTY * (len(chosen) - 1)
        if score > best_score:
            best, best_score = (tuple(chosen), fit), score
        if len(chosen) == max_values:
            break
    return best


def _top_form(s: _Stat) -> str:
    return max(s.forms.items(), key=lambda kv: kv[1])[0] if s.forms else "?"


def _plain(form: str) -> str:
    """A token form in a list without quotes: a whitespace token by its name ("space")."""
    return form[1:-1] if is_named_whitespace(form) else form


def _quote(text: str) -> str:
    """A token form in a label: quoted text, or a whitespace token by name (`normalise`), unquoted."""
    if is_named_whitespace(text):
        return text[1:-1]
    return '"' + text.replace("\n", "↵") + '"'


def _describe(kind: str, values: tuple[str, ...], table: dict[str, _Stat]) -> str:
    if kind == "tokens":
        if len(values) == 1:
            mass = table[values[0]].forms or {values[0]: 1.0}
            forms = sorted(mass, key=lambda f: -mass[f])
            return " / ".join(_quote(f) for f in forms[:3]) + " (token)"
        return ", ".join(_quote(_top_form(table[v])) for v in values) + " (tokens)"
    if kind == "stems":
        forms = sorted({f.lower() for v in values for f in (table[v].forms or {})})
        return "words like " + ", ".join(_quote(f) for f in forms[:4])
    if kind == "prev":
        return "word after " + " / ".join(_quote(v) for v in values)
    if kind == "prev2":
        return "word after " + " / ".join(_quote(v) for v in values)
    if kind == "class":
        (cls,) = values
        if cls == "punctuation":
            mass = table[cls].forms or {}
            forms = sorted(mass, key=lambda f: -mass[f])
            return "punctuation: " + " ".join(forms[:4])
        return CLASS_LABELS[cls]
    if kind == "position":
        k = int(values[0])
        return "first token of the context" if k == 1 else f"first {k} tokens of the context"
    raise ValueError(kind)
