"""Interop: SAELens / sparsify / Gemma Scope readers, hook names, import into a run, exports, hostile files.

Files in other tools' layouts are written by hand here from their documented layouts, and their
forward passes are written out from their documented equations (float64, unfolded), so every
reader is checked against an independent reference rather than against itself.
"""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saescope.errors import SaescopeError
from saescope.featuredb import Example, FeatureDB, FeatureStats
from saescope.formats import find_sae_folders, read_sae_folder
from saescope.formats.hooks import parse_hook_name
from saescope.formats.saelens import read_saelens, write_saelens
from saescope.interop import export_run, import_sae
from saescope.runs import Run
from saescope.sae import SAE, SAEConfig

D, W = 16, 64


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _x(n=32, d=D, seed=1):
    return torch.randn(n, d, generator=_g(seed)) * 2


# ---------------------------------------------------------------------------- reference maths


def saelens_forward(folder, x):
    """SAELens inference (sae-lens 6.x, documented equations), in float64 without any folding."""
    d = json.loads((folder / "cfg.json").read_text())
    p = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x.double()
    xt = x - p["b_dec"] if d.get("apply_b_dec_to_input", True) else x
    arch = d.get("architecture", "standard")
    if arch == "standard" and d.get("activation_fn") == "topk":
        arch, d["k"] = "topk", d["activation_fn_kwargs"]["k"]
    if arch == "gated":
        gate = (xt @ p["W_enc"] + p["b_gate"]) > 0
        f = gate * (xt @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]).relu()
    else:
        z = xt @ p["W_enc"] + p["b_enc"]
        if arch == "standard":
            f = z.relu()
        elif arch == "jumprelu":
            theta = p["threshold"] if "threshold" in p else p["log_threshold"].exp()
            f = z.relu() * (z > theta)
        elif arch == "topk":
            norm = p["W_dec"].norm(dim=-1) if d.get("rescale_acts_by_decoder_norm") else torch.ones(z.shape[-1])
            vals, idx = (z * norm).topk(int(d["k"]), dim=-1)
            f = torch.zeros_like(z).scatter(-1, idx, vals.relu()) / norm
        else:
            raise AssertionError(arch)
    if "scaling_factor" in p:
        f = f * p["scaling_factor"]
    return f @ p["W_dec"] + p["b_dec"]


def sparsify_forward(folder, x):
    """sparsify SparseCoder.forward: ReLU, top-k of (x − b_dec) @ encoder.weightᵀ + bias, then W_dec + b_dec."""
    p = {k: v.double() for k, v in load_file(str(folder / "sae.safetensors")).items()}
    k = json.loads((folder / "cfg.json").read_text())["k"]
    z = ((x.double() - p["b_dec"]) @ p["encoder.weight"].T + p["encoder.bias"]).relu()
    vals, idx = z.topk(k, dim=-1)
    return torch.zeros_like(z).scatter(-1, idx, vals) @ p["W_dec"] + p["b_dec"]


def close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- writing files by hand


def saelens_folder(path, arch="jumprelu", *, apply_b_dec=True, d=D, w=W, seed=0, cfg_extra=None, hook=None,
                   tensors_extra=None, drop=()):
    g = _g(seed)
    t = {"W_enc": torch.randn(d, w, generator=g) / d**0.5, "W_dec": torch.randn(w, d, generator=g) / d**0.5,
         "b_enc": torch.randn(w, generator=g) * 0.2, "b_dec": torch.randn(d, generator=g) * 0.3}
    cfg = {"architecture": arch, "d_in": d, "d_sae": w, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "model_name": "gemma-3-270m",
                        "hook_name": hook or "blocks.1.hook_resid_post", "hook_head_index": None}}
    if arch == "jumprelu":
        t["threshold"] = torch.rand(w, generator=g) * 0.3
    if arch == "topk":
        cfg["k"] = 8
    if arch == "gated":
        del t["b_enc"]
        t.update(b_gate=torch.randn(w, generator=g) * 0.2, b_mag=torch.randn(w, generator=g) * 0.2,
                 r_mag=torch.randn(w, generator=g) * 0.3)
    t.update(tensors_extra or {})
    for name in drop:
        t.pop(name)
    cfg.update(cfg_extra or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def sparsify_folder(path, *, d=D, w=W, k=8, seed=0, cfg_extra=None, tensors_extra=None):
    g = _g(seed)
    t = {"encoder.weight": torch.randn(w, d, generator=g) / d**0.5, "encoder.bias": torch.randn(w, generator=g) * 0.2,
         "W_dec": torch.randn(w, d, generator=g) / d**0.5, "b_dec": torch.randn(d, generator=g) * 0.3}
    t.update(tensors_extra or {})
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": w, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d, **(cfg_extra or {})}
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def our_sae(arch="jump_relu", d=D, w=W, seed=0, site="resid_post", layer=1):
    g = _g(seed)
    sae = SAE.init(SAEConfig(d_in=d, width=w, architecture=arch, l0=8, site=site, layer=layer,
                             hf_hook_point_in=f"model.layers.{layer}.output", model_name="tiny"), g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2, generator=g)
        sae.b_dec.normal_(0, 0.3, generator=g)
        sae.threshold.uniform_(0.05, 0.3, generator=g)
    return sae


# ---------------------------------------------------------------------------- hook names


@pytest.mark.parametrize("name, site, layer", [
    ("blocks.4.hook_resid_post", "resid_post", 4),
    ("blocks.4.hook_resid_pre", "resid_post", 3),
    ("blocks.0.hook_resid_pre", "", 0),
    ("blocks.4.attn.hook_z", "attn_out", 4),
    ("blocks.4.hook_mlp_out", "mlp_out", 4),
    ("blocks.4.hook_attn_out", "", 4),  # after o_proj: not a saescope site
    ("model.layers.5.output", "resid_post", 5),
    ("model.layers.5.self_attn.o_proj.input", "attn_out", 5),
    ("model.layers.5.post_feedforward_layernorm.output", "mlp_out", 5),
    ("model.layers.5.pre_feedforward_layernorm.output", "mlp_in", 5),
    ("layers.6", "resid_post", 6),
    ("layers.6.mlp", "mlp_out", 6),
    ("gpt_neox.layers.2", "resid_post", 2),
    ("transformer.h.1.mlp", "mlp_out", 1),
    ("model.layers.5.self_attn", "", 5),
])
def test_hook_name_mapping(name, site, layer):
    ref = parse_hook_name(name)
    assert (ref.site, ref.layer) == (site, layer)


def test_model_names_compare_across_tools():
    from saescope.interop import _model_key

    for name in ("google/gemma-3-270m-pt", "/root/.cache/saescope/models/gemma-3-270m-4018d93daa", "gemma-3-270m",
                 "gemma-3-270m.gguf"):
        assert _model_key(name) == "gemma-3-270m", name


def test_hook_name_details():
    assert parse_hook_name("embed_tokens") is None
    assert parse_hook_name("") is None
    assert parse_hook_name("layers.6.mlp").hf_name == "layers.6.mlp.output"
    assert parse_hook_name("layers.6.mlp", transcode=True).site == "mlp_in"
    assert parse_hook_name("blocks.3.hook_resid_post").hf_name == ""


# ---------------------------------------------------------------------------- SAELens


@pytest.mark.parametrize("arch, extra", [
    ("standard", {}), ("jumprelu", {}), ("topk", {}), ("gated", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_read_matches_saelens_maths(tmp_path, arch, extra, apply_b_dec):
    folder = saelens_folder(tmp_path / "sae", arch, apply_b_dec=apply_b_dec, cfg_extra=extra)
    sae = read_sae_folder(folder)
    x = _x()
    close(sae(x).x_hat, saelens_forward(folder, x))
    assert not sae.cfg.pre_bias  # folded into b_enc
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.model_name) == ("resid_post", 1, "gemma-3-270m")
    assert sae.cfg.architecture == {"standard": "relu", "jumprelu": "jump_relu", "gated": "jump_relu",
                                    "topk": "topk"}[arch]
    assert sae.cfg.extra["source_format"] == "saelens"
    if arch == "gated":  # the JumpReLU equivalent really switches features off
        assert 0 < (sae.encode(x) > 0).float().mean() < 1


def test_saelens_jumprelu_variants(tmp_path):
    x = _x()
    # log_threshold (older checkpoints) and negative thresholds (ReLU still applies in SAELens)
    g = _g(5)
    logt = saelens_folder(tmp_path / "log", "jumprelu", drop=("threshold",),
                          tensors_extra={"log_threshold": torch.randn(W, generator=g) - 2})
    close(read_sae_folder(logt)(x).x_hat, saelens_forward(logt, x))
    neg = saelens_folder(tmp_path / "neg", "jumprelu", tensors_extra={"threshold": torch.randn(W, generator=g)})
    close(read_sae_folder(neg)(x).x_hat, saelens_forward(neg, x))
    # old finetuning scaling factor: features scaled before decoding
    sf = saelens_folder(tmp_path / "sf", "standard", tensors_extra={"scaling_factor": torch.rand(W, generator=g) + 0.5})
    close(read_sae_folder(sf)(x).x_hat, saelens_forward(sf, x))
    # BatchTopK: SAELens saves it as JumpReLU with one threshold; a 'batchtopk' config with it reads too
    bt = saelens_folder(tmp_path / "bt", "jumprelu", tensors_extra={"threshold": torch.full((W,), 0.1)},
                        cfg_extra={"architecture": "batchtopk", "k": 12})
    sae = read_sae_folder(bt)
    assert (sae.cfg.architecture, sae.cfg.l0) == ("batchtopk", 12.0)
    ref = saelens_folder(tmp_path / "bt_ref", "jumprelu", tensors_extra={"threshold": torch.full((W,), 0.1)})
    close(sae(x).x_hat, saelens_forward(ref, x))


def test_saelens_pre_6_config(tmp_path):
    folder = saelens_folder(tmp_path / "old", "standard", cfg_extra={
        "activation_fn": "topk", "activation_fn_kwargs": {"k": 5}, "hook_point": "blocks.3.hook_mlp_out",
        "model_name": "gpt2-small", "metadata": None})
    sae = read_sae_folder(folder)
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.site, sae.cfg.layer) == ("topk", 5, "mlp_out", 3)
    close(sae(_x()).x_hat, saelens_forward(folder, _x()))


@pytest.mark.parametrize("arch", ["jump_relu", "relu", "topk", "batchtopk"])
def test_saelens_export_round_trip_exact(tmp_path, arch):
    sae = our_sae(arch)
    folder = write_saelens(sae, tmp_path / "out")
    x = _x()
    close(saelens_forward(folder, x), sae(x).x_hat)  # SAELens' maths on our file = our SAE
    back = read_saelens(folder)
    for n in ("w_enc", "b_enc", "w_dec", "b_dec"):
        assert torch.equal(getattr(back, n), getattr(sae, n)), n  # bit-exact both ways
    if arch in ("jump_relu", "batchtopk"):
        assert torch.equal(back.threshold, sae.threshold)
    assert torch.equal(back(x).x_hat, sae(x).x_hat)
    assert (back.cfg.site, back.cfg.layer, back.cfg.hf_hook_point_in) == ("resid_post", 1, "model.layers.1.output")
    assert (back.cfg.architecture, back.cfg.l0) == (arch, 8.0)  # kept in SAELens metadata["saescope"]
    assert "l0_nominal" not in back.cfg.extra
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert set(load_file(str(folder / "sae_weights.safetensors"))) == (
        {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if arch in ("jump_relu", "batchtopk") else set()))


def test_saelens_export_refuses_negative_thresholds(tmp_path):
    sae = our_sae()
    with torch.no_grad():
        sae.threshold[3] = -0.1
    with pytest.raises(SaescopeError, match="negative thresholds"):
        write_saelens(sae, tmp_path / "o")


@pytest.mark.parametrize("cfg_extra, tensors, match", [
    ({"normalize_activations": "layer_norm"}, {}, "normalises each token"),
    ({"normalize_activations": "expected_average_only_in"}, {}, "scaling factor"),
    ({"architecture": "transcoder"}, {}, "not supported"),
    ({"metadata": {"hook_name": "blocks.1.attn.hook_z", "hook_head_index": 2}}, {}, "single attention head"),
    ({}, {"W_skip": torch.zeros(D, D)}, "W_skip"),
    ({"architecture": "topk"}, {}, "positive 'k'"),
])
def test_saelens_refusals(tmp_path, cfg_extra, tensors, match):
    folder = saelens_folder(tmp_path / "s", "standard", cfg_extra=cfg_extra, tensors_extra=tensors)
    if cfg_extra.get("architecture") == "topk":
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg.pop("k", None)
        (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaescopeError, match=match):
        read_sae_folder(folder)


# ---------------------------------------------------------------------------- sparsify


def test_sparsify_read_matches_sparsify_maths(tmp_path):
    folder = sparsify_folder(tmp_path / "layers.3")
    sae = read_sae_folder(folder)
    x = _x()
    close(sae(x).x_hat, sparsify_forward(folder, x))
    c = sae.cfg
    assert (c.architecture, c.k, c.site, c.layer, c.hf_hook_point_in) == ("topk", 8, "resid_post", 3,
                                                                           "layers.3.output")
    assert not c.pre_bias and c.extra["source_format"] == "sparsify"


def test_sparsify_run_layout_one_folder_per_hookpoint(tmp_path):
    run = tmp_path / "sparsify-run"
    for i, hp in enumerate(["layers.0", "layers.1", "layers.1.mlp"]):
        sparsify_folder(run / hp, seed=i)
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "hookpoints": []}))
    assert [p.name for p in find_sae_folders(run)] == ["layers.0", "layers.1", "layers.1.mlp"]
    with pytest.raises(SaescopeError, match="holds 3 SAE folders"):
        read_sae_folder(run)
    sae = read_sae_folder(run / "layers.1.mlp")
    assert (sae.cfg.site, sae.cfg.layer, sae.cfg.model_name) == ("mlp_out", 1, "EleutherAI/pythia-70m")


def test_sparsify_trainer_folder_with_state_pickles_points_to_its_sae_folders(tmp_path):
    """sparsify's Trainer saves optimizer_0.pt, state.pt and rank_0_state.pt beside the hookpoint folders:
    the error names the SAE folders (which can be imported), not the pickles; no pickle is ever opened."""
    run = tmp_path / "checkpoints" / "unnamed"
    for i, hp in enumerate(["layers.0", "layers.1"]):
        sparsify_folder(run / hp, seed=i)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("optimizer_0.pt", "state.pt", "rank_0_state.pt"):
        torch.save({"x": Evil()}, run / name)
    (run / "config.json").write_text(json.dumps({"sae": {"k": 8}, "hookpoints": ["layers.0", "layers.1"]}))
    with pytest.raises(SaescopeError, match=r"holds 2 SAE folders, not one: give one of them \(layers.0, layers.1\)"):
        read_sae_folder(run)
    assert read_sae_folder(run / "layers.1").cfg.layer == 1
    assert not marker.exists()


@pytest.mark.parametrize("cfg_extra, tensors, match", [
    ({"transcode": True}, {}, "transcoder"),
    ({"skip_connection": True}, {"W_skip": torch.zeros(D, D)}, "skip"),
    ({}, {"W_skip": torch.zeros(D, D)}, "W_skip"),
    ({"activation": "groupmax"}, {}, "groupmax"),
    ({"k": W}, {}, "integer 'k'"),
    ({"d_in": D + 1}, {}, "d_in"),
])
def test_sparsify_refusals(tmp_path, cfg_extra, tensors, match):
    folder = sparsify_folder(tmp_path / "layers.2", cfg_extra=cfg_extra, tensors_extra=tensors)
    with pytest.raises(SaescopeError, match=match):
        read_sae_folder(folder)


# ---------------------------------------------------------------------------- Gemma Scope 1 / 2


def test_gemma_scope_2_hook_point_gives_site_and_layer(tmp_path):
    sae = our_sae()
    t = {n: getattr(sae, n).detach() for n in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")}
    for hook, site, layer in [("model.layers.5.output", "resid_post", 5),
                              ("model.layers.7.self_attn.o_proj.input", "attn_out", 7),
                              ("model.layers.2.post_feedforward_layernorm.output", "mlp_out", 2)]:
        folder = tmp_path / f"gs2_{layer}"
        folder.mkdir()
        save_file(t, str(folder / "params.safetensors"))
        (folder / "config.json").write_text(json.dumps({"hf_hook_point_in": hook, "width": W, "l0": 20,
                                                        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
                                                        "type": "sae"}))
        got = read_sae_folder(folder)
        assert (got.cfg.site, got.cfg.layer, got.cfg.l0) == (site, layer, 20.0)
        assert torch.equal(got(_x()).x_hat, sae(_x()).x_hat)
    # a skip transcoder cannot run as an SAE: refused, not silently dropped
    save_file({**t, "affine_skip_connection": torch.zeros(D, D)}, str(tmp_path / "gs2_5" / "params.safetensors"))
    with pytest.raises(SaescopeError, match="affine_skip_connection"):
        read_sae_folder(tmp_path / "gs2_5")


def test_gemma_scope_1_npz_site_from_release_path(tmp_path):
    sae = our_sae()
    folder = tmp_path / "gemma-scope-2b-pt-att" / "layer_12" / "width_16k" / "average_l0_20"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{n: getattr(sae, n).detach().numpy() for n in
                                       ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")})
    got = read_sae_folder(folder)
    assert (got.cfg.site, got.cfg.layer, got.cfg.l0) == ("attn_out", 12, 20.0)
    assert torch.equal(got(_x()).x_hat, sae(_x()).x_hat)


# ---------------------------------------------------------------------------- import into a run


@pytest.fixture(scope="module")
def tiny_lm(tiny_gemma_dir):
    from saescope.models import load_model

    return load_model(str(tiny_gemma_dir), device="cpu")


@pytest.fixture
def run(tmp_path, tiny_gemma_dir):
    return Run.create(tmp_path / "run", model=str(tiny_gemma_dir), corpus={}, config={})


def test_import_saelens_into_run(tmp_path, run, tiny_lm):
    d = tiny_lm.site("resid_post", 1).width
    src = saelens_folder(tmp_path / "sl", "jumprelu", d=d, hook="blocks.1.hook_resid_post")
    res = import_sae(src, run.root, model=tiny_lm)
    assert res.sae_id == f"resid_post/layer_1_width_{W}_l0_32" and res.sae_id in run.sae_ids()
    assert any("TransformerLens" in n for n in res.notes) and any("L0" in n for n in res.notes)
    loaded = run.load_sae(res.sae_id)
    x = _x(d=d)
    close(loaded(x).x_hat, saelens_forward(src, x))
    c = loaded.cfg
    assert c.hf_hook_point_in == tiny_lm.site("resid_post", 1).hook_name == "model.layers.1.output"
    assert c.model_name == run.manifest["model"] and not c.pre_bias
    assert c.extra["imported_from"]["format"] == "saelens"
    assert c.extra["imported_from"]["hook_name"] == "blocks.1.hook_resid_post"
    with pytest.raises(SaescopeError, match="already exists"):
        import_sae(src, run.root, model=tiny_lm)
    assert import_sae(src, run.root, model=tiny_lm, name="mine").sae_id == "resid_post/mine"


def test_import_sparsify_and_gs2_into_run(tmp_path, run, tiny_lm):
    d = tiny_lm.site("mlp_out", 2).width
    gs = tiny_lm.site("mlp_out", 2).hook_name
    res = import_sae(sparsify_folder(tmp_path / "layers.0", d=d), run.root, model=tiny_lm)
    assert res.sae_id == f"resid_post/layer_0_width_{W}_l0_8"
    sae = our_sae(d=d, site="", layer=-1)
    folder = tmp_path / "gs2"
    sae.save(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(hf_hook_point_in=gs, site="", layer=-1)
    (folder / "config.json").write_text(json.dumps(cfg))
    res = import_sae(folder, run.root, model=tiny_lm)
    assert res.sae_id.startswith("mlp_out/layer_2_")


def test_import_refuses_misfits(tmp_path, run, tiny_lm):
    d = tiny_lm.d_model
    with pytest.raises(SaescopeError, match="16-wide activations .* another model"):
        import_sae(saelens_folder(tmp_path / "narrow", d=16), run.root, model=tiny_lm)
    # Gemma's mlp_out is the post-MLP norm's output, not the MLP's: a sparsify 'layers.1.mlp' SAE differs
    with pytest.raises(SaescopeError, match="different activations"):
        import_sae(sparsify_folder(tmp_path / "layers.1.mlp", d=d), run.root, model=tiny_lm)
    with pytest.raises(SaescopeError, match="cannot tell which saescope site"):
        import_sae(saelens_folder(tmp_path / "ao", d=d, hook="blocks.1.hook_attn_out"), run.root, model=tiny_lm)
    with pytest.raises(SaescopeError, match="layer 9 does not exist"):
        import_sae(saelens_folder(tmp_path / "deep", d=d, hook="blocks.9.hook_resid_post"), run.root, model=tiny_lm)
    with pytest.raises(SaescopeError, match="not a saescope run"):
        import_sae(saelens_folder(tmp_path / "ok", d=d), tmp_path, model=tiny_lm)
    assert run.sae_ids() == []


# ---------------------------------------------------------------------------- exports


def _run_with_saes(run, d):
    saes = {}
    for layer, arch in [(0, "jump_relu"), (1, "topk")]:
        sae = our_sae(arch, d=d, layer=layer, seed=layer)
        sae.save(run.saes_dir / "resid_post" / sae.cfg.folder_name)
        saes[f"resid_post/{sae.cfg.folder_name}"] = sae
    return saes


def test_export_saelens_from_run(tmp_path, run):
    saes = _run_with_saes(run, D)
    report = export_run(run.root, "saelens", tmp_path / "out")
    assert [s["sae_id"] for s in report["saes"]] == sorted(saes) and "6.54.12" in report["version"]
    for sae_id, sae in saes.items():
        folder = tmp_path / "out" / sae_id
        close(saelens_forward(folder, _x()), sae(_x()).x_hat)
        assert json.loads((folder / "cfg.json").read_text())["metadata"]["model_name"] == "tiny"
    assert json.loads((tmp_path / "out" / "saescope-export.json").read_text())["format"] == "saelens"
    with pytest.raises(SaescopeError, match="unknown export format 'onnx'.*saelens or neuronpedia"):
        export_run(run.root, "onnx", tmp_path / "x")


def _fill_db(run, sae_id, width):
    with FeatureDB.open(run.db_path) as db:
        db.set_vocab(["<pad>", "<eos>", "<bos>", "Paris", " is", " in", " France"])
        db.upsert_sae(sae_id, site="resid_post", layer=0, width=width, d_in=D, hook_name="model.layers.0.output",
                      path=f"saes/{sae_id}", config={})
        db.begin_sae(sae_id)
        db.write_features(sae_id, [FeatureStats(sae_id, i, frequency=0.01 * (i + 1), n_fired=i + 1,
                                                max_act=2.0 + i, mean_act=1.0,
                                                hist={"edges": [0.0, 1.0, 2.0], "counts": [5, i]},
                                                logits_pos=[[" France", 1.5]], logits_neg=[[" is", -0.5]])
                                   for i in range(3)])
        db.write_examples(sae_id, [Example(sae_id, 1, "top", 0, None, 3.0, [2, 3, 4, 5, 6],
                                           [0.0, 3.0, 0.5, 0.0, 1.0], ctx=7, pos=1),
                                   Example(sae_id, 1, "quantile", 0, 2, 1.0, [3, 99], [0.2, 1.0], ctx=9, pos=1)])
        db.finish_sae(sae_id, 1000)
        db.set_label(sae_id, 1, "the city Paris", source="human", author="ana")
        db.set_label(sae_id, 1, "capital cities", source="llm", model="gpt-4o-mini")


def _gz_rows(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_export_neuronpedia_shape(tmp_path, run):
    saes = _run_with_saes(run, D)
    done, not_done = sorted(saes)
    _fill_db(run, done, W)
    report = export_run(run.root, "neuronpedia", tmp_path / "np", model_id="Tiny Gemma", creator_id="user1")
    assert report["model_id"] == "tiny-gemma" and report["version"] == "neuronpedia-export-v1"
    e = {s["sae_id"]: s for s in report["saes"]}
    assert (e[done]["features"], e[done]["activations"], e[done]["explanations"]) == (3, 2, 2)
    assert e[not_done]["features"] == 0 and any("not analysed" in n for n in report["notes"])
    src = tmp_path / "np" / e[done]["folder"]
    assert e[done]["source_id"] == "0-saescope-res-64__l0-8"
    for name, keys in [("release.jsonl", {"name", "creatorId", "creatorName", "description"}),
                       ("model.jsonl", {"id", "instruct", "creatorId", "layers", "displayName"}),
                       ("sourceset.jsonl", {"modelId", "name", "creatorId", "description", "releaseName"}),
                       ("source.jsonl", {"id", "modelId", "setName", "creatorId", "hfFolderId", "saelensConfig"})]:
        rows = [json.loads(line) for line in (src / name).read_text().splitlines()]
        assert len(rows) == 1 and keys <= set(rows[0]), name
    source = json.loads((src / "source.jsonl").read_text())
    assert (source["id"], source["modelId"], source["setName"]) == (
        "0-saescope-res-64__l0-8", "tiny-gemma", "saescope-res-64")
    feats = _gz_rows(src / "features" / "batch-0.jsonl.gz")
    assert [f["index"] for f in feats] == ["0", "1", "2"]
    f1 = feats[1]
    assert (f1["layer"], f1["modelId"], f1["maxActApprox"], f1["frac_nonzero"]) == (
        "0-saescope-res-64__l0-8", "tiny-gemma", 3.0, pytest.approx(0.02))
    assert (f1["pos_str"], f1["pos_values"], f1["neg_str"]) == ([" France"], [1.5], [" is"])
    assert (f1["freq_hist_data_bar_values"], f1["freq_hist_data_bar_heights"]) == ([0.5, 1.5], [5, 1])
    acts = _gz_rows(src / "activations" / "batch-0.jsonl.gz")
    top = acts[0]
    assert top["tokens"] == ["<bos>", "Paris", " is", " in", " France"] and top["index"] == "1"
    assert (top["maxValue"], top["maxValueTokenIndex"], top["minValue"]) == (3.0, 1, 0.0)
    assert acts[1]["tokens"] == ["Paris", "<99>"]  # ids missing from the vocabulary stay visible
    assert len({a["id"] for a in acts}) == 2
    expl = _gz_rows(src / "explanations" / "batch-0.jsonl.gz")
    assert {x["description"] for x in expl} == {"the city Paris", "capital cities"}
    assert all(x["authorId"] == "user1" and x["index"] == "1" for x in expl)
    # the weights travel along in SAELens form
    w = tmp_path / "np" / e[done]["weights"]
    close(saelens_forward(w, _x()), saes[done](_x()).x_hat)


def test_export_neuronpedia_without_db(tmp_path, run):
    saes = _run_with_saes(run, D)
    twin = next(iter(saes.values()))
    twin.save(run.saes_dir / "resid_post" / "copy")  # same site, layer, width and L0 as another SAE
    report = export_run(run.root, "neuronpedia", tmp_path / "np")
    ids = [s["source_id"] for s in report["saes"]]
    assert len(set(ids)) == 3 and "0-saescope-res-64__copy" in ids
    assert report["model_id"].startswith("tiny-gemma3-only")  # from the run's model folder name
    assert any("weights and metadata only" in n for n in report["notes"])
    assert all(s["features"] == 0 for s in report["saes"])
    for s in report["saes"]:
        assert (tmp_path / "np" / s["weights"] / "sae_weights.safetensors").is_file()
        assert not (tmp_path / "np" / s["folder"] / "features").exists()


# ---------------------------------------------------------------------------- bad and hostile input


def test_unknown_and_incomplete_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaescopeError, match="known: .*SAELens.*sparsify"):
        read_sae_folder(tmp_path / "empty")
    with pytest.raises(SaescopeError, match="not found"):
        read_sae_folder(tmp_path / "missing")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "cfg.json").write_text("{}")
    with pytest.raises(SaescopeError, match="incomplete"):
        read_sae_folder(tmp_path / "cfg_only")
    folder = saelens_folder(tmp_path / "nocfg")
    (folder / "cfg.json").unlink()
    with pytest.raises(SaescopeError, match="holds no SAE format"):
        read_sae_folder(folder)


def test_pickles_never_loaded(tmp_path):
    folder = tmp_path / "pt"
    folder.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"W_enc": Evil()}, folder / "sae_weights.pt")
    with pytest.raises(SaescopeError, match="pickle"):
        read_sae_folder(folder)
    # a pickle under a safetensors name is just a corrupt file
    (folder / "sae_weights.safetensors").write_bytes((folder / "sae_weights.pt").read_bytes())
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
    with pytest.raises(SaescopeError, match="corrupt|cannot read"):
        read_sae_folder(folder)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["huge_header", "truncated", "int_dtype", "nan", "bad_json", "json_list",
                                    "wrong_shape", "huge_cfg"])
def test_hostile_saelens_files(tmp_path, damage):
    folder = saelens_folder(tmp_path / "s", "standard")
    weights, cfg = folder / "sae_weights.safetensors", folder / "cfg.json"
    if damage == "huge_header":
        weights.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif damage == "int_dtype":
        t = load_file(str(weights))
        t["W_enc"] = t["W_enc"].to(torch.int32)
        save_file(t, str(weights))
    elif damage == "nan":
        t = load_file(str(weights))
        t["W_dec"][3, 2] = float("nan")
        save_file(t, str(weights))
    elif damage == "bad_json":
        cfg.write_text("{not json")
    elif damage == "json_list":
        cfg.write_text("[1, 2]")
    elif damage == "wrong_shape":
        t = load_file(str(weights))
        t["b_enc"] = torch.zeros(W + 1)
        save_file(t, str(weights))
    elif damage == "huge_cfg":
        cfg.write_text('{"a": "' + "x" * 1_100_000 + '"}')
    with pytest.raises(SaescopeError):
        read_sae_folder(folder)


def test_hostile_sparsify_nan_and_dtype(tmp_path):
    folder = sparsify_folder(tmp_path / "layers.0", tensors_extra={"b_dec": torch.full((D,), float("inf"))})
    with pytest.raises(SaescopeError, match="NaN or Inf"):
        read_sae_folder(folder)
    folder = sparsify_folder(tmp_path / "layers.1", tensors_extra={"encoder.bias": torch.zeros(W, dtype=torch.int64)})
    with pytest.raises(SaescopeError, match="dtype"):
        read_sae_folder(folder)
