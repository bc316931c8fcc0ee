"""Bad SAE configs are refused at import with one line per problem, and nothing is written.

Every field of a saescope / Gemma Scope 2 config.json is fed a wrong type, a bool for a number,
NaN, ±inf, a negative or out-of-range value, or is left out; SAELens and sparsify configs get
bad `k`s. Each case asserts the exact problems reported (one line each, naming the file) and that
the run is byte-for-byte as before.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_formats import saelens_folder, sparsify_folder

from saescope.cli import main
from saescope.errors import SaescopeError
from saescope.evaluate import evaluate
from saescope.interop import import_sae
from saescope.models import load_model
from saescope.runs import Run
from saescope.sae import SAE, SAEConfig

W = 24
NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def tiny_lm(tiny_gemma_dir):
    return load_model(str(tiny_gemma_dir), device="cpu")


@pytest.fixture
def run(tmp_path, tiny_gemma_dir):
    return Run.create(tmp_path / "run", model=str(tiny_gemma_dir), corpus={}, config={})


def gs2_folder(path, lm, changes=None, drop=()):
    """A saescope / Gemma Scope 2 folder for resid_post of layer 1, its config.json edited."""
    site = lm.site("resid_post", 1)
    cfg = SAEConfig(d_in=site.width, width=W, l0=4, site="resid_post", layer=1, hf_hook_point_in=site.hook_name,
                    hf_hook_point_out=site.hook_name, model_name="tiny")
    SAE.init(cfg, generator=torch.Generator().manual_seed(0)).save(path)
    d = json.loads((path / "config.json").read_text())
    d.update(changes or {})
    for key in drop:
        d.pop(key, None)
    (path / "config.json").write_text(json.dumps(d))  # NaN / Infinity as Python's json writes them
    return path


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))
            if p.name != ".lock"}  # (the run's lock file, `Run.exclusive`: no data)


def _refused(src, run, lm, expected: tuple[str, ...]) -> str:
    """Import `src`: it must fail with exactly the `expected` problems, one line each, the run untouched."""
    before = _snapshot(run.root)
    with pytest.raises(SaescopeError) as err:
        import_sae(src, run.root, model=lm)
    message = str(err.value)
    lines = message.splitlines()
    assert len(lines) == len(expected), message
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, f"{fragment!r} not on one line of:\n{message}"
    assert "Traceback" not in message and "overwrite=True" not in message
    assert _snapshot(run.root) == before and run.sae_ids() == []
    return message


HERE = "config.json: "
BAD_GS2 = [
    # layer: a whole number >= -1 that the model has
    ("layer-true", {"layer": True}, ("layer must be a whole number, got true",)),
    ("layer-false", {"layer": False}, ("layer must be a whole number, got false",)),
    ("layer-path", {"layer": "model.layers.3"}, ('layer must be a whole number, got "model.layers.3"',)),
    ("layer-digits", {"layer": "1"}, ('layer must be a whole number, got "1"',)),
    ("layer-1.5", {"layer": 1.5}, ("layer must be a whole number, got 1.5",)),
    ("layer-1.0", {"layer": 1.0}, ("layer must be a whole number, got 1.0",)),
    ("layer-nan", {"layer": NAN}, ("layer must be a whole number, got NaN",)),
    ("layer-inf", {"layer": INF}, ("layer must be a whole number, got Infinity",)),
    ("layer-1e308", {"layer": 1e308}, ("layer must be a whole number, got 1e+308",)),
    ("layer-null", {"layer": None}, ("layer must be a whole number, got null",)),
    ("layer-list", {"layer": [1]}, ("layer must be a whole number, got [1]",)),
    ("layer-negative", {"layer": -2}, ("layer must be at least -1 (-1 = unknown), got -2",)),
    # target L0: a finite number above 0 and below the width
    ("l0-true", {"l0": True}, ("target L0 (l0) must be a finite number, got true",)),
    ("l0-text", {"l0": "4"}, ('target L0 (l0) must be a finite number, got "4"',)),
    ("l0-nan", {"l0": NAN}, ("target L0 (l0) must be a finite number, got NaN",)),
    ("l0-inf", {"l0": INF}, ("target L0 (l0) must be a finite number, got Infinity",)),
    ("l0-minus-inf", {"l0": -INF}, ("target L0 (l0) must be a finite number, got -Infinity",)),
    ("l0-null", {"l0": None}, ("target L0 (l0) must be a finite number, got null",)),
    ("l0-negative", {"l0": -4}, (f"target L0 (l0) must be above 0 and below the width ({W}), got -4",)),
    ("l0-zero", {"l0": 0}, (f"target L0 (l0) must be above 0 and below the width ({W}), got 0",)),
    ("l0-1e308", {"l0": 1e308}, (f"target L0 (l0) must be above 0 and below the width ({W}), got 1e+308",)),
    ("l0-width", {"l0": W}, (f"target L0 (l0) must be above 0 and below the width ({W}), got {W}",)),
    # width and d_in: whole numbers >= 1 that match the weights
    ("width-true", {"width": True}, ("width must be a whole number, got true",)),
    ("width-text", {"width": "24"}, ('width must be a whole number, got "24"',)),
    ("width-float", {"width": 24.5}, ("width must be a whole number, got 24.5",)),
    ("width-nan", {"width": NAN}, ("width must be a whole number, got NaN",)),
    # a bad width is reported once, not again as "l0 must be below the width"
    ("width-zero", {"width": 0}, ("width must be at least 1, got 0", "config says width 0 but the weights")),
    ("width-negative", {"width": -5}, ("width must be at least 1, got -5", "config says width -5")),
    ("width-mismatch", {"width": 999}, ("config says width 999 but the weights (w_enc 32×24) have 24",)),
    ("d_in-false", {"d_in": False}, ("d_in must be a whole number, got false",)),
    ("d_in-text", {"d_in": "32"}, ('d_in must be a whole number, got "32"',)),
    ("d_in-zero", {"d_in": 0}, ("d_in must be at least 1, got 0", "config says d_in 0")),
    ("d_in-mismatch", {"d_in": 31}, ("config says d_in 31 but the weights (w_enc 32×24) have 32",)),
    # architecture, site and the other text fields
    ("architecture-number", {"architecture": 5}, ("architecture must be text, got 5",)),
    ("architecture-true", {"architecture": True}, ("architecture must be text, got true",)),
    ("architecture-unknown", {"architecture": "gated_foo"}, ("unknown architecture 'gated_foo'",)),
    ("site-number", {"site": 3}, ("site must be text, got 3",)),
    ("site-unknown", {"site": "resid"},
     ('site must be one of resid_post, attn_out, mlp_out, mlp_in, got "resid"',)),
    ("hook-in-number", {"hf_hook_point_in": 7}, ("hf_hook_point_in must be text, got 7",)),
    ("hook-out-list", {"hf_hook_point_out": ["a"]}, ('hf_hook_point_out must be text, got ["a"]',)),
    ("model_name-number", {"model_name": 5}, ("model_name must be text, got 5",)),
    ("type-number", {"type": 1}, ("type must be text, got 1",)),
    # pre_bias: true or false
    ("pre_bias-text", {"pre_bias": "yes"}, ('pre_bias must be true or false, got "yes"',)),
    ("pre_bias-number", {"pre_bias": 1}, ("pre_bias must be true or false, got 1",)),
    ("pre_bias-null", {"pre_bias": None}, ("pre_bias must be true or false, got null",)),
    # several problems: all of them, one line each
    ("three-problems", {"layer": True, "l0": NAN, "pre_bias": "no"},
     ("layer must be a whole number, got true", "target L0 (l0) must be a finite number, got NaN",
      'pre_bias must be true or false, got "no"')),
]


@pytest.mark.parametrize("changes, expected", [c[1:] for c in BAD_GS2], ids=[c[0] for c in BAD_GS2])
def test_bad_config_field_is_refused_with_one_line_each(tmp_path, run, tiny_lm, changes, expected):
    src = gs2_folder(tmp_path / "src", tiny_lm, changes)
    message = _refused(src, run, tiny_lm, expected)
    assert all(line.startswith(f"{src / 'config.json'}: ") for line in message.splitlines())


@pytest.mark.parametrize("case, edit, expected", [
    ("layer-beyond-model", lambda p: _edit(p, layer=99), ("layer 99 does not exist",)),
    ("missing-site-layer-hook", lambda p: _edit(p, drop=("site", "layer", "hf_hook_point_in")),
     ("cannot tell which saescope site",)),
    ("missing-config-file", lambda p: (p / "config.json").unlink(), ("cannot tell which saescope site",)),
    ("config-not-an-object", lambda p: (p / "config.json").write_text("[1, 2]"), ("must hold a JSON object",)),
    ("config-not-json", lambda p: (p / "config.json").write_text("{layer: 1"), ("is not valid JSON",)),
])
def test_config_missing_or_unusable(tmp_path, run, tiny_lm, case, edit, expected):
    src = gs2_folder(tmp_path / "src", tiny_lm)
    edit(src)
    _refused(src, run, tiny_lm, expected)


def _edit(folder, drop=(), **changes):
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    for key in drop:
        d.pop(key)
    (folder / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("make, expected", [
    (lambda p: saelens_folder(p, "topk", d=32, cfg_extra={"k": True}), ("positive 'k'",)),
    (lambda p: saelens_folder(p, "topk", d=32, cfg_extra={"k": NAN}), ("positive 'k'",)),
    (lambda p: saelens_folder(p, "topk", d=32, cfg_extra={"k": "8"}), ("positive 'k'",)),
    (lambda p: saelens_folder(p, "topk", d=32, cfg_extra={"k": 1e308}),
     ("target L0 (k) must be above 0 and below the width (64), got 1e+308",)),
    (lambda p: saelens_folder(p, "topk", d=32, cfg_extra={"k": 64}),
     ("target L0 (k) must be above 0 and below the width (64), got 64",)),
    (lambda p: saelens_folder(p, "jumprelu", d=32, cfg_extra={"metadata": {
        "hook_name": "blocks.1.hook_resid_post", "saescope": {"l0": 1e308}}}),
     ("target L0 (metadata.saescope.l0) must be above 0 and below the width (64), got 1e+308",)),
    (lambda p: saelens_folder(p, "jumprelu", d=32, cfg_extra={"metadata": {
        "hook_name": "blocks.1.hook_resid_post", "saescope": {"l0": True}}}),
     ("target L0 (metadata.saescope.l0) must be a finite number, got true",)),
    (lambda p: sparsify_folder(p / "layers.1", d=32, k=True), ("integer 'k'",)),
    (lambda p: sparsify_folder(p / "layers.1", d=32, k=1e308), ("integer 'k'",)),
    (lambda p: sparsify_folder(p / "layers.1", d=32, k=8.5), ("integer 'k'",)),
], ids=["saelens-k-true", "saelens-k-nan", "saelens-k-text", "saelens-k-1e308", "saelens-k-width",
        "saelens-meta-l0-1e308", "saelens-meta-l0-true", "sparsify-k-true", "sparsify-k-1e308", "sparsify-k-8.5"])
def test_bad_k_in_other_tools_configs(tmp_path, run, tiny_lm, make, expected):
    _refused(make(tmp_path / "src"), run, tiny_lm, expected)


def test_unknown_fields_are_kept_and_null_texts_read_as_empty(tmp_path, run, tiny_lm):
    src = gs2_folder(tmp_path / "src", tiny_lm, {"extra": {"note": 1}, "my_field": "x", "hf_hook_point_out": None},
                     drop=("l0",))
    res = import_sae(src, run.root, model=tiny_lm)
    assert any("do not give a target L0" in n for n in res.notes)
    cfg = run.load_sae(res.sae_id).cfg
    assert cfg.extra["extra"] == {"note": 1} and cfg.extra["my_field"] == "x"
    assert cfg.hf_hook_point_out == "" and cfg.l0 == 12.0  # nominal: width / 2
    # a layer of -1 (unknown) is taken from the hook name
    src2 = gs2_folder(tmp_path / "src2", tiny_lm, {"layer": -1})
    assert import_sae(src2, run.root, model=tiny_lm, name="again").sae_id == "resid_post/again"
    assert run.load_sae("resid_post/again").cfg.layer == 1


# ---------------------------------------------------------------------------- the command line


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([*map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_cli_import_bad_layer_and_name_clash(tmp_path, run, tiny_lm, capsys):
    src = gs2_folder(tmp_path / "src", tiny_lm, {"layer": True})
    before = _snapshot(run.root)
    code, _, err = _cli(capsys, "import", src, "--run", run.root)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert "layer must be a whole number, got true" in err
    assert _snapshot(run.root) == before
    good = gs2_folder(tmp_path / "good", tiny_lm)
    code, out, err = _cli(capsys, "import", good, "--run", run.root)
    assert code == 0, err
    before = _snapshot(run.root)
    code, _, err = _cli(capsys, "import", good, "--run", run.root)
    assert code == 1 and err.count("\n") == 1
    assert "--overwrite" in err and "--name" in err and "overwrite=True" not in err
    assert _snapshot(run.root) == before
    code, out, err = _cli(capsys, "import", good, "--run", run.root, "--name", "second")
    assert code == 0 and "resid_post/second" in out, err


def test_bad_sae_folder_already_in_a_run_fails_eval_with_one_line(tmp_path, run, tiny_lm):
    """A folder written by an older saescope (layer true accepted) is refused when read, not a KeyError."""
    gs2_folder(run.saes_dir / "resid_post" / "layer_True_width_24_l0_4", tiny_lm, {"layer": True})
    run.__dict__["model"] = tiny_lm
    with pytest.raises(SaescopeError, match="layer must be a whole number, got true") as err:
        evaluate(run, eval_tokens=64, ce_tokens=0, other=None, progress=False)
    assert len(str(err.value).splitlines()) == 1
    assert not (run.root / "eval.json").exists()


@pytest.mark.parametrize("name", ["../escape", ".hidden", "", "a/b", "-x", "x" * 101, "sp ace", "..", "é"])
def test_bad_sae_name_is_refused(tmp_path, run, tiny_lm, name):
    src = gs2_folder(tmp_path / "src", tiny_lm)
    before = _snapshot(run.root)
    with pytest.raises(SaescopeError, match="invalid SAE folder name") as err:
        import_sae(src, run.root, model=tiny_lm, name=name)
    assert len(str(err.value).splitlines()) == 1
    assert _snapshot(run.root) == before and not (run.saes_dir / "escape").exists()
