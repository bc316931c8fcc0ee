"""`saescope import --overwrite` onto an analysed, evaluated and labelled SAE, end to end on a tiny run.

Everything computed from the old weights must be marked not done (analysis, eval, automatic labels
and their scores) and redone by the next analyze / eval / label auto; human labels are kept and
shown as written for the old weights (CLI card, --json, web API) until someone labels again.
"""

from __future__ import annotations

import json

import pytest
import torch
from atlas_run import write_corpus

from saescope.cli import main
from saescope.evaluate import evaluate
from saescope.featuredb import FeatureDB
from saescope.label.offline import label_offline
from saescope.models import load_model
from saescope.pipeline import train_run
from saescope.runs import Run
from saescope.train import TrainConfig

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from saescope.server.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir), device="cpu")


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([*map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def _labelled_run(tmp_path, model_dir, lm) -> tuple[Run, str, str, int]:
    """Two SAEs (layers 0 and 1), evaluated, analysed, labelled offline, one human label on layer 0."""
    from saescope.analyze import analyze

    corpus = write_corpus(tmp_path / "corpus", n_docs=60)
    run = train_run(tmp_path / "run", model=str(model_dir), corpus=str(corpus), layers="0,1", widths=(16,),
                    l0s=(4,), architecture="topk", train=TrainConfig(tokens=600, batch_size=100), ctx_len=32,
                    lm=lm, progress=False)
    with run.stage("eval"):
        evaluate(run, eval_tokens=300, ce_tokens=64, other=None, progress=False)
    with run.stage("analyze"):
        analyze(run, n_tokens=600, progress=False, lm=lm)
    with run.stage("label"):
        label_offline(run, progress=False, workers=1)
    replaced, kept = run.sae_ids()
    with run.db() as db:
        idx = db.top_features(replaced, limit=1)[0]["idx"]
        db.set_label(replaced, idx, "zebras and giraffes", author="ana")
    return run, replaced, kept, idx


def _new_weights(run, sae_id, dest):
    """The same SAE (site, layer, width, L0) with other weights, as a saescope folder."""
    sae = run.load_sae(sae_id)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        sae.w_enc.copy_(torch.randn(sae.w_enc.shape, generator=g))
    return sae.save(dest)


def test_overwrite_marks_everything_downstream_and_keeps_human_labels_flagged(
        tmp_path, tiny_gemma_dir, tiny_lm, capsys, monkeypatch):
    monkeypatch.setattr(Run, "model", property(lambda self: tiny_lm))
    run, replaced, kept, idx = _labelled_run(tmp_path, tiny_gemma_dir, tiny_lm)
    with run.db() as db:
        old_stats = [f["frequency"] for f in db.top_features(replaced, order_by="idx", limit=100)]
        kept_rows = db.top_features(kept, order_by="idx", limit=100)
        old_offline = {lab["id"] for lab in db.current_labels("offline") if lab["sae_id"] == replaced}
    assert old_offline and all(run.is_done(s) for s in ("train", "eval", "analyze", "label"))

    code, out, err = _cli(capsys, "import", _new_weights(run, replaced, tmp_path / "new"), "--run", run.root,
                          "--overwrite")
    assert code == 0, err
    assert f"imported {replaced}" in out and "marked not done" in out

    # every downstream stage of that SAE is not done any more
    run = Run.open(run.root)
    assert [run.status(s) for s in ("train", "eval", "analyze", "label")] == ["done", "pending", "pending", "pending"]
    result = json.loads((run.root / "eval.json").read_text())
    assert list(result["saes"]) == [kept] and result["replaced"] == [replaced]
    with run.db(readonly=True) as db:
        assert db.sae_status(replaced) == "pending" and db.sae_status(kept) == "done"
        assert db.feature(replaced, idx) is None and db.top_features(replaced) == []
        assert db.top_features(kept, order_by="idx", limit=100) == kept_rows
        human = db.labels(replaced, idx)[0]
        assert human["text"] == "zebras and giraffes" and human["stale"] and human["source"] == "human"
        assert all(lab["stale"] for lab in db.current_labels() if lab["sae_id"] == replaced)
        assert not any(lab["stale"] for lab in db.current_labels() if lab["sae_id"] == kept)
    code, _, err = _cli(capsys, "feature", run.root, replaced, idx)
    assert code == 1 and "has not been analysed" in err and err.count("\n") == 1

    # analyze redoes that SAE only, with the new weights
    code, out, err = _cli(capsys, "analyze", run.root, "--tokens", 600)
    assert code == 0 and "analysed 1 SAEs" in out and "1 already done" in out, out + err
    with run.db(readonly=True) as db:
        new_stats = [f["frequency"] for f in db.top_features(replaced, order_by="idx", limit=100)]
    assert len(new_stats) == 16 and new_stats != old_stats

    # the card shows the human label as written for the old weights: text, --json and the web API
    code, out, _ = _cli(capsys, "feature", run.root, replaced, idx)
    assert code == 0 and "label (human, STALE: written for the SAE's old weights): zebras and giraffes" in out
    code, out, _ = _cli(capsys, "feature", run.root, replaced, idx, "--json")
    card = json.loads(out)
    assert [(lab["source"], lab["stale"]) for lab in card["labels"]] == [("human", True), ("offline", True)]
    with TestClient(create_app(run.root), base_url="http://127.0.0.1") as client:
        page = client.get(f"/api/feature/{replaced}/{idx}").json()
        assert {lab["source"]: lab["stale"] for lab in page["labels"]} == {"human": True, "offline": True}
        assert any(lab["stale"] for lab in page["label_history"])
        hits = client.get("/api/search", params={"q": "zebras", "mode": "fts"}).json()["hits"]
        assert [(h["sae_id"], h["stale"]) for h in hits] == [(replaced, True)]
    code, out, _ = _cli(capsys, "search", run.root, "zebras", "--mode", "fts")
    assert code == 0 and "zebras and giraffes" in out and "(written for the SAE's old weights)" in out
    code, out, _ = _cli(capsys, "inspect", run.root, "the king of france was in paris", "--json")
    shown = {layer["sae_id"]: [f["label"] for per_token in layer["features"] for f in per_token if f["label"]]
             for layer in json.loads(out)["layers"]}
    assert shown[replaced] and all(text.endswith(" (written for old weights)") for text in shown[replaced])
    assert shown[kept] and not any("old weights" in text for text in shown[kept])

    # label auto redoes the automatic labels and their scores; the human label stays flagged
    code, out, err = _cli(capsys, "label", "auto", run.root, "--sae", replaced)
    assert code == 0, err
    with run.db(readonly=True) as db:
        offline = [lab for lab in db.current_labels("offline") if lab["sae_id"] == replaced]
        assert offline and not any(lab["stale"] for lab in offline)
        assert not {lab["id"] for lab in offline} & old_offline
        assert any(db.scores(lab["id"]) for lab in offline)  # the new labels are scored again
        assert [lab["stale"] for lab in db.labels(replaced, idx) if lab["source"] == "human"] == [True]
    # labelling it again (even with the same words) clears the flag and keeps the history
    code, _, _ = _cli(capsys, "label", "set", run.root, replaced, idx, "zebras and giraffes")
    assert code == 0
    with run.db(readonly=True) as db:
        human = [lab for lab in db.labels(replaced, idx, history=True) if lab["source"] == "human"]
        assert [(lab["is_current"], lab["stale"]) for lab in human] == [(True, False), (False, True)]

    # eval puts the SAE back into eval.json
    code, _, err = _cli(capsys, "eval", run.root, "--tokens", 300, "--ce-tokens", 64, "--other", "none")
    assert code == 0, err
    result = json.loads((run.root / "eval.json").read_text())
    assert sorted(result["saes"]) == sorted([replaced, kept]) and "replaced" not in result


def test_overwrite_before_any_analysis_creates_no_database(tmp_path, tiny_gemma_dir, tiny_lm):
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    run = train_run(tmp_path / "run", model=str(tiny_gemma_dir), corpus=str(corpus), layers="0", widths=(16,),
                    l0s=(4,), architecture="topk", train=TrainConfig(tokens=200, batch_size=100), ctx_len=32,
                    lm=tiny_lm, progress=False)
    from saescope.interop import import_sae

    (sae_id,) = run.sae_ids()
    res = import_sae(_new_weights(run, sae_id, tmp_path / "new"), run.root, model=tiny_lm, overwrite=True)
    assert res.sae_id == sae_id and not run.db_path.exists()
    assert Run.open(run.root).status("analyze") == "pending"


def test_weights_replaced_in_the_database(tmp_path):
    sae = "resid_post/layer_0_width_8_l0_2"
    with FeatureDB.open(tmp_path / "features.sqlite") as db:
        assert db.weights_replaced(sae) is None  # unknown SAE: nothing to clear
        db.upsert_sae(sae, site="resid_post", layer=0, width=8, d_in=4, hook_name="h", path="p", config={})
        first = db.set_label(sae, 3, "cities")
        llm = db.set_label(sae, 3, "towns", source="llm", model="m")
        db.add_score(llm, "detection-llm", 0.8)
        assert db.weights_replaced(sae) == 2 and db.weights_replaced(sae) == 3
        labels = db.labels(sae, 3)
        assert {lab["id"] for lab in labels} == {first, llm}
        assert all(lab["stale"] and lab["weights_version"] == 1 for lab in labels)
        assert db.scores(llm)[0]["value"] == 0.8  # kept, with its (stale) label
        assert [h["stale"] for h in db.search_fts("cities")] == [True]
        again = db.set_label(sae, 3, "cities")
        assert again != first and db.set_label(sae, 3, "cities") == again
        fresh = db.labels(sae, 3)[0]
        assert fresh["id"] == again and not fresh["stale"] and fresh["weights_version"] == 3
        assert db.labels(sae, 3, history=True)[-1]["stale"]


def test_saescope_run_redoes_the_stages_of_an_overwritten_sae(tmp_path, tiny_gemma_dir, tiny_lm):
    from saescope.interop import import_sae
    from saescope.pipeline import run_all

    corpus = write_corpus(tmp_path / "corpus")
    kw = dict(model=str(tiny_gemma_dir), corpus=str(corpus), layers="0,1", widths=(16,), l0s=(4,),
              architecture="topk", tokens=400, eval_tokens=200, ce_tokens=64, analyze_tokens=400)
    run = run_all(tmp_path / "run", echo=lambda line: None, **kw)
    replaced, kept = run.sae_ids()
    with run.db() as db:
        idx = db.top_features(replaced, limit=1)[0]["idx"]
        db.set_label(replaced, idx, "zebras and giraffes")
    import_sae(_new_weights(run, replaced, tmp_path / "new"), run.root, model=tiny_lm, overwrite=True)
    logs: list[str] = []
    run = run_all(tmp_path / "run", echo=logs.append, **kw)
    for stage in ("eval", "analyze", "label"):
        assert any(line.startswith(f"[{stage}] done") for line in logs), logs
        assert run.is_done(stage)
    assert sorted(json.loads((run.root / "eval.json").read_text())["saes"]) == sorted([replaced, kept])
    with run.db(readonly=True) as db:
        assert db.sae_status(replaced) == "done" and db.top_features(replaced)
        current = {(lab["source"], lab["stale"]) for lab in db.labels(replaced, idx)}
        assert ("human", True) in current and ("offline", False) in current
