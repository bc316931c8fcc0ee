"""The feature atlas (analyze.py), the Python API over it (scope.py) and its CLI verbs.

A tiny random Gemma 3 (tests/conftest.py) and random SAEs whose thresholds are set
from real activations so that features fire at very different rates (from ~half the
tokens to almost never); every check is against a brute-force recomputation.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from saescope.analyze import AnalyzeReport, analyze, encode, logit_effects
from saescope.cli import cli
from saescope.corpus import Corpus
from saescope.errors import SaescopeError
from saescope.featuredb import FeatureDB
from saescope.harvest import activations, keep_mask
from saescope.models import load_model
from saescope.runs import Run
from saescope.sae import SAE, SAEConfig
from saescope.scope import Scope

WORDS = ("the a an of to in is was and on for with as by at it he she they paris france tower city river "
         "king queen war peace music art science water fire earth one two three").split()
CTX_LEN = 32
WIDTH = 24
SAE_SITES = (("resid_post", 0), ("resid_post", 1), ("attn_out", 1))
N_TOKENS = 600


def _write_corpus(folder, n_docs=80, seed=0):
    folder.mkdir()
    rng = random.Random(seed)
    for d in range(n_docs):
        sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " ."
                 for _ in range(rng.randint(3, 8))]
        (folder / f"doc{d:03}.txt").write_text(" ".join(sents))
    return folder


def _build_run(root, model_dir, lm, sae_sites=SAE_SITES) -> Run:
    corpus = _write_corpus(root / "corpus")
    run = Run.create(root / "run", model=str(model_dir),
                     corpus={"source": str(corpus), "heldout_fraction": 0.5, "seed": 0, "order": "shuffled"},
                     config={"ctx_len": CTX_LEN})
    # thresholds from training-part activations: feature i fires on a fraction from ~0.5 to ~0.002
    ctxs = list(Corpus(str(corpus), 0.5, 0).contexts(lm.tokenizer, part="train", ctx_len=CTX_LEN))[:16]
    ids = torch.tensor(ctxs)
    keep = keep_mask(lm, ids)
    g = torch.Generator().manual_seed(1)
    for kind, layer in sae_sites:
        site = lm.site(kind, layer)
        x = activations(lm, ids, [site])[site.key][keep].float()
        cfg = SAEConfig(d_in=site.width, width=WIDTH, l0=4, site=kind, layer=layer, model_name=str(model_dir),
                        hf_hook_point_in=site.hook_name, hf_hook_point_out=site.hook_name)
        sae = SAE.init(cfg, generator=g)
        with torch.no_grad():
            z = sae.pre_acts(x)
            q = torch.linspace(0.5, 0.998, WIDTH)
            sae.threshold.copy_(torch.stack([z[:, i].quantile(q[i]) for i in range(WIDTH)]).clamp(min=1e-3))
            sae.b_enc.copy_(torch.randn(WIDTH, generator=g) * 0.01)
        sae.save(run.saes_dir / kind / cfg.folder_name)
    run.__dict__["model"] = lm
    return run


@pytest.fixture(scope="module")
def tiny_lm(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir))


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_gemma_dir, tiny_lm):
    """A run with three SAEs analysed on N_TOKENS held-out tokens (shared by the read-only tests)."""
    run = _build_run(tmp_path_factory.mktemp("atlas"), tiny_gemma_dir, tiny_lm)
    report = analyze(run, n_tokens=N_TOKENS, top_k=5, n_quantiles=3, per_quantile=2, n_random=3, window=(6, 2),
                     n_logits=4, batch_size=4, progress=False)
    return run, report


def test_analyze_takes_a_run_or_its_folder(analysed, tmp_path):
    run, _ = analysed
    again = analyze(str(run.root), progress=False)  # every SAE is done: skipped, nothing recomputed
    assert again.analysed == [] and again.skipped == run.sae_ids()
    with pytest.raises(SaescopeError, match="run not found"):
        analyze(tmp_path / "nowhere", progress=False)


def _brute(run, lm, report):
    """Codes of every analysed held-out token, recomputed directly: sae_id -> (codes (n, w), ctx, pos),
    and the analysed contexts."""
    c = run.manifest["corpus"]  # the held-out passages, one of every document first
    ctxs = list(Corpus(c["source"], c["heldout_fraction"], c["seed"]).contexts(lm.tokenizer, part="heldout",
                                                                               ctx_len=CTX_LEN, spread=True))
    ctxs = ctxs[: report.n_contexts]
    ids = torch.tensor(ctxs)
    keep = keep_mask(lm, ids)
    b, t = keep.nonzero(as_tuple=True)
    out = {}
    for sae_id in run.sae_ids():
        sae = run.load_sae(sae_id)
        site = lm.site(sae.cfg.site, sae.cfg.layer)
        x = activations(lm, ids, [site])[site.key]
        with torch.no_grad():
            out[sae_id] = (sae.encode(x[b, t].float()), b, t)
    return out, ctxs


def test_report_and_status(analysed):
    run, report = analysed
    assert isinstance(report, AnalyzeReport)
    assert report.analysed == run.sae_ids() and report.skipped == []
    assert report.n_tokens >= N_TOKENS
    with run.db() as db:
        assert {s["id"]: (s["status"], s["n_tokens"]) for s in db.saes()} == {
            i: ("done", report.n_tokens) for i in run.sae_ids()}
        assert db.get_meta("analysis")["n_tokens"] == report.n_tokens
        assert db.vocab([2]) == ["<bos>"]


def test_streaming_top_k_equals_brute_force(analysed, tiny_lm):
    run, report = analysed
    codes, _ = _brute(run, tiny_lm, report)
    with run.db() as db:
        for sae_id, (f, b, _) in codes.items():
            n_ctx = int(b.max()) + 1
            # per (context, feature) maximum, then the 5 best contexts per feature
            ctx_max = torch.stack([f[b == c].amax(0) for c in range(n_ctx)])
            for i in range(WIDTH):
                want = ctx_max[:, i]
                top = db.examples(sae_id, i, kind="top")
                n_pos = int((want > 0).sum())
                assert len(top) == min(5, n_pos)
                vals, _ = want.sort(descending=True)
                np.testing.assert_allclose([e.max_act for e in top], vals[: len(top)].numpy(), rtol=1e-5)
                # each stored context really has that maximum (ties may pick either context)
                np.testing.assert_allclose([e.max_act for e in top], want[[e.ctx for e in top]].numpy(), rtol=1e-5)
                assert len({e.ctx for e in top}) == len(top)
                assert [e.rank for e in top] == list(range(len(top)))


def test_frequency_and_histogram_match_a_direct_count(analysed, tiny_lm):
    from saescope.analyze import HIST_LOG10_MIN, HIST_PER_DECADE

    run, report = analysed
    codes, _ = _brute(run, tiny_lm, report)
    with run.db() as db:
        for sae_id, (f, _, _) in codes.items():
            assert f.shape[0] == report.n_tokens
            rows = {r["idx"]: r for r in db.top_features(sae_id, order_by="idx", limit=WIDTH)}
            assert sorted(rows) == list(range(WIDTH))
            for i in range(WIDTH):
                fired = f[:, i][f[:, i] > 0]
                r = rows[i]
                assert r["n_fired"] == fired.numel()
                assert r["frequency"] == pytest.approx(fired.numel() / report.n_tokens)
                assert r["max_act"] == pytest.approx(float(fired.max()) if fired.numel() else 0.0, rel=1e-5)
                assert r["mean_act"] == pytest.approx(float(fired.mean()) if fired.numel() else 0.0, rel=1e-4)
                if not fired.numel():
                    assert r["hist"] is None and r["logits_pos"] is None  # dead: no logit effects computed
                    continue
                assert len(r["logits_pos"]) == len(r["logits_neg"]) == 4
                edges, counts = np.array(r["hist"]["edges"]), r["hist"]["counts"]
                assert sum(counts) == fired.numel()
                bins = np.floor((np.log10(fired.numpy()) - HIST_LOG10_MIN) * HIST_PER_DECADE)
                first = round((np.log10(edges[0]) - HIST_LOG10_MIN) * HIST_PER_DECADE)
                assert np.bincount((bins - first).astype(int), minlength=len(counts)).tolist() == counts


def test_example_windows_equal_a_fresh_encode(analysed, tiny_lm):
    run, report = analysed
    _, ctxs = _brute(run, tiny_lm, report)
    lm = tiny_lm
    ids = torch.tensor(ctxs)
    keep = keep_mask(lm, ids)
    checked = {"top": 0, "quantile": 0, "random": 0}
    with run.db() as db:
        for sae_id in run.sae_ids():
            sae = run.load_sae(sae_id)
            site = lm.site(sae.cfg.site, sae.cfg.layer)
            with torch.no_grad():  # a fresh run of the model on every analysed context
                f_all = sae.encode(activations(lm, ids, [site])[site.key].float()) * keep[..., None]
            for i in range(WIDTH):
                for e in db.examples(sae_id, i):
                    ctx = ctxs[e.ctx]
                    # the window is a run of the stored context, never over its BOS
                    n = len(e.tokens)
                    starts = [s for s in range(1, CTX_LEN - n + 1) if ctx[s : s + n] == e.tokens]
                    assert starts, "window tokens are not in the context"
                    f = f_all[e.ctx, :, i]
                    lo = next((s for s in starts if np.allclose(e.acts, f[s : s + n], rtol=2e-3, atol=1e-3)), None)
                    assert lo is not None, (e.acts, f)
                    assert e.max_act == pytest.approx(float(f[lo + e.pos]), rel=1e-3, abs=1e-4)
                    if e.kind == "random":
                        assert max(e.acts) == 0 and e.max_act == 0
                    else:
                        assert e.max_act > 0
                    if e.kind == "top":
                        assert e.max_act == pytest.approx(float(f.max()), rel=1e-5)
                    checked[e.kind] += 1
    assert all(v > 20 for v in checked.values()), checked


def test_quantile_examples_spread_over_activation_levels(analysed):
    run, _ = analysed
    sae_id = run.sae_ids()[0]
    with run.db() as db:
        for i in range(4):  # frequent features: full samples
            q = db.examples(sae_id, i, kind="quantile")
            assert sorted({e.quantile for e in q}) == [0, 1, 2]
            for level in range(3):
                assert [e.rank for e in q if e.quantile == level] == [0, 1]
            means = [np.mean([e.max_act for e in q if e.quantile == level]) for level in range(3)]
            assert means[0] < means[1] < means[2]
            top = db.examples(sae_id, i, kind="top")
            assert max(e.max_act for e in q) <= top[0].max_act


def test_logit_effects_match_the_model(analysed, tiny_lm):
    """The stored top promoted tokens are the top of logits_from_resid(direction) − logits_from_resid(0)."""
    run, _ = analysed
    lm = tiny_lm
    with run.db() as db:
        for sae_id in run.sae_ids():
            sae = run.load_sae(sae_id)
            eff = logit_effects(lm, sae, n=4)
            from saescope.analyze import decoder_directions

            d = decoder_directions(lm, sae)
            with torch.no_grad():
                ref = lm.logits_from_resid(d) - lm.logits_from_resid(torch.zeros_like(d[:1]))
            assert eff["pos_ids"].tolist() == ref.topk(4, dim=1).indices.tolist()
            assert eff["neg_ids"].tolist() == (-ref).topk(4, dim=1).indices.tolist()
            row = db.feature(sae_id, 0)
            assert [t for t, _ in row["logits_pos"]] == db.vocab(eff["pos_ids"][0].tolist())
            pos = [v for _, v in row["logits_pos"]]
            neg = [v for _, v in row["logits_neg"]]
            assert pos == sorted(pos, reverse=True) and neg == sorted(neg) and neg[-1] < pos[-1]


@pytest.mark.parametrize("fast", [torch.float32, torch.bfloat16])
def test_logit_effects_fast_pass_gives_exact_top_tokens(analysed, tiny_lm, monkeypatch, fast):
    """The bf16 candidate pass (used where this CPU multiplies bf16 faster) ends in the exact fp32 top-n."""
    import saescope.analyze as an

    run, _ = analysed
    sae = run.load_sae(run.sae_ids()[0])
    d = an.decoder_directions(tiny_lm, sae) * an.norm_gain(tiny_lm)
    exact = d @ tiny_lm.lm_head().weight[: len(tiny_lm.tokenizer)].T
    monkeypatch.setattr(an, "fast_matmul_dtype", lambda device: fast)
    eff = an.logit_effects(tiny_lm, sae, n=4, chunk=16)
    top = exact.topk(4, dim=1)
    assert eff["pos_ids"].tolist() == top.indices.tolist()
    torch.testing.assert_close(eff["pos"], top.values, rtol=1e-5, atol=1e-5)
    assert eff["neg_ids"].tolist() == (-exact).topk(4, dim=1).indices.tolist()


def test_attn_out_directions_go_through_o_proj(analysed, tiny_lm):
    from saescope.analyze import decoder_directions

    run, _ = analysed
    sae = run.load_sae("attn_out/layer_1_width_24_l0_4")
    o_proj = tiny_lm.site("attn_out", 1).module
    with torch.no_grad():
        torch.testing.assert_close(decoder_directions(tiny_lm, sae), sae.w_dec @ o_proj.weight.T)


def _state_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of every tensor and array reachable from `obj` (attributes, lists, dicts), each counted once."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(_state_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("saescope"):
        return sum(_state_bytes(v, seen) for v in vars(obj).values())
    return 0


def test_memory_does_not_grow_with_tokens():
    """The per-SAE state after 64 batches takes exactly the bytes it took after 1 (fixed (k, width) slots,
    never (tokens, width)); the context store keeps only the contexts the slots still point to."""
    from saescope.analyze import _Batch, _ContextStore, _FeatureAtlas, batch_stream

    sae = SAE.init(SAEConfig(d_in=16, width=WIDTH, l0=4), generator=torch.Generator().manual_seed(0))
    atlas, contexts = _FeatureAtlas(sae, 5, 12, 3, 9), _ContextStore()
    g = torch.Generator().manual_seed(1)
    n_ctx, positions = 4, CTX_LEN - 1  # every position but BOS emits a row
    b, t = torch.arange(n_ctx).repeat_interleave(positions), torch.arange(1, CTX_LEN).repeat(n_ctx)

    def feed(batches: range) -> None:
        for k in batches:
            ids = torch.randint(0, 100, (n_ctx, CTX_LEN), generator=g)
            f = (torch.randn(b.numel(), WIDTH, generator=g) - 1).clamp(min=0)  # ~16% of codes fire
            atlas.update(f, _Batch(ids, b, t, k * n_ctx, 4, 9, torch.device("cpu")), batch_stream(0, "s", k, f.device))
            contexts.add(k * n_ctx, ids)

    feed(range(1))
    one_batch, fired_once = _state_bytes(atlas), int(atlas.n_fired.sum())
    feed(range(1, 64))
    assert int(atlas.n_fired.sum()) > 40 * fired_once  # 64× the tokens went in
    assert _state_bytes(atlas) == one_batch
    contexts._limit = 0  # collect now (analyze collects once 4096 contexts are stored)
    contexts.collect([atlas])
    referenced = {int(c) for s in atlas.keepers() for c in s.ctx.flatten() if c >= 0}
    assert set(contexts.ids) == referenced and len(referenced) < 64 * n_ctx


def test_encode_fast_path_equals_sae_encode():
    cfg = SAEConfig(d_in=16, width=40, l0=4)
    sae = SAE.init(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.threshold.fill_(0.3)
        sae.b_enc.normal_()
        x = torch.randn(50, 16)
        torch.testing.assert_close(encode(sae, x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_resume_after_a_kill(tmp_path, tiny_gemma_dir, tiny_lm, monkeypatch):
    run = _build_run(tmp_path, tiny_gemma_dir, tiny_lm, sae_sites=(("resid_post", 0), ("resid_post", 1)))
    first, second = run.sae_ids()
    real_finish = FeatureDB.finish_sae
    calls = []

    def dying_finish(self, sae_id, n_tokens):
        calls.append(sae_id)
        if sae_id == second:
            raise KeyboardInterrupt  # killed while writing the second SAE
        return real_finish(self, sae_id, n_tokens)

    monkeypatch.setattr(FeatureDB, "finish_sae", dying_finish)
    kw = dict(n_tokens=300, top_k=4, n_quantiles=2, per_quantile=1, n_random=2, n_logits=3, batch_size=4,
              progress=False)
    with pytest.raises(KeyboardInterrupt):
        analyze(run, **kw)
    with run.db() as db:
        assert db.sae_status(first) == "done" and db.sae_status(second) == "running"
        n_first = len(db.examples(first, 0))
    monkeypatch.setattr(FeatureDB, "finish_sae", real_finish)
    report = analyze(run, **kw)
    assert report.skipped == [first] and report.analysed == [second]
    with run.db() as db:
        assert db.sae_status(second) == "done"
        assert len(db.examples(first, 0)) == n_first
        # no duplicate rows from the killed attempt: one feature row per index, top ranks unique
        assert len(db.top_features(second, order_by="idx", limit=1000)) == WIDTH
        for i in range(WIDTH):
            ranks = [e.rank for e in db.examples(second, i, kind="top")]
            assert ranks == list(range(len(ranks)))
    again = analyze(run, **kw)
    assert again.analysed == [] and sorted(again.skipped) == sorted([first, second])
    assert "nothing to analyse" in str(again)
    forced = analyze(run, force=True, **kw)
    assert sorted(forced.analysed) == sorted([first, second])


def test_errors(tmp_path, tiny_gemma_dir, tiny_lm, analysed):
    empty = Run.create(tmp_path / "empty", model=str(tiny_gemma_dir), corpus={}, config={})
    with pytest.raises(SaescopeError, match="no SAEs"):
        analyze(empty, progress=False)
    run, _ = analysed
    with pytest.raises(SaescopeError, match="top_k"):
        analyze(run, top_k=0, progress=False)
    scope = Scope.open(run.root)
    with pytest.raises(SaescopeError, match="out of range"):
        scope.feature(run.sae_ids()[0], WIDTH)
    with pytest.raises(SaescopeError, match="out of range"):
        scope.feature(run.sae_ids()[0], -1)
    with pytest.raises(SaescopeError, match="no SAE"):
        scope.feature("resid_post/7", 0)
    with pytest.raises(SaescopeError, match="tokenis"):
        scope.inspect("   ")
    with pytest.raises(SaescopeError, match="tokenis"):
        scope.inspect("<bos>")
    scope.close()


def test_newer_database_is_refused(tmp_path, tiny_gemma_dir, tiny_lm):
    import sqlite3

    run = _build_run(tmp_path, tiny_gemma_dir, tiny_lm, sae_sites=(("resid_post", 0),))
    FeatureDB.open(run.db_path).close()
    conn = sqlite3.connect(run.db_path)
    conn.execute("INSERT INTO _migrations(name, applied) VALUES ('m999_future', 0)")
    conn.commit()
    conn.close()
    with pytest.raises(SaescopeError, match="newer saescope"):
        analyze(run, n_tokens=100, progress=False)
    with pytest.raises(SaescopeError, match="newer saescope"):
        Scope.open(run.root).feature(run.sae_ids()[0], 0)


# --------------------------------------------------------------------------- scope


def test_feature_card_data(analysed):
    run, _ = analysed
    scope = Scope.open(run.root)
    sae_id = "resid_post/layer_0_width_24_l0_4"
    with run.db() as db:
        db.set_label(sae_id, 1, "words about rivers", source="human")
    card = scope.feature("resid_post/0", 1)  # short reference
    assert card["sae_id"] == sae_id and card["idx"] == 1 and card["layer"] == 0
    assert card["n_fired"] > 0 and 0 < card["frequency"] <= 1
    kinds = {e["kind"] for e in card["examples"]}
    assert kinds <= {"top", "quantile", "random"} and "top" in kinds
    e = card["examples"][0]
    assert len(e["tokens"]) == len(e["acts"]) == len(e["token_ids"])
    assert all(isinstance(t, str) for t in e["tokens"])
    assert card["logits_pos"][0].keys() == {"token", "value"}
    assert [lab["text"] for lab in card["labels"]] == ["words about rivers"]
    import json

    json.dumps(card)  # plain data
    scope.close()


def test_feature_not_analysed_is_none(tmp_path, tiny_gemma_dir, tiny_lm):
    run = _build_run(tmp_path, tiny_gemma_dir, tiny_lm, sae_sites=(("resid_post", 0),))
    scope = Scope.open(run.root)
    assert scope.feature(run.sae_ids()[0], 3) is None
    scope.close()


def test_inspect_shape_and_values(analysed, tiny_lm):
    run, _ = analysed
    scope = Scope.open(run.root)
    scope.__dict__["model"] = tiny_lm
    sae_id = run.sae_ids()[0]
    with run.db() as db:
        db.set_label(sae_id, 0, "everything", source="human")
    out = scope.inspect("paris is a city on the river", top=3)
    import json

    json.dumps(out)
    toks = out["tokens"]
    assert [t["text"] for t in toks] == ["<bos>", "paris", "is", "a", "city", "on", "the", "river"]
    assert toks[0]["bos"] and not any(t["bos"] for t in toks[1:])
    assert [(lay["sae_id"], lay["layer"]) for lay in out["layers"]] == [
        (i, int(i.split("layer_")[1].split("_")[0])) for i in
        sorted(run.sae_ids(), key=lambda s: (int(s.split("layer_")[1].split("_")[0]), s))]
    ids = torch.tensor([[2] + [tiny_lm.tokenizer.convert_tokens_to_ids(t["text"]) for t in toks[1:]]])
    for lay in out["layers"]:
        feats = lay["features"]
        assert len(feats) == len(toks) and feats[0] == []
        sae = run.load_sae(lay["sae_id"])
        site = tiny_lm.site(sae.cfg.site, sae.cfg.layer)
        with torch.no_grad():
            f = sae.encode(activations(tiny_lm, ids, [site])[site.key][0].float())
        for p in range(1, len(toks)):
            assert 0 < len(feats[p]) <= 3
            want = f[p].topk(3)
            got = [(d["idx"], d["act"]) for d in feats[p]]
            assert [i for i, _ in got] == [int(i) for i, v in zip(want.indices, want.values) if v > 0]
            assert [a for _, a in got] == pytest.approx([float(v) for v in want.values if v > 0], rel=1e-5)
            for d in feats[p]:
                if lay["sae_id"] == sae_id and d["idx"] == 0:
                    assert d["label"] == "everything"
    scope.close()


# --------------------------------------------------------------------------- CLI


def test_cli_feature_card(analysed):
    run, _ = analysed
    res = CliRunner().invoke(cli, ["feature", str(run.root), "resid_post/1", "0"])
    assert res.exit_code == 0, res.output
    assert "resid_post/layer_1_width_24_l0_4" in res.output and "feature 0" in res.output
    assert "top contexts" in res.output and "promotes" in res.output and "frequency" in res.output
    res = CliRunner().invoke(cli, ["feature", str(run.root), "resid_post/1", "99"])
    assert res.exit_code != 0 and "out of range" in str(res.exception)


def test_cli_inspect_and_analyze(tmp_path, tiny_gemma_dir, tiny_lm, monkeypatch):
    run = _build_run(tmp_path, tiny_gemma_dir, tiny_lm, sae_sites=(("resid_post", 0),))
    monkeypatch.setattr(Run, "model", property(lambda self: tiny_lm))
    res = CliRunner().invoke(cli, ["analyze", str(run.root), "--tokens", "200", "--top-k", "3"])
    assert res.exit_code == 0, res.output
    assert "analysed 1 SAEs" in res.output
    assert Run.open(run.root).is_done("analyze")
    res = CliRunner().invoke(cli, ["inspect", str(run.root), "the king of france", "--top", "2"])
    assert res.exit_code == 0, res.output
    assert "king" in res.output and "L0" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(run.root), "the king", "--json"])
    assert res.exit_code == 0
    import json

    assert len(json.loads(res.output)["tokens"]) == 3


# -- a resumed analysis writes the same atlas as an uninterrupted one ---------------------------------

RESUME_KW = dict(n_tokens=400, top_k=4, n_quantiles=3, per_quantile=2, n_random=3, window=(5, 2), n_logits=3,
                 batch_size=4, progress=False)
KILLED_AFTER_FIRST_SAE = """
import sys, time
from saescope.analyze import analyze
from saescope.featuredb import FeatureDB
from saescope.runs import Run

real_finish = FeatureDB.finish_sae

def finish_then_hang(self, sae_id, n_tokens):
    real_finish(self, sae_id, n_tokens)
    print("finished", sae_id, flush=True)
    time.sleep(120)  # killed here with SIGKILL: the first SAE is done, the others are not

FeatureDB.finish_sae = finish_then_hang
analyze(Run.open(sys.argv[1]), **{RESUME_KW!r})
"""


def _atlas_dump(db_path) -> dict:
    """Every row analyze writes (all columns but the SAE folder path), in a fixed order."""
    import sqlite3

    conn = sqlite3.connect(db_path)
    try:
        return {
            "saes": conn.execute("SELECT id, site, layer, width, d_in, hook_name, status, n_tokens, config_json "
                                 "FROM saes ORDER BY id").fetchall(),
            "features": conn.execute("SELECT * FROM features ORDER BY sae_id, idx").fetchall(),
            "examples": conn.execute("SELECT sae_id, idx, kind, rank, quantile, max_act, tokens, acts, ctx, pos "
                                     "FROM examples ORDER BY sae_id, idx, kind, quantile, rank").fetchall(),
        }
    finally:
        conn.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_gemma_dir, tiny_lm):
    """A three-SAE run and the atlas of one uninterrupted analysis of it (a copy of the run)."""
    import shutil

    base = tmp_path_factory.mktemp("resume")
    run = _build_run(base, tiny_gemma_dir, tiny_lm)
    ref = Run.open(shutil.copytree(run.root, base / "reference"))
    ref.__dict__["model"] = tiny_lm
    analyze(ref, **RESUME_KW)
    return run.root, _atlas_dump(ref.db_path)


def _fresh_copy(src, dest, lm) -> Run:
    import shutil

    run = Run.open(shutil.copytree(src, dest))
    run.__dict__["model"] = lm
    return run


def test_resume_after_kill_9_gives_the_same_atlas(tmp_path, uninterrupted, tiny_lm):
    import os
    import signal
    import subprocess
    import sys

    src, reference = uninterrupted
    run = _fresh_copy(src, tmp_path / "run", tiny_lm)
    first = run.sae_ids()[0]
    code = KILLED_AFTER_FIRST_SAE.replace("{RESUME_KW!r}", repr(RESUME_KW))
    proc = subprocess.Popen([sys.executable, "-c", code, str(run.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("finished "), proc.stderr.read() if proc.poll() is not None else line
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with run.db() as db:
        statuses = {s["id"]: s["status"] for s in db.saes()}
    assert statuses.pop(line.split()[1]) == "done" and set(statuses.values()) == {"running"}
    report = analyze(run, **RESUME_KW)
    assert len(report.skipped) == 1 and len(report.analysed) == 2 and first in run.sae_ids()
    got = _atlas_dump(run.db_path)
    assert len(got["examples"]) == len(reference["examples"])
    assert {r[2] for r in got["examples"]} == {"top", "quantile", "random"}
    assert got == reference


def test_resume_after_a_full_disk_gives_the_same_atlas(tmp_path, uninterrupted, tiny_lm, monkeypatch):
    import sqlite3

    src, reference = uninterrupted
    run = _fresh_copy(src, tmp_path / "run", tiny_lm)
    real_write = FeatureDB.write_examples
    written = []

    def disk_fills_on_the_second_sae(self, sae_id, rows):
        if sae_id not in written and len(written) == 1:
            raise sqlite3.OperationalError("database or disk is full")  # what SQLite raises (SQLITE_FULL)
        written.append(sae_id) if sae_id not in written else None
        return real_write(self, sae_id, rows)

    monkeypatch.setattr(FeatureDB, "write_examples", disk_fills_on_the_second_sae)
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        analyze(run, **RESUME_KW)
    monkeypatch.setattr(FeatureDB, "write_examples", real_write)
    report = analyze(run, **RESUME_KW)
    assert report.skipped == written and len(report.analysed) == 2
    assert _atlas_dump(run.db_path) == reference


def test_each_sae_and_batch_has_its_own_random_stream():
    from saescope.analyze import batch_stream

    def draw(*key):
        return torch.rand(4, generator=batch_stream(*key, "cpu"))

    assert torch.equal(draw(0, "resid_post/a", 3), draw(0, "resid_post/a", 3))
    for other in ((1, "resid_post/a", 3), (0, "resid_post/b", 3), (0, "resid_post/a", 4)):
        assert not torch.equal(draw(0, "resid_post/a", 3), draw(*other))
