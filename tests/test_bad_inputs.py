"""The bad-input table (tests/bad_cases.py): every case answers with one clear line and writes nothing.

CLI cases run in-process (saescope.cli.main) against tiny runs built once per session; API cases go
through the FastAPI TestClient. bench/reliability.py writes the same table to bench/RELIABILITY.md.
"""

from __future__ import annotations

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
