"""Labels: evidence split, offline rules, detection scores, manual labels, and the LLM
labeller against a real local HTTP server speaking the OpenAI API (tests/mock_llm_server.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from mock_llm_server import Hang, MockLLMServer, Reply

from saescope.errors import SaescopeError
from saescope.featuredb import Example, FeatureStats
from saescope.label import (
    Rule,
    clean_label,
    explain,
    gather,
    label_llm,
    label_offline,
    score_offline,
    set_label,
)
from saescope.label.offline import char_classes, normalise, stem
from saescope.label.scoring import RejectedAnswer, parse_detection
from saescope.runs import Run

SAE = "resid_post/layer_3_width_16_l0_4"
WORDS = ["▁the", "▁a", "▁city", "▁river", "▁king", "▁music", "▁science", "▁water", "▁war", "▁tower", "▁art",
         "▁and", "▁was", "▁is", "▁in", "▁old", "▁new", ",", "."]
EXTRA = ["▁of", "▁Paris", "▁paris", "1", "2", "7", "▁London", "<bos>"]
VOCAB = WORDS + EXTRA
TOK = {t: i for i, t in enumerate(VOCAB)}
PARIS, DIGITS, AFTER_OF, NOISE, DEAD = 0, 1, 2, 3, 4
CTX_LEN = 16


def _contexts(rng, n, insert=(), k=1):
    """n random contexts of plain words, each with `k` tokens from `insert` at random positions."""
    out = []
    for _ in range(n):
        toks = [str(t) for t in rng.choice(WORDS, CTX_LEN)]
        for pos in rng.choice(np.arange(1, CTX_LEN), size=k if insert else 0, replace=False):
            toks[pos] = str(rng.choice(insert))
        out.append(toks)
    return out


def _acts(toks, rule, rng, scale):
    return np.array([scale * rng.uniform(0.8, 1.2) if rule(toks, p) else 0.0 for p in range(len(toks))],
                    np.float32)


RULES = {
    PARIS: (lambda t, p: t[p] in ("▁Paris", "▁paris"), ["▁Paris", "▁Paris", "▁paris"]),
    DIGITS: (lambda t, p: t[p] in ("1", "2", "7"), ["1", "2", "7"]),
    AFTER_OF: (lambda t, p: p > 0 and t[p - 1] == "▁of", None),
}


def _feature_examples(idx, rng):
    """(top, quantile, random) token lists with activations for one hand-made feature."""
    if idx == NOISE:  # fires on arbitrary tokens: nothing explains it
        pos = []
        for toks in _contexts(rng, 20):
            acts = np.where(rng.random(CTX_LEN) < 0.15, rng.uniform(1, 3, CTX_LEN), 0).astype(np.float32)
            acts[rng.integers(CTX_LEN)] = 2.0
            pos.append((toks, acts))
        neg = [(toks, np.zeros(CTX_LEN, np.float32)) for toks in _contexts(rng, 10)]
        return pos, neg
    rule, insert = RULES[idx]
    if idx == AFTER_OF:  # "of" followed by an ordinary word
        pos_ctx = []
        for toks in _contexts(rng, 20):
            p = int(rng.integers(1, CTX_LEN - 2))
            toks[p] = "▁of"
            pos_ctx.append(toks)
        neg_ctx = _contexts(rng, 10)
    else:
        pos_ctx, neg_ctx = _contexts(rng, 20, insert, k=2), _contexts(rng, 10)
    pos = [(t, _acts(t, rule, rng, scale=rng.uniform(1, 10))) for t in pos_ctx]
    neg = [(t, _acts(t, rule, rng, 1.0)) for t in neg_ctx]
    assert all(a.max() > 0 for _, a in pos) and all(a.max() == 0 for _, a in neg)
    return pos, neg


def build_run(root) -> Run:
    """A run without a model: one analysed SAE of width 16 whose features 0-3 are hand-made."""
    run = Run.create(root, model="tiny", corpus={}, config={})
    with run.db() as db:
        db.upsert_sae(SAE, site="resid_post", layer=3, width=16, d_in=8, hook_name="model.layers.3.output",
                      path=f"saes/{SAE}", config={})
        db.set_vocab(VOCAB)
        _analyse(db)
    return run


def _analyse(db) -> None:
    """Write the hand-made atlas of SAE, as analyze would."""
    rng = np.random.default_rng(0)
    db.begin_sae(SAE)
    stats, examples = [], []
    for idx in (PARIS, DIGITS, AFTER_OF, NOISE):
        pos, neg = _feature_examples(idx, rng)
        pos.sort(key=lambda ta: -float(ta[1].max()))
        top, quantile = pos[:12], pos[12:]
        for kind, group in (("top", top), ("quantile", quantile), ("random", neg)):
            for rank, (toks, acts) in enumerate(group):
                examples.append(Example(SAE, idx, kind, rank, 0 if kind == "quantile" else None,
                                        float(acts.max()), [TOK[t] for t in toks], acts,
                                        ctx=len(examples), pos=int(acts.argmax())))
        stats.append(FeatureStats(SAE, idx, frequency=0.05 - 0.01 * idx, n_fired=100, max_act=10.0,
                                  mean_act=3.0, logits_pos=[["▁France", 1.2]], logits_neg=[["▁London", -0.7]]))
    stats.append(FeatureStats(SAE, DEAD, frequency=0.0, n_fired=0, max_act=0.0, mean_act=0.0))
    db.write_features(SAE, stats)
    db.write_examples(SAE, examples)
    db.finish_sae(SAE, n_tokens=10_000)


@pytest.fixture
def run(tmp_path):
    return build_run(tmp_path / "run")


def _current(run, source):
    with run.db() as db:
        return {lab["idx"]: lab for lab in db.current_labels(source)}


# --------------------------------------------------------------------------- evidence and rules


def test_evidence_split_is_disjoint_and_by_rank(run):
    with run.db() as db:
        ev = gather(db, SAE, PARIS)
        assert gather(db, SAE, 15) is None
        examples = db.examples(SAE, PARIS)
    assert len(ev.labelling) + len(ev.held_out) == len(examples) == 30
    assert all(c.kind != "random" and c.rank % 2 == 0 for c in ev.labelling)
    assert all(c.kind == "random" or c.rank % 2 == 1 for c in ev.held_out)
    assert {c.kind for c in ev.labelling} == {"top", "quantile"}
    assert sum(c.fires for c in ev.held_out) == 10 and sum(not c.fires for c in ev.held_out) == 10
    ctx = ev.labelling[0]
    assert "<<Paris>>" in ctx.marked() or "<<paris>>" in ctx.marked()
    assert "<<" not in ctx.text() and "▁" not in ctx.text()


def test_token_attributes():
    assert normalise("▁Paris") == normalise("ĠParis") == normalise(" paris") == "paris"
    assert stem("cities") == "city" and stem("walked") == "walk" and stem("of") == "of"
    assert char_classes("▁1") == ("digits",) and "punctuation" in char_classes(";")
    assert char_classes("▁Paris") == ("capitalised",) and char_classes("Ċ") == ("newline",)
    assert char_classes("▁") == ("whitespace",) and char_classes("<0x0A>") == ("newline",)
    rule = Rule("prev", ("of",), 'word after "of"')
    assert rule(["▁top", "▁of", "▁the"], 2) and not rule(["▁top", "▁of", "▁the"], 1)
    assert Rule.from_dict(rule.to_dict()) == rule


def test_offline_labels_identify_features_and_score_high(run):
    report = label_offline(run, progress=False, concepts=False)  # token rules only (concepts: test_concepts.py)
    labels = _current(run, "offline")
    assert set(labels) == {PARIS, DIGITS, AFTER_OF, NOISE}  # the dead feature is not labelled
    assert labels[PARIS]["text"] == '"Paris" / "paris" (token)'
    assert labels[DIGITS]["text"] == "digits"
    assert labels[AFTER_OF]["text"] == 'word after "of"'
    assert labels[NOISE]["text"].startswith("unclear (top tokens: ")
    assert (report.features, report.labelled, report.scored, report.unclear) == (4, 4, 4, 1)
    with run.db() as db:
        scores = {i: db.scores(lab["id"]) for i, lab in labels.items()}
    for idx in (PARIS, DIGITS, AFTER_OF):
        [s] = scores[idx]
        assert s["method"] == "detection-offline"
        assert s["value"] == pytest.approx(1.0)
        assert {k: s["details"][k] for k in ("n", "tp", "fp", "tn", "fn")} == {"n": 20, "tp": 10, "fp": 0,
                                                                              "tn": 10, "fn": 0}
    # The noise feature's "unclear" rule predicts firing on common words, also in the negatives.
    [noise] = scores[NOISE]
    assert noise["details"]["fp"] > 0 and noise["value"] < scores[PARIS][0]["value"]


def test_wrong_label_scores_at_chance(run):
    with run.db() as db:
        ev = gather(db, SAE, PARIS)
        right, wrong = explain(ev), Rule.tokens(["London"])
    assert score_offline(ev, right).value == pytest.approx(1.0)
    bad = score_offline(ev, wrong)
    assert (bad.tp, bad.fn, bad.tn, bad.fp) == (0, 10, 10, 0)
    assert bad.value == pytest.approx(0.5) and bad.f1 == 0.0
    digits_as_paris = score_offline(ev, Rule("class", ("digits",), "digits"))
    assert digits_as_paris.value == pytest.approx(0.5)


def test_offline_rerun_is_idempotent(run):
    label_offline(run, progress=False, concepts=False)
    before = _current(run, "offline")
    report = label_offline(run, sae_ids=["3"], progress=False, limit=2, concepts=False)
    after = _current(run, "offline")
    assert {i: lab["id"] for i, lab in after.items()} == {i: lab["id"] for i, lab in before.items()}
    assert (report.features, report.scored) == (2, 0)  # limit=2: the two most frequent; not re-scored
    with run.db() as db:
        assert len(db.scores(after[PARIS]["id"])) == 1


# --------------------------------------------------------------------------- manual


def test_manual_labels_keep_history_and_validate(run):
    first = set_label(run.root, "resid_post/3", PARIS, "Paris", author="ana")
    second = set_label(run, SAE, PARIS, "<script>alert('x')</script> capital", author="ana")
    with run.db() as db:
        history = db.labels(SAE, PARIS, history=True)
    assert [lab["id"] for lab in history] == [second, first]
    assert history[0]["text"] == "<script>alert('x')</script> capital"  # verbatim, never interpreted
    assert history[0]["prev_id"] == first and history[0]["author"] == "ana"
    with pytest.raises(SaescopeError, match="out of range"):
        set_label(run, SAE, 16, "x")
    with pytest.raises(SaescopeError, match="whole number"):
        set_label(run, SAE, "seven", "x")
    with pytest.raises(SaescopeError, match="no SAE 'mlp_out/3'"):
        set_label(run, "mlp_out/3", 0, "x")
    with pytest.raises(SaescopeError, match="empty label"):
        set_label(run, SAE, 0, "   ")


# --------------------------------------------------------------------------- LLM answers


@pytest.mark.parametrize("answer, label", [
    ("<think>tokens look like a city\nmaybe France</think>\nLabel: **Paris**.", "Paris"),
    ('"French capital city"', "French capital city"),
    ("Here is the label:\n\n`Digits in dates`", "Digits in dates"),
    ("```\nword after \"of\"\n```", 'word after "of"'),
    ("- Final label: numbers", "numbers"),
    ("<b>bold</b> <script>x()</script>", "<b>bold</b> <script>x()</script>"),
])
def test_clean_label_accepts(answer, label):
    assert clean_label(answer) == label


@pytest.mark.parametrize("answer", ["", "   \n", "<think>I wonder what this is", "???", "...",
                                    "I'm sorry, I cannot help with that.", " ".join(["word"] * 40)])
def test_clean_label_rejects(answer):
    with pytest.raises(RejectedAnswer):
        clean_label(answer)


def test_clean_label_bounds_length():
    label = clean_label("names of international organisations " * 6)
    assert len(label) <= 120 and label.endswith("…")


def test_parse_detection():
    assert parse_detection("<think>[9]</think> I think [1, 3]", 4) == {1, 3}
    assert parse_detection("[]", 4) == set()
    for bad in ("none of them", "[5]", "[1,,2]"):
        with pytest.raises(RejectedAnswer):
            parse_detection(bad, 4)


# --------------------------------------------------------------------------- LLM labeller over HTTP


def oracle(body: dict) -> str:
    """Answers like a good LLM: names what is marked in a labelling prompt; for a detection
    prompt, picks the excerpts that contain what the label names."""
    prompt = body["messages"][-1]["content"]
    if prompt.startswith("Explanation of the feature:"):
        label = prompt.splitlines()[0].split(": ", 1)[1]
        excerpts = re.findall(r"^Excerpt (\d+): (.*)$", prompt, re.MULTILINE)
        if "Paris" in label:
            hits = [n for n, text in excerpts if "paris" in text.lower()]
        elif "digit" in label:
            hits = [n for n, text in excerpts if re.search(r"\d", text)]
        else:
            hits = [n for n, text in excerpts if re.search(r"\bof\b", text)]
        return "[" + ", ".join(hits) + "]"
    marked = [m for m in re.findall(r"<<(.*?)>>", prompt) if m != "like this"]
    if any(m.lower() == "paris" for m in marked):
        return "<think>all marked tokens are Paris</think>The city of Paris"
    if all(m.isdigit() for m in marked):
        return "Label: digits"
    return "tokens following the word of"


def test_llm_labels_prompt_and_scores(run, monkeypatch):
    monkeypatch.setenv("MOCK_KEY", "sk-secret-123")
    with MockLLMServer(default=oracle) as server:
        report = label_llm(run, server.url, "mock-1", api_key_env="MOCK_KEY", sae_ids=[SAE], limit=3,
                           progress=False, concurrency=3)
    labels = _current(run, "llm")
    assert {i: lab["text"] for i, lab in labels.items()} == {
        PARIS: "The city of Paris", DIGITS: "digits", AFTER_OF: "tokens following the word of"}
    assert all(lab["model"] == "mock-1" for lab in labels.values())
    label_prompts = [p for p in server.prompts() if p.startswith("Feature ")]
    [paris_prompt] = [p for p in label_prompts if p.startswith(f"Feature {PARIS} ")]
    assert paris_prompt.count("<<Paris>>") + paris_prompt.count("<<paris>>") >= 6
    assert 'Next tokens it promotes: " France"' in paris_prompt
    assert 'Next tokens it suppresses: " London"' in paris_prompt
    assert "max activation" in paris_prompt and "▁" not in paris_prompt
    # Held-out contexts only: none of the labelling texts reappears in a detection prompt.
    with run.db() as db:
        ev = gather(db, SAE, PARIS)
        scores = {i: db.scores(lab["id"]) for i, lab in labels.items()}
    detection = [p for p in server.prompts() if p.startswith("Explanation of the feature: The city of Paris")]
    assert detection and not any(c.text() in p for c in ev.labelling for p in detection)
    assert sum(c.text() in "".join(detection) for c in ev.held_out) == 20
    for idx in (PARIS, DIGITS, AFTER_OF):
        [s] = [s for s in scores[idx] if s["method"] == "detection-llm"]
        assert s["value"] == pytest.approx(1.0) and s["details"]["n"] == 20
        assert {s["method"] for s in scores[idx]} >= {"detection-llm", "detection-offline"}
        assert all(0 <= s["value"] <= 1 for s in scores[idx])
    assert (report.labelled, report.scored, report.failed, report.retries) == (3, 3, 0, 0)
    assert report.requests == len(server.requests) == 3 + 3 * 2  # one label + two detection batches each
    assert report.prompt_tokens > 0 and report.completion_tokens > 0
    # The key travels in the header, and nowhere on disk.
    assert {h.get("authorization") for h in server.headers} == {"Bearer sk-secret-123"}
    for path in run.root.rglob("*"):
        if path.is_file():
            assert b"sk-secret-123" not in path.read_bytes(), path


def test_llm_cache_makes_rerun_free(run):
    with MockLLMServer(default=oracle) as server:
        label_llm(run, server.url, "mock-1", limit=2, progress=False)
        first = len(server.requests)
        with run.db() as db:  # someone else's labels become current: resume would not skip these
            for idx in (PARIS, DIGITS):
                db.set_label(SAE, idx, "other", source="llm", model="other-model")
        report = label_llm(run, server.url, "mock-1", limit=2, progress=False)
    assert first == 6 and len(server.requests) == first  # the second pass sent nothing
    assert (report.requests, report.cache_hits, report.labelled, report.scored) == (0, 6, 2, 2)
    assert _current(run, "llm")[PARIS]["text"] == "The city of Paris"


def test_llm_relabels_features_whose_weights_were_replaced(run):
    with MockLLMServer(default=oracle) as server:
        label_llm(run, server.url, "mock-1", limit=2, progress=False)
        with run.db() as db:
            db.weights_replaced(SAE)  # `import --overwrite`: the llm labels and scores are now stale
            _analyse(db)  # analysed again
        report = label_llm(run, server.url, "mock-1", limit=2, progress=False)
    assert (report.skipped, report.labelled, report.scored) == (0, 2, 2)
    current = _current(run, "llm")
    assert set(current) == {PARIS, DIGITS} and not any(lab["stale"] for lab in current.values())


def test_llm_rejects_garbage_and_resumes(run):
    broken = {"on": True}

    def answer(body):  # the digits feature first gets an answer that is only leaked reasoning
        if broken["on"] and body["messages"][-1]["content"].startswith(f"Feature {DIGITS} "):
            return "<think>these are numbers, so the label is"
        return oracle(body)

    with MockLLMServer(default=answer) as server:
        report = label_llm(run, server.url, "mock-1", limit=2, progress=False, score=False)
        assert (report.labelled, report.failed) == (1, 1)
        assert "empty answer" in report.errors[0] and set(_current(run, "llm")) == {PARIS}
        n = len(server.requests)
        broken["on"] = False
        report = label_llm(run, server.url, "mock-1", limit=2, progress=False, score=False)
    assert (report.skipped, report.labelled, report.failed, report.requests) == (1, 1, 0, 1)
    assert len(server.requests) == n + 1 and server.prompts()[-1].startswith(f"Feature {DIGITS} ")
    assert _current(run, "llm")[DIGITS]["text"] == "digits"


def test_llm_bad_detection_answers_leave_label_unscored(run):
    def answer(body):
        return "maybe the second one?" if body["messages"][-1]["content"].startswith("Explanation") else oracle(body)

    with MockLLMServer(default=answer) as server:
        report = label_llm(run, server.url, "mock-1", limit=1, progress=False)
        assert (report.labelled, report.scored, report.unscored, report.failed) == (1, 0, 1, 0)
        assert "no JSON list" in report.errors[0]
        server.default = oracle  # a re-run only scores the existing label
        report = label_llm(run, server.url, "mock-1", limit=1, progress=False)
    assert (report.skipped, report.labelled, report.scored) == (1, 0, 1)
    assert server.prompts()[-1].startswith("Explanation")


def test_llm_stores_html_answers_verbatim(run):
    answer = "<img src=x onerror=alert(1)> Paris & co"
    with MockLLMServer(default=lambda body: answer) as server:
        label_llm(run, server.url, "mock-1", limit=1, progress=False, score=False)
    assert _current(run, "llm")[PARIS]["text"] == answer


def test_llm_retries_on_429_and_500(run):
    with MockLLMServer(default=oracle) as server:
        server.enqueue(Reply(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}),
                       Reply(500, {"error": {"message": "boom"}}), Reply(503, "not json"))
        report = label_llm(run, server.url, "mock-1", limit=1, progress=False, score=False, backoff_s=0.01)
    assert (report.labelled, report.retries, report.requests) == (1, 3, 4)
    assert _current(run, "llm")[PARIS]["text"] == "The city of Paris"


def test_llm_gives_up_after_retries(run):
    with MockLLMServer(default=lambda body: Reply(500, {"error": {"message": "down for maintenance"}})) as server:
        with pytest.raises(SaescopeError, match=r"kept failing \(HTTP 500: down for maintenance\) after 3 tries"):
            label_llm(run, server.url, "mock-1", limit=1, progress=False, max_retries=2, backoff_s=0.01)
    assert len(server.requests) == 3


def test_llm_timeout_on_hanging_server(run):
    with MockLLMServer() as server:
        server.enqueue(Hang(10), Hang(10))  # a client without a timeout would wait them out (then hanging == 0)
        with pytest.raises(SaescopeError, match=r"did not answer within 0.3s \(2 tries\)"):
            label_llm(run, server.url, "mock-1", limit=1, progress=False, timeout=0.3, max_retries=1,
                      backoff_s=0.01)
        assert server.hanging == 2  # the client gave up on both tries while the server still held them


def test_llm_unknown_model_is_a_clear_error(run):
    with MockLLMServer(models={"mock-1"}) as server:
        with pytest.raises(SaescopeError, match=r"model 'gpt-nope' not found at http://127.0.0.1:\d+/v1 \(HTTP 404"):
            label_llm(run, server.url, "gpt-nope", limit=1, progress=False, concurrency=1)
    assert len(server.requests) == 1  # a 404 is not retried


def test_llm_unreachable_server(run):
    with MockLLMServer() as server:
        url = server.url  # the port is free again once the server stops
    with pytest.raises(SaescopeError, match=r"^cannot reach LLM at http://127.0.0.1:\d+/v1: .*check --base-url"):
        label_llm(run, url, "mock-1", limit=1, progress=False, max_retries=1, backoff_s=0.01)
    with pytest.raises(SaescopeError, match="must start with http"):
        label_llm(run, "localhost:8000", "mock-1", progress=False)


def _add_copy_of_sae(run, new_id):
    """A second analysed SAE with the same features and examples as the first."""
    with run.db() as db:
        db.upsert_sae(new_id, site="resid_post", layer=4, width=16, d_in=8, hook_name="model.layers.4.output",
                      path=f"saes/{new_id}", config={})
        db.begin_sae(new_id)
        stats, examples = [], []
        for idx in (PARIS, DIGITS, AFTER_OF, NOISE):
            f = db.feature(SAE, idx)
            stats.append(FeatureStats(new_id, idx, f["frequency"], f["n_fired"], f["max_act"], f["mean_act"]))
            examples += [Example(new_id, e.idx, e.kind, e.rank, e.quantile, e.max_act, e.tokens, e.acts, e.ctx, e.pos)
                         for e in db.examples(SAE, idx)]
        db.write_features(new_id, stats)
        db.write_examples(new_id, examples)
        db.finish_sae(new_id, n_tokens=10_000)


def test_offline_labelling_in_two_processes_equals_one(tmp_path):
    """The process pool splits SAEs between workers; the labels and scores are the same as in one process."""
    results = []
    for workers in (1, 2):
        run = build_run(tmp_path / f"run{workers}")
        _add_copy_of_sae(run, "resid_post/layer_4_width_16_l0_4")
        report = label_offline(run, progress=False, workers=workers)
        assert report.features == 8 and report.labelled == 8
        with run.db() as db:
            labels = sorted((lab["sae_id"], lab["idx"], lab["text"]) for lab in db.current_labels("offline"))
            scores = sorted(round(s["value"], 6) for lab in db.current_labels("offline") for s in db.scores(lab["id"]))
        results.append((labels, scores, report.scored))
    assert results[0] == results[1]


def test_display_token_keeps_bytes_visible():
    from saescope.label.evidence import display_token

    assert display_token("▁Paris") == " Paris"
    assert display_token("<0x0A>") == "\n"
    assert display_token("<0xc2>") == "<0xC2>"  # half of a UTF-8 character: shown, not "\ufffd"
    assert display_token(None, 7) == "<unk:7>"


def test_llm_echo_or_irrelevant_answer_is_unclear(run):
    """A small model that repeats the prompt, or answers about something else, leaves "unclear" labels,
    which are not sent for scoring."""
    answers = {PARIS: "Feature 0 of SAE resid_post/layer_3_width_16_l0_4.",
               DIGITS: "Texts where it fires most strongly",
               AFTER_OF: "types of cheese"}

    def answer(body):
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("Explanation"):
            return oracle(body)
        return answers[int(prompt.split()[1])]

    with MockLLMServer(default=answer) as server:
        report = label_llm(run, server.url, "mock-1", limit=3, progress=False)
    labels = {i: lab["text"] for i, lab in _current(run, "llm").items()}
    assert labels[PARIS] == labels[DIGITS] == "unclear (the LLM's answer echoed the prompt)"
    assert labels[AFTER_OF] == "unclear (the LLM's answer says nothing about the evidence)"
    assert report.unclear == 3 and report.scored == 0
    assert not any(p.startswith("Explanation") for p in server.prompts())


def test_llm_answer_judge_keeps_real_labels(run):
    from saescope.label.llm import echoes_prompt, label_prompt, unclear_reason

    with run.db() as db:
        ev = gather(db, SAE, PARIS)
    prompt = label_prompt(ev)
    assert echoes_prompt("Feature 1803 of SAE resid_post/layer_12", prompt)
    assert not echoes_prompt("the city of Paris", prompt)
    assert unclear_reason("the French capital, Paris", prompt, ev) is None
    assert unclear_reason("medieval cheese making", prompt, ev) == "the LLM's answer says nothing about the evidence"
