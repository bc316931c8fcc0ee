"""The command line end to end on a tiny model: one clear line per bad input, nothing lost."""

from __future__ import annotations

import json

import pytest

from saescope.cli import main

WORDS = "the king of france was in paris . the queen and the river . one two three city of art and music ."


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(" ".join([WORDS] * (3 + i % 4)))
    return folder


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr without progress-bar lines)."""
    with pytest.raises(SystemExit) as exc:
        main([*map(str, args)])
        raise SystemExit(0)
    out = capsys.readouterr()
    err = "".join(line for line in out.err.replace("\r", "\n").splitlines(keepends=True) if "it/s]" not in line
                  and "tok/s]" not in line and line.strip())
    return exc.value.code or 0, out.out, err


def test_sites_lists_every_layer(capsys, tiny_gemma_dir):
    code, out, _ = run_cli(capsys, "sites", tiny_gemma_dir, "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 3 * 4
    assert {r["site"] for r in rows} == {"resid_post", "attn_out", "mlp_out", "mlp_in"}


def test_harvest_then_refuse_other_run_and_keep_it(capsys, tiny_gemma_dir, corpus, tmp_path):
    out = tmp_path / "cache"
    code, stdout, err = run_cli(capsys, "harvest", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "all",
                                "--tokens", 300, "--ctx-len", 32, "--out", out)
    assert code == 0, err
    assert "cached" in stdout
    before = sorted(p.name for p in out.rglob("*"))
    # same command again: already complete, nothing changes
    code, _, _ = run_cli(capsys, "harvest", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "all",
                         "--tokens", 300, "--ctx-len", 32, "--out", out)
    assert code == 0
    # a different request into the same folder: refused, the cache stays
    code, _, err = run_cli(capsys, "harvest", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "0",
                           "--tokens", 300, "--ctx-len", 32, "--out", out)
    assert code == 1 and "another run" in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such-model-here"], "cannot load model"),
    (["--model", "missing.gguf"], "GGUF file not found"),
    (["--layers", "7"], "layer 7 does not exist"),
    (["--sites", "resid_mid"], "unknown site"),
    (["--tokens", 10_000_000], "the corpus has only"),
])
def test_harvest_bad_input_is_one_line(capsys, tiny_gemma_dir, corpus, tmp_path, args, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = {"--model": str(tiny_gemma_dir), "--corpus": str(corpus), "--tokens": "200", "--ctx-len": "32",
            "--out": str(tmp_path / "c")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = str(v)
    code, _, err = run_cli(capsys, "harvest", *[x for kv in base.items() for x in kv])
    assert code == 1
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_empty_corpus(capsys, tiny_gemma_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    code, _, err = run_cli(capsys, "harvest", "--model", tiny_gemma_dir, "--corpus", empty, "--out", tmp_path / "c")
    assert code == 1 and "no documents" in err


def test_train_eval_json_and_bad_config(capsys, tiny_gemma_dir, corpus, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "0,2",
                             "--widths", "64", "--l0", "4", "--arch", "topk", "--tokens", 1500, "--batch-size", 128,
                             "--out", run)
    assert code == 0, err
    assert "trained 2 SAEs" in out
    code, out, err = run_cli(capsys, "eval", run, "--tokens", 300, "--ce-tokens", 256, "--json")
    assert code == 0, err
    metrics = json.loads(out)["saes"]
    assert len(metrics) == 2 and all(m["l0"] == pytest.approx(4, rel=0.01) for m in metrics.values())
    assert (run / "eval.png").stat().st_size > 1000
    for m in metrics.values():  # ΔLM/KL with standard errors, and the same on text never trained on (pydoc)
        assert m["n_ce_tokens"] > 0 and m["kl"] > 0  # the tiny held-out split has one context: its SE is NaN
        assert m["other"]["n_ce_contexts"] == 2 and m["other"]["delta_lm_loss_se"] > 0 and m["other"]["fvu"] > 0
    saved = (run / "eval.json").read_bytes()
    for bad, msg in ((["--ce-tokens", "-1"], "-1 is not in the range"), (["--ce-contexts", "2"], "replaced by --ce-tokens"),
                     (["--other", str(corpus)], "is the corpus this run trained on")):
        code, out, err = run_cli(capsys, "eval", run, "--tokens", 300, *bad)
        assert code != 0 and msg in err and len(err.strip().splitlines()) == 1, err
    assert (run / "eval.json").read_bytes() == saved
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "done" and manifest["stages"]["eval"]["status"] == "done"
    # another config into the same run folder is refused; the run is untouched
    code, _, err = run_cli(capsys, "train", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "1",
                           "--widths", "64", "--l0", "4", "--out", run)
    assert code == 1 and "holds another run" in err
    assert json.loads((run / "manifest.json").read_text()) == manifest
    for bad, msg in ((["--l0", "64"], "target L0"), (["--widths", "0"], "width must be at least 1")):
        code, _, err = run_cli(capsys, "train", "--model", tiny_gemma_dir, "--corpus", corpus, "--layers", "1",
                               "--widths", "64", "--l0", "4", *bad, "--out", tmp_path / "other")
        assert code == 1 and msg in err, err
