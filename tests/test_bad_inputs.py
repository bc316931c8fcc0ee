"""The bad-input table (tests/bad_cases.py): every case answers with one clear line and writes nothing.

CLI cases run in-process (saescope.cli.main) against tiny runs built once per session; API cases go
through the FastAPI TestClient. bench/reliability.py writes the same table to bench/RELIABILITY.md.
"""

from __future__ import annotations

import os
import shutil

import pytest
from bad_cases import CASES, build_world, problems, run_api_case, run_cli_case
from conftest import make_tiny_model


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_gemma_dir):
    base = tmp_path_factory.mktemp("bad-inputs")
    gpt2 = make_tiny_model("gpt2", base / "tiny-gpt2")
    return build_world(base / "world", tiny_gemma_dir, gpt2)


@pytest.fixture(scope="module")
def client(world):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from saescope.server.app import create_app

    with TestClient(create_app(world["run"]), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id that is not cached fails at once


def test_the_table_has_unique_ids_and_enough_cases():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(CASES) >= 200


@pytest.mark.parametrize("case", [c for c in CASES if not c.api], ids=lambda c: c.id)
def test_cli_bad_input_is_one_line_and_writes_nothing(case, world, tmp_path):
    got = run_cli_case(case, world, tmp_path / "cwd")
    assert not problems(case, got), f"{case.command}\n  {problems(case, got)}\n  shown: {got.lines}"


@pytest.mark.parametrize("case", [c for c in CASES if c.api], ids=lambda c: c.id)
def test_api_bad_request_is_a_4xx_line_and_writes_nothing(case, world, client):
    got = run_api_case(case, client, world)
    assert not problems(case, got), f"{case.command}\n  {problems(case, got)}\n  shown: {got.lines}"


# ------------------------------------------------------------------ what the fixes still let through


def _cli(argv, cwd, monkeypatch, capsys):
    from saescope.cli import main

    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code or 0, out.out, out.err


def test_ctx_len_is_an_option_checked_against_the_model_and_recorded(world, tmp_path, monkeypatch, capsys):
    import json

    code, out, err = _cli(["train", "--model", world["gpt2"], "--corpus", world["corpus"], "--layers", "0",
                           "--widths", "16", "--l0", "2", "--tokens", "200", "--batch-size", "64", "--ctx-len", "128",
                           "--out", tmp_path / "r"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["config"]["ctx_len"] == 128


def test_a_run_made_with_relative_paths_works_from_another_folder(world, tmp_path, monkeypatch, capsys):
    import json
    from pathlib import Path

    model, corpus = Path(world["model"]), Path(world["corpus"])
    code, _, err = _cli(["train", "--model", model.name, "--corpus", os.path.relpath(corpus, model.parent),
                         "--layers", "0", "--widths", "16", "--l0", "2", "--tokens", "200", "--batch-size", "64", "--ctx-len", "32",
                         "--out", tmp_path / "rel"], model.parent, monkeypatch, capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert manifest["model"] == str(model.resolve()) and Path(manifest["corpus"]["source"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code, out, err = _cli(["inspect", tmp_path / "rel", "the king"], elsewhere, monkeypatch, capsys)
    assert code == 0, err
    # a run written before paths were stored absolute: found from the run folder or one of its parents
    old = model.parent / "old-run"
    shutil.copytree(world["bare"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["model"] = model.name
    (old / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = _cli(["inspect", old, "the king", "--json"], elsewhere, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads(out)["layers"]


def test_serve_warms_up_on_a_model_with_a_tiny_vocabulary(world):
    pytest.importorskip("fastapi")
    from saescope.server.app import _warm_up_text, create_app

    atlas = create_app(world["run"]).state.atlas
    assert _warm_up_text(atlas.scope.model) != "Hello world"  # the tiny vocabulary lacks both words
    atlas.warm_up()


def test_a_concept_that_names_a_label_word_still_steers(world):
    from saescope.runs import Run
    from saescope.search import search
    from saescope.steer import steer

    run = Run.open(world["run"])  # a word of the corpus that names the top hit's label (which one depends on the data)
    words = ["music", "paris", "france", "city", "river", "tower", "water", "fire", "earth", "science", "art", "war"]
    concept = next((w for w in words if w in search(run, w, limit=1)[0].label), None)
    assert concept is not None, "no label names a corpus word"
    r = steer(world["run"], "the king", concept=concept, max_new_tokens=3)
    assert r.interventions and r.interventions[0].mode == "add"


def test_the_default_model_is_never_taken_for_the_default_run_folder(tmp_path, monkeypatch):
    from saescope.models import DEFAULT_MODEL
    from saescope.runs import Run

    runs = tmp_path / "runs"
    Run.create(runs / DEFAULT_MODEL, model=DEFAULT_MODEL, corpus={"source": "default"}, config={})
    for cwd in (tmp_path, runs):
        monkeypatch.chdir(cwd)
        assert Run.open(runs / DEFAULT_MODEL).model_spec == DEFAULT_MODEL


def test_reliability_reads_the_other_helpers_rows(tmp_path):
    """bench/reliability.py joins `case | command | message | test` rows from bench/reliability_*.txt."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "reliability", Path(__file__).resolve().parent.parent / "bench" / "reliability.py")
    reliability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability)
    (tmp_path / "reliability_r1.txt").write_text("# r1\n\nlabel-read-only | saescope label set RUN 0 1 x | "
                                                 "error: read-only | tests/test_x.py::test_y\n")
    (tmp_path / "reliability_r2.txt").write_text("a | b | c | d\n")
    assert reliability.extra_rows(tmp_path) == [
        ("label-read-only", "saescope label set RUN 0 1 x", "error: read-only", "tests/test_x.py::test_y"),
        ("a", "b", "c", "d")]
    (tmp_path / "reliability_r3.txt").write_text("only | three | parts\n")
    with pytest.raises(SystemExit, match="reliability_r3.txt:1"):
        reliability.extra_rows(tmp_path)
