"""An SAE imported from Gemma Scope files is analysed and shown in the web app like our own."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from atlas_run import write_corpus  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from saescope.analyze import analyze  # noqa: E402
from saescope.interop import import_sae  # noqa: E402
from saescope.pipeline import train_run  # noqa: E402
from saescope.server.app import create_app  # noqa: E402
from saescope.train import TrainConfig  # noqa: E402


def test_imported_gemma_scope_sae_shows_up_in_the_web_app(tmp_path, tiny_gemma_dir):
    corpus = write_corpus(tmp_path / "corpus", n_docs=60)
    run = train_run(tmp_path / "run", model=str(tiny_gemma_dir), corpus=str(corpus), layers="0", widths=(16,),
                    l0s=(4,), architecture="topk", train=TrainConfig(tokens=600, batch_size=100), ctx_len=32,
                    progress=False)
    # a Gemma Scope 1 release folder (params.npz only) for layer 2's residual stream, written by hand
    ours = run.load_sae(run.sae_ids()[0])
    gs = tmp_path / "gemma-scope-270m-pt-res" / "layer_2" / "width_16" / "average_l0_5"
    gs.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    params = {name: getattr(ours, name).detach().numpy().copy() for name in ("w_enc", "b_enc", "w_dec", "b_dec")}
    params["w_enc"] = params["w_enc"] + 0.1 * torch.randn(params["w_enc"].shape, generator=g).numpy()
    params["threshold"] = np.full(16, 0.01, dtype=np.float32)
    np.savez(gs / "params.npz", **params)

    result = import_sae(gs, run.root)
    sae_id = result[0]
    assert sae_id in run.sae_ids() and sae_id.startswith("resid_post/layer_2")
    report = analyze(run, n_tokens=800, progress=False)
    assert sae_id in report.analysed

    with TestClient(create_app(run.root), base_url="http://127.0.0.1") as client:
        listed = [s["id"] for s in client.get("/api/saes").json()["saes"]]
        assert sae_id in listed
        top = client.get(f"/api/top/{sae_id}", params={"order_by": "frequency", "limit": 3}).json()["features"]
        assert top, "the imported SAE has analysed features"
        page = client.get(f"/api/feature/{sae_id}/{top[0]['idx']}")
        assert page.status_code == 200
        assert page.json()["examples"], "its feature page shows example contexts"
        inspected = client.post("/api/inspect", json={"text": "the king of france", "top": 3}).json()
        assert sae_id in [layer["sae_id"] for layer in inspected["layers"]]
    shutil.rmtree(gs)
