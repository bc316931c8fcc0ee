"""The web app's JSON API over a tiny real run (FastAPI TestClient): every endpoint, bad input, auth."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from atlas_run import build_run  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from saescope.errors import SaescopeError  # noqa: E402
from saescope.server.app import CSP, create_app  # noqa: E402

BASE = "http://127.0.0.1"
TOKEN = "test-token-123456"


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory, tiny_gemma_dir):
    return build_run(tmp_path_factory.mktemp("atlas"), tiny_gemma_dir)


@pytest.fixture(scope="module")
def app(atlas_dir):
    return create_app(atlas_dir)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
def sae_ids(client):
    return [s["id"] for s in client.get("/api/saes").json()["saes"]]


@pytest.fixture(scope="module")
def fired(client, sae_ids):
    """(sae_id, idx) of the most frequent analysed feature of layer 1."""
    top = client.get(f"/api/top/{sae_ids[1]}", params={"order_by": "frequency", "limit": 5}).json()
    assert top["features"], "the tiny run has no analysed features"
    return sae_ids[1], top["features"][0]["idx"]


def post(client, path, body, **kw):
    return client.post(path, json=body, **kw)


def detail(resp) -> str:
    body = resp.json()
    assert isinstance(body["detail"], str) and body["detail"]
    return body["detail"]


# --------------------------------------------------------------------------- pages and run facts


def test_index_static_and_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert '<script src="/static/app.js"' in r.text
    assert r.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert r.headers["x-content-type-options"] == "nosniff"
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "textContent" in js.text
    code = re.sub(r"//.*", "", js.text)  # comments may name what the code must never do
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function", code)
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/static/nope.js").status_code == 404


def test_run_saes_eval(client, sae_ids):
    info = client.get("/api/run").json()
    assert info["n_saes"] == 3 and info["has_eval"] and info["has_features"]
    assert info["stages"]["eval"]["status"] == "done"
    saes = client.get("/api/saes").json()["saes"]
    assert [s["layer"] for s in saes] == [0, 1, 2]
    assert all(s["width"] == 32 and s["status"] == "done" for s in saes)
    assert all(s["eval"]["fvu"] == pytest.approx(s["eval"]["fvu"]) and s["eval"]["l0"] > 0 for s in saes)
    ev = client.get("/api/eval").json()
    assert set(ev["saes"]) == set(sae_ids) and ev["eval_tokens"] > 0
    png = client.get("/eval.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_missing_is_404(atlas_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(atlas_dir, bare)
    (bare / "eval.json").unlink()
    (bare / "eval.png").unlink()
    with TestClient(create_app(bare), base_url=BASE) as c:
        assert c.get("/api/run").json()["has_eval"] is False
        r = c.get("/api/eval")
        assert r.status_code == 404 and "saescope eval" in detail(r)
        assert c.get("/eval.png").status_code == 404
        assert all(s["eval"] is None for s in c.get("/api/saes").json()["saes"])


def test_unknown_run_refused(tmp_path):
    with pytest.raises(SaescopeError, match="run not found"):
        create_app(tmp_path / "nope")


def test_nan_metrics_are_json_null(atlas_dir, tmp_path):
    run = tmp_path / "nan"
    shutil.copytree(atlas_dir, run)
    ev = json.loads((run / "eval.json").read_text())
    first = next(iter(ev["saes"]))
    ev["saes"][first]["ce_recovered"] = float("nan")
    (run / "eval.json").write_text(json.dumps(ev))  # Python writes NaN, which JSON does not allow
    with TestClient(create_app(run), base_url=BASE) as c:
        r = c.get("/api/eval")
        assert r.status_code == 200 and "NaN" not in r.text
        assert r.json()["saes"][first]["ce_recovered"] is None


# --------------------------------------------------------------------------- inspect


def test_inspect(client, sae_ids):
    r = post(client, "/api/inspect", {"text": "the king is in paris .", "top": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["tokens"]) >= 6
    assert [layer["sae_id"] for layer in out["layers"]] == sae_ids
    for layer in out["layers"]:
        assert len(layer["idx"]) == len(layer["act"]) == len(layer["l0"]) == len(layer["rel"]) == len(out["tokens"])
        for ids, acts, l0 in zip(layer["idx"], layer["act"], layer["l0"]):
            assert len(ids) == len(acts) == min(3, l0)
            assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
            assert all(0 <= i < 32 for i in ids)
    assert any(ids for layer in out["layers"] for ids in layer["idx"])
    assert "paris" in [t["text"].strip() for t in out["tokens"]]
    assert out["tokens"][0]["bos"] and all(layer["idx"][0] == [] and layer["l0"][0] == 0 for layer in out["layers"])


def test_inspect_cells_l0_rel_and_labels(app, client, sae_ids):
    """Each cell's number is the count of active features (checked against the SAE on the same text);
    `rel` is the top feature's activation ÷ its analysed max; each label is sent once."""
    text = "the queen was in france with music ."
    out = post(client, "/api/inspect", {"text": text, "top": 20}).json()
    full = app.state.atlas.scope.inspect(text, top=32)  # width 32: every active feature
    for layer, ref in zip(out["layers"], full["layers"]):
        assert layer["l0"] == [len(feats) for feats in ref["features"]]
        assert layer["l0"] == [len(ids) for ids in layer["idx"]]  # l0 <= 20 on this text
        db_max = app.state.atlas.scope.db.max_acts(layer["sae_id"])
        for ids, acts, rel in zip(layer["idx"], layer["act"], layer["rel"]):
            if ids and db_max.get(ids[0]):
                assert rel == pytest.approx(acts[0] / db_max[ids[0]], rel=2e-3, abs=2e-3)
            else:
                assert rel is None
        labels = out["labels"][layer["sae_id"]]
        shown = {i for ids in layer["idx"] for i in ids}
        for i in shown:
            lab = app.state.atlas.scope.db.labels(layer["sae_id"], i)
            assert (str(i) in labels) == bool(lab)


def test_inspect_fast_runs_the_model_in_bf16_close_to_exact(app, client):
    """`fast` runs the model's matrix products in bf16 where the CPU has native bf16 (else it changes nothing),
    says so, and keeps the cells close to the exact ones."""
    lm = app.state.atlas.scope.model
    text = "the king is in paris and the queen is in france with music ."
    exact = post(client, "/api/inspect", {"text": text, "top": 3}).json()
    fast = post(client, "/api/inspect", {"text": text, "top": 3, "fast": True}).json()
    assert exact["precision"] == "float32"
    assert fast["precision"] == (lm.fast_precision or "float32")
    if lm.fast_precision is None:
        assert fast["layers"] == exact["layers"]
        return
    with lm.fast_matmuls():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
    pairs = [(a, b) for lf, le in zip(fast["layers"], exact["layers"])
             for tf, te in zip(lf["act"], le["act"]) for a, b in zip(tf, te)]
    assert pairs and any(a != b for a, b in pairs), "bf16 products change the activations a little"
    assert sum(abs(a - b) for a, b in pairs) <= 0.05 * sum(abs(b) for _, b in pairs)
    same = sum(len(set(f) & set(e)) for lf, le in zip(fast["layers"], exact["layers"])
               for f, e in zip(lf["idx"], le["idx"]))
    assert same >= 0.9 * sum(len(e) for le in exact["layers"] for e in le["idx"])


def test_activation_testing_matches_inspect(client, fired):
    sae_id, idx = fired
    text = "the king is in paris and the queen is in france ."
    r = post(client, f"/api/feature/{sae_id}/{idx}/activations", {"text": text})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["sae_id"], out["idx"]) == (sae_id, idx)
    assert len(out["acts"]) == len(out["tokens"]) and out["tokens"][0]["bos"] and out["acts"][0] == 0
    assert out["max_act"] == max(out["acts"]) and out["max_act_analysed"] > 0
    ins = post(client, "/api/inspect", {"text": text, "top": 20}).json()
    layer = next(lay for lay in ins["layers"] if lay["sae_id"] == sae_id)
    for t, (ids, acts) in enumerate(zip(layer["idx"], layer["act"])):
        expected = acts[ids.index(idx)] if idx in ids else 0.0
        assert out["acts"][t] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert any(a > 0 for a in out["acts"]), "the most frequent feature fires somewhere in this text"


@pytest.mark.parametrize("suffix, body, status, words", [
    ("3/activations", {"text": ""}, 422, "text"),
    ("3/activations", {"text": "   "}, 400, "empty"),
    ("3/activations", {"text": "the " * 600}, 422, "text"),
    ("3/activations", {"text": "the", "top": 1}, 422, "top"),
    ("32/activations", {"text": "the king"}, 404, "out of range"),
])
def test_activation_testing_bad_input(client, sae_ids, suffix, body, status, words):
    r = post(client, f"/api/feature/{sae_ids[1]}/{suffix}", body)
    assert r.status_code == status, r.text
    assert words in detail(r).lower()


def test_similar_features_are_decoder_cosines(client, atlas_dir, sae_ids, fired):
    from saescope.runs import Run

    sae_id, idx = fired
    r = client.get(f"/api/feature/{sae_id}/{idx}/similar", params={"k": 5})
    assert r.status_code == 200, r.text
    groups = r.json()["groups"]
    assert [g["sae_id"] for g in groups] == sae_ids  # layer 1: layers 0, 1 and 2
    run = Run.open(atlas_dir)
    me = run.load_sae(sae_id).w_dec[idx].detach()
    for g in groups:
        w = run.load_sae(g["sae_id"]).w_dec.detach()
        cos = (w @ me) / (w.norm(dim=1) * me.norm())
        if g["sae_id"] == sae_id:
            cos[idx] = -2
        expected = cos.topk(5)
        assert [f["idx"] for f in g["features"]] == expected.indices.tolist()
        assert [f["cosine"] for f in g["features"]] == pytest.approx(expected.values.tolist(), abs=1e-3)
    assert idx not in [f["idx"] for f in groups[1]["features"]]
    only = client.get(f"/api/feature/{sae_ids[0]}/{idx}/similar", params={"span": 0}).json()["groups"]
    assert [g["sae_id"] for g in only] == [sae_ids[0]] and len(only[0]["features"]) == 8
    assert client.get(f"/api/feature/{sae_id}/32/similar").status_code == 404
    assert client.get(f"/api/feature/{sae_id}/{idx}/similar", params={"k": 0}).status_code == 422


def test_feature_pages_sort_and_filters(client, sae_ids):
    path = f"/api/features/{sae_ids[1]}"
    everything = client.get(path, params={"order_by": "idx", "desc": False, "limit": 500}).json()
    assert everything["total"] == 32 and [f["idx"] for f in everything["features"]] == list(range(32))
    pages = [client.get(path, params={"order_by": "frequency", "offset": o, "limit": 10}).json() for o in (0, 10, 20, 30)]
    seen = [f["idx"] for p in pages for f in p["features"]]
    assert sorted(seen) == list(range(32)) and all(p["total"] == 32 for p in pages)
    freqs = [f["frequency"] for p in pages for f in p["features"]]
    assert freqs == sorted(freqs, reverse=True)
    up = client.get(path, params={"order_by": "frequency", "desc": False, "limit": 500}).json()["features"]
    assert [f["frequency"] for f in up] == sorted(freqs)
    by = {f["idx"]: f for f in everything["features"]}
    for state, keep in (("dead", lambda f: not f["n_fired"]), ("alive", lambda f: f["n_fired"] > 0),
                        ("dense", lambda f: f["frequency"] > 0.1),
                        ("sparse", lambda f: f["n_fired"] > 0 and f["frequency"] <= 0.1)):
        got = client.get(path, params={"state": state, "limit": 500}).json()
        assert {f["idx"] for f in got["features"]} == {i for i, f in by.items() if keep(f)}, state
        assert got["total"] == len(got["features"])
    band = client.get(path, params={"min_freq": 0.01, "max_freq": 0.2, "limit": 500}).json()["features"]
    assert {f["idx"] for f in band} == {i for i, f in by.items() if 0.01 <= f["frequency"] <= 0.2}
    scored = [f for f in by.values() if f["score"] is not None]
    assert scored, "label_offline scored some labels"
    cut = sorted(f["score"] for f in scored)[len(scored) // 2]
    good = client.get(path, params={"min_score": cut, "order_by": "score", "limit": 500}).json()["features"]
    assert {f["idx"] for f in good} == {f["idx"] for f in scored if f["score"] >= cut}
    assert [f["score"] for f in good] == sorted((f["score"] for f in good), reverse=True)
    assert all(f["dead"] == (not f["n_fired"]) and f["dense"] == (f["frequency"] > 0.1) for f in by.values())
    for bad in ({"order_by": "drop table"}, {"state": "zombie"}, {"limit": 0}, {"min_score": 2}, {"offset": -1}):
        assert client.get(path, params=bad).status_code == 422, bad


@pytest.mark.parametrize("body, status, words", [
    ({"text": "", "top": 3}, 422, "text"),
    ({"text": "   ", "top": 3}, 400, "empty"),
    ({"text": "the " * 600, "top": 3}, 422, "text"),
    ({"text": "the king", "top": 0}, 422, "top"),
    ({"text": "the king", "top": 999}, 422, "top"),
    ({"text": "the king", "top": "many"}, 422, "top"),
    ({"text": 5}, 422, "text"),
    ({"top": 3}, 422, "text"),
    ({"text": "the king", "evil": 1}, 422, "evil"),
])
def test_inspect_bad_input(client, body, status, words):
    r = post(client, "/api/inspect", body)
    assert r.status_code == status, r.text
    assert words in detail(r).lower()


def test_malformed_json_and_content_type(client):
    r = client.post("/api/inspect", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "json" in detail(r).lower()
    r = client.post("/api/inspect", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = client.post("/api/inspect", content=b"text=the+king", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415 and "json" in detail(r).lower()


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
@pytest.mark.parametrize("ctype", [None, "application/json"])
def test_other_methods_on_post_routes_are_405(client, sae_ids, method, ctype):
    path = f"/api/feature/{sae_ids[0]}/3/label"
    before = client.get(path.rsplit("/", 1)[0]).json()["label_history"]
    headers = {"Content-Type": ctype} if ctype else {}
    for route in (path, "/api/inspect", "/api/steer"):
        r = client.request(method, route, content=b'{"text": "x"}' if ctype else None, headers=headers)
        assert r.status_code == 405 and r.headers.get("allow"), (route, r.status_code, r.text)
        assert detail(r) == "Method Not Allowed"
    assert client.get(path.rsplit("/", 1)[0]).json()["label_history"] == before


def test_prompt_longer_than_model_context(app, client):
    cfg = app.state.atlas.scope.model.model.config
    old = cfg.max_position_embeddings
    cfg.max_position_embeddings = 8
    try:
        r = post(client, "/api/inspect", {"text": "the king is in paris and the queen is in france"})
        assert r.status_code == 400 and "context of 8" in detail(r)
        r = post(client, "/api/steer", {"prompt": "the king is", "features": ["1:0=1"], "max_new_tokens": 10})
        assert r.status_code == 400 and "context of 8" in detail(r)
    finally:
        cfg.max_position_embeddings = old


def test_model_calls_are_serialised_off_the_event_loop(app, client):
    """While the model lock is held, an inspect waits for it, and other requests are still served."""
    lock = app.state.atlas.compute
    done = []
    lock.acquire()
    try:
        worker = threading.Thread(target=lambda: done.append(post(client, "/api/inspect", {"text": "the king"})))
        worker.start()
        time.sleep(0.5)
        assert not done  # waiting for the model
        t0 = time.perf_counter()
        assert client.get("/api/run").status_code == 200  # the event loop is free
        assert time.perf_counter() - t0 < 5
        assert not done
    finally:
        lock.release()
    worker.join(30)
    assert done and done[0].status_code == 200


# --------------------------------------------------------------------------- features and labels


def test_feature_page_data(client, fired):
    sae_id, idx = fired
    r = client.get(f"/api/feature/{sae_id}/{idx}")
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["sae_id"] == sae_id and f["idx"] == idx and f["analysed"] is True
    assert f["sae"]["layer"] == 1 and f["sae"]["width"] == 32
    assert any(lab["source"] == "offline" for lab in f["labels"])  # label_offline labelled it
    assert f["label_history"]
    # by "LAYER" reference too
    short = client.get(f"/api/feature/1/{idx}").json()
    assert short["sae_id"] == sae_id


def test_feature_bad_refs(client, sae_ids):
    assert client.get("/api/feature/resid_post/layer_9_width_32_l0_4/0").status_code == 404
    r = client.get(f"/api/feature/{sae_ids[0]}/32")
    assert r.status_code == 404 and "out of range" in detail(r)
    assert client.get(f"/api/feature/{sae_ids[0]}/-1").status_code == 404
    assert client.get(f"/api/feature/{sae_ids[0]}/abc").status_code == 422
    assert client.get("/api/feature/7/0").status_code == 404
    assert client.get("/api/top/resid_post/layer_9_width_32_l0_4").status_code == 404
    assert client.get(f"/api/top/{sae_ids[0]}", params={"order_by": "drop table"}).status_code == 422


def test_label_edit_history_and_search(client, fired):
    sae_id, idx = fired
    r = post(client, f"/api/feature/{sae_id}/{idx}/label", {"text": "royal zebracorn", "author": "ann"})
    assert r.status_code == 200, r.text
    first = r.json()["id"]
    r = post(client, f"/api/feature/{sae_id}/{idx}/label", {"text": "royal unicorn words", "author": "bob"})
    assert r.status_code == 200
    f = client.get(f"/api/feature/{sae_id}/{idx}").json()
    human = [lab for lab in f["labels"] if lab["source"] == "human"]
    assert [lab["text"] for lab in human] == ["royal unicorn words"] and human[0]["author"] == "bob"
    old = [lab for lab in f["label_history"] if lab["id"] == first]
    assert old and old[0]["is_current"] is False and old[0]["text"] == "royal zebracorn"
    hits = client.get("/api/search", params={"q": "unicorn", "mode": "fts"}).json()["hits"]
    assert (hits[0]["sae_id"], hits[0]["idx"], hits[0]["layer"]) == (sae_id, idx, 1)
    assert hits[0]["label"] == "royal unicorn words"
    assert client.get("/api/search", params={"q": "zebracorn", "mode": "fts"}).json()["hits"] == []


def test_database_fault_is_one_clear_4xx_and_the_next_request_works(app, client, fired):
    """A failed transaction is rolled back, answered 400 with what to do, and the connection reopened."""
    from conftest import FaultyConnection

    sae_id, idx = fired
    db = app.state.atlas.scope.db
    db._conn = FaultyConnection(db._conn, "SELECT * FROM features")
    r = client.get(f"/api/feature/{sae_id}/{idx}")
    assert r.status_code == 400 and "could not be read or written (disk I/O error)" in detail(r)
    assert "try again" in detail(r) and "aside" not in detail(r)
    r = client.get(f"/api/feature/{sae_id}/{idx}")
    assert r.status_code == 200 and r.json()["analysed"]
    assert not isinstance(db._conn, FaultyConnection)


def test_label_save_on_a_read_only_run_is_400_and_writes_nothing(client, fired, monkeypatch):
    import saescope.featuredb as featuredb

    sae_id, idx = fired
    before = client.get(f"/api/feature/{sae_id}/{idx}").json()["label_history"]
    monkeypatch.setattr(featuredb, "can_write", lambda path: False)
    r = post(client, f"/api/feature/{sae_id}/{idx}/label", {"text": "not saved"})
    assert r.status_code == 400 and "read-only" in detail(r) and "nothing was written" in detail(r)
    assert client.get(f"/api/feature/{sae_id}/{idx}").json()["label_history"] == before


def test_label_with_markup_is_stored_as_text(client, fired):
    sae_id, idx = fired
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'
    r = post(client, f"/api/feature/{sae_id}/{idx}/label", {"text": evil})
    assert r.status_code == 200
    f = client.get(f"/api/feature/{sae_id}/{idx}").json()
    assert [lab["text"] for lab in f["labels"] if lab["source"] == "human"] == [evil]
    hits = client.get("/api/search", params={"q": "script alert", "mode": "fts"}).json()["hits"]
    assert hits and hits[0]["label"] == evil


@pytest.mark.parametrize("body, status", [
    ({"text": ""}, 422),
    ({"text": "   "}, 400),
    ({"text": "x" * 501}, 422),
    ({"text": "ok", "author": "a" * 101}, 422),
    ({"text": ["a"]}, 422),
    ({}, 422),
])
def test_label_bad_input(client, fired, body, status):
    sae_id, idx = fired
    r = post(client, f"/api/feature/{sae_id}/{idx}/label", body)
    assert r.status_code == status, r.text
    detail(r)


def test_label_bad_feature(client, sae_ids):
    assert post(client, "/api/feature/resid_post/layer_9_width_32_l0_4/0/label", {"text": "x"}).status_code == 404
    assert post(client, f"/api/feature/{sae_ids[0]}/32/label", {"text": "x"}).status_code == 404
    r = client.post(f"/api/feature/{sae_ids[0]}/0/label", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


# --------------------------------------------------------------------------- search


def test_search_bad_input(client):
    for params in ({"q": ""}, {"q": "   "}, {}):
        r = client.get("/api/search", params=params)
        assert r.status_code == 400 and "empty" in detail(r)
    assert client.get("/api/search", params={"q": "x", "mode": "magic"}).status_code == 422
    assert client.get("/api/search", params={"q": "x" * 201}).status_code == 422
    assert client.get("/api/search", params={"q": "x", "limit": 0}).status_code == 422
    # FTS syntax is taken literally, never an error
    r = client.get("/api/search", params={"q": 'NEAR( "unclosed * OR', "mode": "fts"})
    assert r.status_code == 200


def test_search_hybrid(client, fired):
    sae_id, idx = fired
    post(client, f"/api/feature/{sae_id}/{idx}/label", {"text": "capital city of france"})
    r = client.get("/api/search", params={"q": "capital city", "mode": "hybrid"})
    assert r.status_code == 200 and r.json()["mode"] == "hybrid"
    assert (r.json()["hits"][0]["sae_id"], r.json()["hits"][0]["idx"]) == (sae_id, idx)


# --------------------------------------------------------------------------- steer


def test_steer(client, fired):
    sae_id, idx = fired
    r = post(client, "/api/steer", {"prompt": "the king is", "features": [f"{sae_id}:{idx}=8"],
                                    "max_new_tokens": 6, "greedy": True, "seed": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["unsteered"], str) and isinstance(out["steered"], str)
    assert out["interventions"][0]["spec"] == f"{sae_id}:{idx}=8"
    e = out["effects"][0]
    assert (e["sae_id"], e["idx"], e["mode"], e["value"]) == (sae_id, idx, "add", 8)
    assert e["act_during"] is not None and e["typical"] > 0
    # a feature without a value takes the form's strength; layer refs resolve
    r = post(client, "/api/steer", {"prompt": "the king is", "features": [f"1:{idx}"], "strength": 3,
                                    "max_new_tokens": 3})
    assert r.status_code == 200 and r.json()["interventions"][0]["value"] == 3


def test_steer_by_concept(client, fired):
    r = post(client, "/api/steer", {"prompt": "the queen", "concept": "music", "concept_strength": 2,
                                    "max_new_tokens": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    choice = out["concept"]["choice"]
    assert choice["strength"] == 2 and "as given" in choice["reason"]
    assert [out["effects"][0]["sae_id"], out["effects"][0]["idx"]] == list(choice["features"][0])
    r = post(client, "/api/steer", {"prompt": "the queen", "concept": "quantum chromodynamics", "max_new_tokens": 3})
    assert r.status_code == 400 and "no feature writes" in detail(r)


def stream_lines(client, body) -> list[dict]:
    with client.stream("POST", "/api/steer/stream", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def test_steer_stream_sends_tokens_then_the_same_result(client, fired):
    sae_id, idx = fired
    body = {"prompt": "the king is", "features": [f"{sae_id}:{idx}=8"], "max_new_tokens": 6}
    lines = stream_lines(client, body)
    tokens = [x for x in lines if x["type"] == "token"]
    assert [x["which"] for x in tokens] == ["steered"] * 6 + ["unsteered"] * 6  # steered first
    assert [x["n"] for x in tokens] == [1, 2, 3, 4, 5, 6] * 2
    assert [x["type"] for x in lines[-2:]] == ["result", "done"]
    result = lines[-2]["result"]
    assert tokens[5]["text"] == result["steered"] and tokens[-1]["text"] == result["unsteered"]
    plain = post(client, "/api/steer", body).json()
    assert (plain["steered"], plain["unsteered"]) == (result["steered"], result["unsteered"])
    assert plain["effects"][0]["act_during"] == pytest.approx(result["effects"][0]["act_during"])


def test_steer_samples_temperature_and_seeds(client, fired):
    sae_id, idx = fired
    body = {"prompt": "the king is", "features": [f"{sae_id}:{idx}=4"], "max_new_tokens": 8, "greedy": False,
            "temperature": 1.5, "seed": 3, "n": 3}
    out = post(client, "/api/steer", body).json()
    assert len(out["samples"]) == 3
    lines = stream_lines(client, body)
    results = [x for x in lines if x["type"] == "result"]
    assert [x["sample"] for x in results] == [0, 1, 2]
    assert [x["result"]["steered"] for x in results] == [s["steered"] for s in out["samples"]]
    one = post(client, "/api/steer", {**body, "n": 1, "seed": 4}).json()  # sample 1 used seed 3 + 1
    assert (one["steered"], one["unsteered"]) == (out["samples"][1]["steered"], out["samples"][1]["unsteered"])
    assert len({s["unsteered"] for s in out["samples"]}) > 1, "three seeds at temperature 1.5 drew one text"
    r = post(client, "/api/steer", {**body, "greedy": True})
    assert r.status_code == 400 and "greedy" in detail(r)


def test_steer_stream_cancel_stops_the_model(app, client, fired):
    sae_id, idx = fired
    body = {"prompt": "the king is", "features": [f"{sae_id}:{idx}=4"], "max_new_tokens": 200, "n": 4,
            "greedy": False}
    lines = []
    with client.stream("POST", "/api/steer/stream", json=body) as r:
        for line in r.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == 1:
                assert post(client, "/api/steer/cancel", {}).json() == {"cancelled": True}
    assert lines[-1] == {"type": "cancelled"}
    assert len([x for x in lines if x["type"] == "token"]) < 20  # 1,600 tokens were asked for
    assert not app.state.atlas.compute.locked() and app.state.atlas.steer_job is None
    assert post(client, "/api/steer/cancel", {}).json() == {"cancelled": False}
    assert post(client, "/api/inspect", {"text": "the king"}).status_code == 200


def test_steer_stream_bad_input_is_a_400_before_streaming(client):
    r = post(client, "/api/steer/stream", {"prompt": "the king", "features": ["nonsense"]})
    assert r.status_code == 400 and "cannot read feature" in detail(r)
    r = post(client, "/api/steer/stream", {"prompt": "the king", "features": ["1:99=2"]})
    assert r.status_code == 400 and "out of range" in detail(r)


def test_concept_candidates(client):
    r = client.get("/api/concept", params={"q": "music"})
    assert r.status_code == 200, r.text
    cands = r.json()["candidates"]
    assert cands and all(len(c["features"][0]) == 2 for c in cands)
    steered = post(client, "/api/steer", {"prompt": "the queen", "concept": "music", "concept_strength": 2,
                                          "max_new_tokens": 3}).json()
    assert [list(f) for f in steered["concept"]["choice"]["features"]] == [list(cands[0]["features"][0])]
    assert client.get("/api/concept", params={"q": " "}).status_code == 400
    r = client.get("/api/concept", params={"q": "quantum chromodynamics"})
    assert r.status_code == 400 and "no feature writes" in detail(r)


def test_unexpected_error_shows_its_reason(app, client, fired, monkeypatch):
    sae_id, idx = fired

    def broken(*a, **kw):
        raise RuntimeError("the label store fell over\nsecond line")

    monkeypatch.setattr("saescope.label.manual.set_label", broken)
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as c:
        r = post(c, f"/api/feature/{sae_id}/{idx}/label", {"text": "x"})
    assert r.status_code == 500
    assert detail(r) == "internal error (RuntimeError: the label store fell over); see the server log"


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "the king"}, 400, "nothing to steer"),
    ({"prompt": "the king", "features": ["nonsense"]}, 400, "cannot read feature"),
    ({"prompt": "the king", "features": ["9:1=2"]}, 400, "no sae"),
    ({"prompt": "the king", "features": ["1:999=2"]}, 400, "out of range"),
    ({"prompt": "the king", "features": ["1:1@explode=2"]}, 400, "unknown mode"),
    ({"prompt": "", "features": ["1:1=2"]}, 422, "prompt"),
    ({"prompt": "   ", "features": ["1:1=2"]}, 400, "empty"),
    ({"prompt": "a" * 2001, "features": ["1:1=2"]}, 422, "prompt"),
    ({"prompt": "the", "features": ["1:1=2"], "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"prompt": "the", "features": ["1:1=2"], "max_new_tokens": 10_000}, 422, "max_new_tokens"),
    ({"prompt": "the", "features": ["1:1=2"] * 17}, 422, "features"),
    ({"prompt": "the", "features": ["1:1=2"], "strength": 1e9}, 422, "strength"),
    ({"prompt": "the", "features": ["1:1=2"], "seed": -1}, 422, "seed"),
    ({"prompt": "the", "features": "1:1=2"}, 422, "features"),
    ({"prompt": "the", "features": ["1:1=2"], "temperature": 0}, 422, "temperature"),
    ({"prompt": "the", "features": ["1:1=2"], "n": 5}, 422, "n"),
    ({"prompt": "the", "features": ["1:1=2"], "n": 2}, 400, "greedy"),
])
def test_steer_bad_input(client, body, status, words):
    r = post(client, "/api/steer", body)
    assert r.status_code == status, r.text
    assert words in detail(r).lower()


def test_steer_nan_strength_rejected(client):
    r = client.post("/api/steer", content=b'{"prompt": "the", "features": ["1:1"], "strength": NaN}',
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422


# --------------------------------------------------------------------------- access control


def test_token_required_everywhere(atlas_dir):
    app = create_app(atlas_dir, token=TOKEN)
    with TestClient(app, base_url="http://atlas.example:8000") as c:  # any host once a token is set
        for path in ("/", "/static/app.js", "/api/run", "/api/saes", "/eval.png", "/api/search?q=x"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"] == "Bearer"
        assert post(c, "/api/inspect", {"text": "the king"}).status_code == 401
        assert c.get("/api/run", headers={"Authorization": "Bearer wrong-token-xyz"}).status_code == 401
        assert c.get("/api/run", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert c.get("/api/run", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
        assert c.get("/", cookies={"saescope_token": "nope-nope-nope"}).status_code == 401


def test_query_token_sets_cookie(atlas_dir):
    app = create_app(atlas_dir, token=TOKEN)
    with TestClient(app, base_url=BASE, follow_redirects=False) as c:
        r = c.get(f"/?token={TOKEN}")
        assert r.status_code == 303 and r.headers["location"] == "/"  # the token leaves the address bar
        cookie = r.headers["set-cookie"]
        assert "saescope_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert c.get("/").status_code == 200  # the cookie now authorises pages ...
        assert c.get("/api/run").status_code == 200  # ... and the API
        assert post(c, "/api/inspect", {"text": "the king", "top": 1}).status_code == 200
        c.cookies.clear()
        assert c.get("/api/run").status_code == 401
        assert c.get("/api/run?token=wrong-token-xyz").status_code == 401
        assert c.get(f"/api/run?token={TOKEN}").status_code == 200


def test_short_token_and_public_bind_refused(atlas_dir):
    from saescope.server.app import serve

    with pytest.raises(SaescopeError, match="at least 8"):
        create_app(atlas_dir, token="abc")
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        with pytest.raises(SaescopeError, match="--token"):
            serve(atlas_dir, host=host, port=8123)


def test_foreign_host_and_cross_origin_refused(app):
    with TestClient(app, base_url="http://evil.example:8000") as c:  # DNS rebinding
        r = c.get("/api/run")
        assert r.status_code == 400 and "not served" in detail(r)
    with TestClient(app, base_url="http://localhost:8000") as c:
        assert c.get("/api/run").status_code == 200
        r = post(c, "/api/inspect", {"text": "the king"}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = post(c, "/api/inspect", {"text": "the king"}, headers={"Origin": "null"})
        assert r.status_code == 403
        r = post(c, "/api/inspect", {"text": "the king", "top": 1}, headers={"Origin": "http://localhost:8000"})
        assert r.status_code == 200


def test_cli_serve(atlas_dir, monkeypatch):
    from click.testing import CliRunner

    import saescope.server.app as server_app
    from saescope.cli import cli

    calls = []
    monkeypatch.setattr(server_app, "serve", lambda *a, **kw: calls.append((a, kw)))
    res = CliRunner().invoke(cli, ["serve", str(atlas_dir), "--port", "8765"])
    assert res.exit_code == 0, res.output
    assert "http://127.0.0.1:8765/" in res.output
    assert calls == [((str(atlas_dir),), {"host": "127.0.0.1", "port": 8765, "token": None})]
    res = CliRunner().invoke(cli, ["serve", str(atlas_dir), "--host", "0.0.0.0"])
    assert res.exit_code != 0 and isinstance(res.exception, SaescopeError)
    res = CliRunner().invoke(cli, ["serve", str(atlas_dir), "--host", "0.0.0.0", "--token", TOKEN])
    assert res.exit_code == 0 and f"?token={TOKEN}" in res.output
    assert calls[-1][1]["host"] == "0.0.0.0"


def test_cli_feature_shows_similar_features(atlas_dir, fired):
    from click.testing import CliRunner

    from saescope.cli import cli
    from saescope.scope import Scope

    sae_id, idx = fired
    res = CliRunner().invoke(cli, ["feature", str(atlas_dir), sae_id, str(idx)])
    assert res.exit_code == 0, res.output
    with Scope.open(atlas_dir) as scope:
        groups = scope.similar(sae_id, idx, k=5)
    for g in groups:
        line = next(x for x in res.output.splitlines() if x.startswith(f"similar in layer {g['layer']} "))
        assert [int(m) for m in re.findall(r"#(\d+) -?\d\.\d\d", line)] == [f["idx"] for f in g["features"]]
    card = json.loads(CliRunner().invoke(cli, ["feature", str(atlas_dir), sae_id, str(idx), "--json"]).output)
    assert card["similar"] == groups
