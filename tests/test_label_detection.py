"""Detection scores on fresh held-out windows (label/detection.py): the windows come from held-out text
the analysis never read, their truth is each feature's real activation, and every score says which
protocol measured it and what the earlier one (stored windows only) gave for the same label."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from atlas_run import build_run

from saescope.analyze import analyze, encode
from saescope.harvest import activations, keep_mask
from saescope.label import label_offline
from saescope.label.detection import PROTOCOL_FRESH, DetectionConfig, detection_set, held_out_windows
from saescope.label.evidence import TokenTable, gather
from saescope.runs import Run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_gemma_dir):
    """The tiny atlas run, re-analysed on part of its held-out text (the rest is fresh) and relabelled."""
    run = Run.open(build_run(tmp_path_factory.mktemp("atlas"), tiny_gemma_dir))
    analyze(run, n_tokens=300, force=True, progress=False)
    label_offline(run, progress=False)
    return run


def test_fresh_windows_hold_exact_activations_of_unread_text(run):
    sae_id = run.sae_ids()[1]
    fresh = detection_set(run, [sae_id], DetectionConfig(n_contexts=3))
    assert fresh is not None
    with run.db() as db:
        meta = db.get_meta("analysis")
    width = sum(meta["window"]) + 1 if sum(meta["window"]) + 1 < meta["ctx_len"] else meta["ctx_len"] - 1
    assert fresh.ids.shape[1] == width and fresh.max_acts[sae_id].shape == (len(fresh.ids), 32)
    # Reference: the first fresh context is the held-out context right after the analysed ones.
    lm = run.model
    assert meta["spread"] is True  # a run made now: its held-out passages, one of every document first
    stream = run.corpus().contexts(lm.tokenizer, part="heldout", ctx_len=meta["ctx_len"], spread=True)
    contexts = [c for _, c in zip(range(meta["n_contexts"] + 1), stream)]
    first = torch.tensor([contexts[meta["n_contexts"]]])
    analysed = {tuple(c) for c in contexts[: meta["n_contexts"]]}
    assert tuple(first[0].tolist()) not in analysed
    assert np.array_equal(fresh.ids[0], first[0, 1:1 + width].numpy())
    sae = run.load_sae(sae_id)
    site = lm.site(sae.cfg.site, sae.cfg.layer)
    with torch.no_grad():
        x = activations(lm, first, [site])[site.key][0]  # (T, d)
        codes = encode(sae, x.float()) * keep_mask(lm, first)[0, :, None]  # (T, width); no EOS/pad codes
    expected = codes[1:1 + width].amax(0).numpy()
    np.testing.assert_allclose(fresh.max_acts[sae_id][0], expected, rtol=1e-5, atol=1e-5)


def test_scores_use_fresh_windows_and_keep_the_stored_protocol(run):
    sae_id = run.sae_ids()[1]
    fresh = detection_set(run, [sae_id], DetectionConfig(n_contexts=20, max_negative=3))
    with run.db() as db:
        fresh.attach_tokens(TokenTable(db))
        idx = next(i for i in range(32) if (fresh.max_acts[sae_id][:, i] <= 0).sum() > 3
                   and db.feature_stats(sae_id, i) and db.feature_stats(sae_id, i)["n_fired"])
        ev = gather(db, sae_id, idx)
    contexts, protocol = held_out_windows(ev, fresh)
    added = contexts[len(ev.held_out):]
    assert protocol == PROTOCOL_FRESH and sum(not c.fires for c in added) == 3
    col = fresh.max_acts[sae_id][:, idx]
    by_window = {tuple(w.tolist()): a for w, a in zip(fresh.ids, col)}
    assert all(c.max_act == by_window[c.ids] for c in added)  # truth: the window's real activation
    assert sum(c.fires for c in added) == min(int((col > 0).sum()), fresh.config.max_positive)
    assert held_out_windows(ev, None) == (list(ev.held_out), "stored")


def test_labelled_run_records_the_protocol(run):
    with run.db() as db:
        labels = db.current_labels("offline")
        details = [s["details"] for lab in labels for s in db.scores(lab["id"]) if s["method"] == "detection-offline"]
    assert details and all(d["protocol"] in ("fresh", "stored") for d in details)
    fresh = [d for d in details if d["protocol"] == "fresh"]
    assert fresh and max(d["n_silent"] for d in fresh) > 4  # more than the analysis's 4 random windows
    assert all(d["n_firing"] + d["n_silent"] == d["n"] for d in details)


def test_no_fresh_windows_when_the_weights_cannot_be_read(run, monkeypatch, caplog):
    """Scoring falls back to the stored windows (and says so) rather than failing the labelling."""
    def broken(sae_id):
        raise RuntimeError("header too large: corrupt safetensors file")

    monkeypatch.setattr(run, "load_sae", broken)
    assert detection_set(run, run.sae_ids()[:1]) is None
    assert "stored held-out windows only" in caplog.text and "corrupt" in caplog.text


def test_re_analysis_drops_offline_scores_and_the_next_labelling_scores_every_label(tmp_path_factory, tiny_gemma_dir):
    run = Run.open(build_run(tmp_path_factory.mktemp("rescored"), tiny_gemma_dir))
    sae_id, other = run.sae_ids()[0], run.sae_ids()[1]

    def scored(db, sid):
        return [lab["id"] for lab in db.current_labels(source="offline") if lab["sae_id"] == sid and db.scores(lab["id"])]

    with run.db() as db:
        before, kept = scored(db, sae_id), scored(db, other)
    assert before and kept  # the built run's labels were scored on its first analysis
    analyze(run, n_tokens=300, force=True, saes=[sae_id], progress=False)  # other text: those scores are stale
    with run.db() as db:
        assert scored(db, sae_id) == [] and scored(db, other) == kept  # only the re-analysed SAE's
    report = label_offline(run, sae_ids=[sae_id], progress=False)
    assert report.labelled > 0 and report.scored + report.unscored == report.labelled  # none skipped as scored
    with run.db() as db:
        assert len(scored(db, sae_id)) == report.scored
