"""Offline labels: explain where a feature fires with a simple rule (rules.py) or a concept (concepts.py), no LLM.

From the labelling half of a feature's evidence (see evidence.py), every token
position is described by a few attributes: its normalised token ("▁Paris" →
"paris"), a crude stem, the one or two tokens before it, its character classes
(digits, punctuation, capitalised, whitespace, newline) and its position in the
window. For each attribute we look for the smallest set of values that covers
most of the activation mass while matching few positions where the feature is
silent:

    recall    = activation mass at matching positions / total activation mass
    precision = firing matching positions / matching positions
    fit       = F1(precision, recall)   (minus a small penalty for complex rules)

The best rule becomes the label ("Paris" / "paris" (token), digits, word after
"of", ...). When no rule reaches `MIN_FIT` the label says so: "unclear (top
tokens: ...)", whose rule (those top tokens) usually scores low. Every rule is a
predicate on (tokens, position), so scoring.py can test it on held-out contexts.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..runs import Run, holds_run
from .detection import DetectionConfig, detection_set
from .evidence import (
    Evidence,
    LabelReport,
    TokenTable,
    alive_features,
    as_run,
    gather,
    resolve_saes,
)
from .rules import (  # noqa: F401  (re-exported: the rules' names as labellers and tests import them)
    CLASS_LABELS,
    CLASSES,
    MIN_FIT,
    Rule,
    char_classes,
    context_attributes,
    explain,
    normalise,
    stem,
)

MODEL_NAME = "saescope-offline-3"  # stored in labels.model; bump when the rules or concepts change


# --------------------------------------------------------------------------- the labelling pass

_SUMMED = ("features", "labelled", "skipped", "failed", "scored", "unscored", "unclear", "concepts", "score_sum",
           "output_scored", "output_sum")


@holds_run("label")
def label_offline(run: Run | str | Path, sae_ids=None, progress: bool = True,
                  limit: int | None = None, workers: int | None = None,
                  concepts: bool | Sequence[tuple[str, bool]] = True,
                  detection: bool | DetectionConfig = True) -> LabelReport:
    """Label every alive feature (n_fired > 0) with source "offline", and score each label.

    The label names a concept where the evidence has one (concepts.py: contexts and
    promoted tokens matched to concept names with the local MiniLM), with the token
    rule as detail; else the token rule (`explain`). Each label gets a detection and,
    where the feature promotes words, an output score (scoring.py).
    sae_ids: SAE refs (full id, "site/LAYER" or "LAYER"); None = every analysed SAE.
    limit: at most this many features per SAE, the most frequently firing first.
    concepts: True = name concepts from the Wikipedia titles, a list of (name, general)
    pairs = from those names, False = token rules only (also the fallback, with a
    warning, when the embedding model is not installed).
    detection: True = score on fresh held-out windows too (detection.py: the run's model is
    run over held-out text the analysis did not read), a DetectionConfig = with those
    settings, False = on the analysis's stored held-out windows only (the earlier protocol).
    Re-running is cheap and idempotent: an unchanged label keeps its id and is not
    scored twice.
    """
    run = as_run(run)
    workers = workers or min(os.cpu_count() or 1, 4)
    t0 = time.time()
    with run.db() as db:
        ids = [sae["id"] for sae in resolve_saes(db, sae_ids)]
        space = _space(db, None if concepts is True else concepts) if concepts is not False else None
    fresh = None
    if detection is not False:
        fresh = detection_set(run, ids, detection if isinstance(detection, DetectionConfig) else None)
    setup = time.time() - t0
    if workers > 1 and len(ids) > 1:
        report = _label_in_processes(run, ids, workers, progress, limit, space, fresh)
    else:
        report = _label_saes(run, ids, progress, limit, space, fresh)
    report.seconds, report.seconds_setup = time.time() - t0, setup
    return report


def _space(db, concepts):
    """The concept explainer's vectors, or None (with a warning) without the embedding model."""
    from ..embed import EmbeddingUnavailable
    from .concepts import build_space

    try:
        return build_space(db, concepts=concepts)
    except EmbeddingUnavailable as err:
        warnings.warn(f"{err}; labelling with token rules only", stacklevel=3)
        return None


def _label_saes(run: Run | str, ids: list[str], progress: bool, limit: int | None, space,
                fresh=None) -> LabelReport:
    report = LabelReport(source="offline", model=MODEL_NAME)
    with as_run(run).db() as db:
        table = TokenTable(db)
        if fresh is not None:
            fresh.attach_tokens(table)
        saes = [sae for sae in resolve_saes(db, ids)]
        bar = tqdm(total=sum(int(s["width"] or 0) for s in saes), desc="offline labels", unit="feat",
                   disable=not progress, dynamic_ncols=True)
        for sae in saes:
            rows = alive_features(db, sae, limit)
            found = (gather(db, sae["id"], row["idx"], table, stats=row) for row in rows)
            evidences = [ev for ev in found if ev is not None]  # (alive rows always have their stats)
            _label_sae(db, space, evidences, report, fresh)
            bar.update(int(sae["width"] or 0))
        bar.close()
    return report


def _label_sae(db, space, evidences: list[Evidence], report: LabelReport, fresh=None) -> None:
    """Explain, store and score the labels of one SAE's features."""
    from .concepts import explain_feature, find_concepts, find_output_concepts
    from .scoring import METHOD_OFFLINE, METHOD_OUTPUT, score_explanation, score_offline

    report.features += len(evidences)
    rules = [explain(ev) for ev in evidences]
    none = [None] * len(evidences)
    concepts = find_concepts(space, evidences) if space is not None else none
    outputs = find_output_concepts(space, evidences) if space is not None else none
    for ev, rule, concept, output in zip(evidences, rules, concepts, outputs):
        expl = explain_feature(space, ev, rule, concept, output) if space is not None else None
        text, certain = (expl.text, expl.certain) if expl else (rule.label, rule.certain)
        label_id = db.set_label(ev.sae_id, ev.idx, text, source="offline", model=MODEL_NAME)
        report.labelled += 1
        report.unclear += not certain
        report.concepts += bool(expl and expl.concept)
        if any(s["method"] in (METHOD_OFFLINE, METHOD_OUTPUT) for s in db.scores(label_id)):  # scored (all at once)
            continue
        if expl is None:
            score, output_score = score_offline(ev, rule, db=db, label_id=label_id, fresh=fresh), None
        else:
            score, output_score = score_explanation(space, ev, expl, db=db, label_id=label_id, fresh=fresh)
        if score is None:
            report.unscored += 1
        else:
            report.scored += 1
            report.score_sum += score.value
        if output_score is not None:
            report.output_scored += 1
            report.output_sum += output_score


def _label_in_processes(run: Run, ids: list[str], workers: int, progress: bool, limit: int | None,
                        space, fresh=None) -> LabelReport:
    """Label SAEs in parallel processes (the labeller is pure Python); SQLite's WAL serialises the writes.

    The workers die with this process (`process_pool`): a killed `label auto` leaves no worker
    writing labels, and re-running it finishes the same labels. The concept space is built once,
    here, and sent to every process.
    """
    from ..workers import process_pool

    shards = [ids[i::workers] for i in range(workers)]
    total = LabelReport(source="offline", model=MODEL_NAME)
    with process_pool(workers) as pool:
        futures = [pool.submit(_label_saes, str(run.root), shard, progress and i == 0, limit, space, fresh)
                   for i, shard in enumerate(shards) if shard]
        for fut in futures:
            part = fut.result()
            for name in _SUMMED:
                setattr(total, name, getattr(total, name) + getattr(part, name))
            total.errors.extend(part.errors[: 10 - len(total.errors)])
    return total
