"""Detection scoring (as in EleutherAI's delphi): does a label predict where a feature fires?

Each held-out context (see evidence.py: odd-ranked top/quantile examples, which
fire, and random examples, which do not; for offline scores also fresh windows of
held-out text no labeller read, up to 20 firing and 60 silent, with their real
activations: detection.py) gets a prediction "the feature fires somewhere in here"
from the label, compared with the truth (`max_act > 0`):

    detection-offline   the offline rule's predicate, applied to every position
    detection-llm       an LLM reads the label and a shuffled batch of plain-text
                        contexts and answers with the numbers of those it fires on

For concept labels (concepts.py) "detection-offline" predicts from the label's
concept (a context's similarity to the label above a threshold fitted on the
labelling side), its token rule, or either, whichever fitted the labelling side
best; the details say which ("predictor"). A second score judges the output side:

    output-offline      AUC of the label's similarity to the feature's promoted
                        tokens against random vocabulary words (0.5 = chance,
                        1 = every promoted word is closer to the label than any
                        random word); details: n_promoted, n_random

The stored value is the balanced accuracy (mean of the true-positive and
true-negative rates; 0.5 = chance), with n, tp, fp, tn, fn and F1 in the details,
and for offline scores the protocol ("fresh" or "stored"), the class counts and
the balanced accuracy on the stored windows alone (the earlier protocol).
A feature without both activating and non-activating held-out contexts is not
scored: its accuracy would say nothing about the label.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from ..featuredb import FeatureDB
from .evidence import Context, Evidence

METHOD_OFFLINE = "detection-offline"
METHOD_LLM = "detection-llm"
METHOD_OUTPUT = "output-offline"


class RejectedAnswer(Exception):
    """An LLM answer that is empty, malformed or not what was asked for."""


@dataclass(frozen=True)
class DetectionScore:
    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def balanced_accuracy(self) -> float:
        return 0.5 * (self.tp / (self.tp + self.fn) + self.tn / (self.tn + self.fp))

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    @property
    def value(self) -> float:
        return self.balanced_accuracy

    def details(self, **extra) -> dict:
        return {"n": self.n, "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "balanced_accuracy": round(self.balanced_accuracy, 4), "f1": round(self.f1, 4), **extra}


def confusion(predicted: Sequence[bool], truth: Sequence[bool]) -> DetectionScore | None:
    """Counts of a binary prediction; None unless both classes are present in `truth`."""
    if not any(truth) or all(truth):
        return None
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    return DetectionScore(tp=tp, fp=fp, tn=len(truth) - tp - fp - fn, fn=fn)


def score_offline(evidence: Evidence, rule, db: FeatureDB | None = None,
                  label_id: int | None = None, fresh=None) -> DetectionScore | None:
    """Score an offline rule (a predicate on (tokens, position)) on the held-out contexts (with
    `fresh`, a detection.DetectionSet, its fresh windows too); with `db` and `label_id`, store it
    as "detection-offline" (details include the rule and the protocol)."""
    from .detection import held_out_windows

    contexts, protocol = held_out_windows(evidence, fresh)
    predicted = [rule.fires_in(ctx.tokens) for ctx in contexts]
    score, extra = _with_protocol(predicted, contexts, protocol)
    if score is not None and db is not None and label_id is not None:
        db.add_score(label_id, METHOD_OFFLINE, score.value, score.details(rule=rule.to_dict(), **extra))
    return score


def _with_protocol(predicted: Sequence[bool], contexts: Sequence[Context], protocol: str
                   ) -> tuple[DetectionScore | None, dict]:
    """The score on every scoring context, and the details that say how it was measured: the
    protocol, the class counts, and the same label's score on the stored windows alone (the
    earlier protocol, kept for comparison)."""
    score = confusion(predicted, [ctx.fires for ctx in contexts])
    stored = [(p, c.fires) for p, c in zip(predicted, contexts) if c.kind != "fresh"]
    old = confusion([p for p, _ in stored], [t for _, t in stored])
    n_pos = sum(c.fires for c in contexts)
    extra = {"protocol": protocol, "n_firing": n_pos, "n_silent": len(contexts) - n_pos,
             "stored_balanced_accuracy": None if old is None else round(old.balanced_accuracy, 4)}
    return score, extra


def score_explanation(space, evidence: Evidence, expl, db: FeatureDB | None = None, label_id: int | None = None,
                      detection: bool = True, fresh=None) -> tuple[DetectionScore | None, float | None]:
    """Score a concepts.Explanation: detection on the held-out contexts (with `detection`; with
    `fresh`, a detection.DetectionSet, its fresh windows too) and output (promoted tokens); with
    `db` and `label_id`, store both."""
    from .concepts import output_auc, predict
    from .detection import held_out_windows

    score: DetectionScore | None = None
    extra: dict = {}
    if detection:
        contexts, protocol = held_out_windows(evidence, fresh)
        score, extra = _with_protocol(predict(space, expl, contexts), contexts, protocol)
    output = output_auc(space, evidence, expl.vector)
    if db is not None and label_id is not None:
        rows = []  # both in one transaction: a resumed run skips labels that have a detection score
        if score is not None:
            extra |= {"predictor": expl.predictor, "fit": round(expl.fit, 4), "rule": expl.rule.to_dict()}
            if expl.context is not None:
                extra["context_words"] = list(expl.context.words)
            if expl.concept is not None:
                extra |= {"concept": expl.concept.name, "concept_side": expl.side,
                          "threshold": round(expl.concept.threshold, 4),
                          "concept_fit": round(expl.concept.fit, 4)}
            rows.append((METHOD_OFFLINE, score.value, score.details(**extra)))
        if output is not None:
            rows.append((METHOD_OUTPUT, output[0], {"n_promoted": output[1], "n_random": len(space.vocab_rows)}))
        if rows:
            db.add_scores(label_id, rows)
    return score, None if output is None else output[0]


# --------------------------------------------------------------------------- LLM detection

DETECTION_SYSTEM = (
    "You evaluate explanations of features of a language model. A feature fires on certain tokens of a "
    "text. Given an explanation of a feature and numbered text excerpts, you decide from the explanation "
    "alone which excerpts contain at least one token where the feature fires.")


def detection_prompt(label: str, contexts: Sequence[Context]) -> str:
    lines = [f"Explanation of the feature: {label}", "",
             f"Here are {len(contexts)} numbered text excerpts (↵ marks a line break):", ""]
    lines += [f"Excerpt {i}: {ctx.text()}" for i, ctx in enumerate(contexts, 1)]
    lines += ["", "Which excerpts contain at least one token where this feature fires? Answer with a JSON "
              "list of excerpt numbers only, for example [1, 3]; answer [] if none."]
    return "\n".join(lines)


_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_JSON_LIST = re.compile(r"\[[\s\d,]*\]")


def parse_detection(answer: str, n: int) -> set[int]:
    """The excerpt numbers (1-based) in an answer like "[1, 4]"; RejectedAnswer if there is
    no such list or a number is out of range."""
    text = _THINK.sub("", answer or "")
    found = _JSON_LIST.findall(text)
    if not found:
        raise RejectedAnswer(f"no JSON list of excerpt numbers in the answer {text[:80]!r}")
    try:
        numbers = json.loads(found[-1])
    except json.JSONDecodeError as err:
        raise RejectedAnswer(f"malformed list {found[-1]!r} in the answer") from err
    if any(not 1 <= k <= n for k in numbers):
        raise RejectedAnswer(f"excerpt numbers {numbers} out of range 1..{n}")
    return set(numbers)


def held_out_sample(evidence: Evidence, per_class: int = 10) -> list[Context]:
    """Up to `per_class` activating and `per_class` non-activating held-out contexts, in a
    shuffled order that depends only on the feature (so prompts, and the cache, are stable)."""
    pos = [c for c in evidence.held_out if c.fires][:per_class]
    neg = [c for c in evidence.held_out if not c.fires][:per_class]
    contexts = pos + neg
    seed = int.from_bytes(hashlib.sha256(f"{evidence.sae_id}:{evidence.idx}".encode()).digest()[:8], "little")
    random.Random(seed).shuffle(contexts)
    return contexts


def score_llm(evidence: Evidence, label: str, ask: Callable[[list[dict], Callable[[str], object]], object],
              db: FeatureDB | None = None, label_id: int | None = None, per_class: int = 10,
              batch_size: int = 10) -> DetectionScore | None:
    """Score `label` by LLM detection on held-out contexts.

    ask(messages, parse) sends one chat request and returns parse(answer) (llm.LLMClient.ask
    does retries and caching); parse raises RejectedAnswer for a malformed answer, which
    propagates. With `db` and `label_id`, the score is stored as "detection-llm".
    """
    contexts = held_out_sample(evidence, per_class)
    truth = [c.fires for c in contexts]
    if not any(truth) or all(truth):
        return None
    predicted: list[bool] = []
    for start in range(0, len(contexts), batch_size):
        batch = contexts[start:start + batch_size]
        messages = [{"role": "system", "content": DETECTION_SYSTEM},
                    {"role": "user", "content": detection_prompt(label, batch)}]
        def parse(answer: str, n: int = len(batch)) -> set[int]:
            return parse_detection(answer, n)

        chosen = cast(set[int], ask(messages, parse))
        predicted += [i in chosen for i in range(1, len(batch) + 1)]
    score = confusion(predicted, truth)
    if score is not None and db is not None and label_id is not None:
        db.add_score(label_id, METHOD_LLM, score.value, score.details(batch_size=batch_size))
    return score
