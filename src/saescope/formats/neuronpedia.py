"""Neuronpedia export: feature dashboards, activations and explanations as Neuronpedia imports them.

Targeted: Neuronpedia's dataset export format "v1" (the public ``neuronpedia-datasets`` bucket), as
written by neuronpedia-utils' ``convert-saedashboard-to-neuronpedia-export.py`` and read by the
webapp's admin import route (hijohnnylin/neuronpedia, 2025). One folder per source::

    <out>/<modelId>/<sourceId>/release.jsonl     SourceRelease row
                              model.jsonl       Model row
                              sourceset.jsonl   SourceSet row
                              source.jsonl      Source row
                              features/batch-<n>.jsonl.gz       Neuron rows (128 features a file)
                              activations/batch-<n>.jsonl.gz    Activation rows (example contexts)
                              explanations/batch-<n>.jsonl.gz   Explanation rows (our labels)
    <out>/saelens/<sourceId>/cfg.json + sae_weights.safetensors  the weights, for inference servers

Field names follow Neuronpedia's Prisma models (camelCase, ``index`` as a string, ``layer`` = source
id such as ``3-saescope-res-4k__l0-32``). ``creatorId`` / ``authorId`` must name a user of the
Neuronpedia instance you import into (pass ``creator_id``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from ..fsio import write_bytes

FORMAT_VERSION = "neuronpedia-export-v1"
BATCH = 128
_SITE_SHORT = {"resid_post": ("res", "Residual Stream"), "attn_out": ("att", "Attention Out"),
               "mlp_out": ("mlp", "MLP Out"), "mlp_in": ("mlpin", "MLP In")}


def slug(text: str) -> str:
    """Neuronpedia ids: lowercase letters, digits and dashes."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", str(text).lower())).strip("-") or "model"


def source_names(site: str, layer: int, width: int, l0: float) -> tuple[str, str, str]:
    """(source set name, source id, description) in Neuronpedia's convention (e.g. 3-gemmascope-res-16k__l0-71)."""
    short, long = _SITE_SHORT.get(site, (slug(site), site))
    w = f"{width // 1024}k" if width % 1024 == 0 else str(width)
    set_name = f"saescope-{short}-{w}"
    return set_name, f"{layer}-{set_name}__l0-{round(l0)}", f"{long} - {w} (saescope)"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=UTC).isoformat()


def _jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows).encode("utf-8")


def _write_gz(path: Path, rows: list[dict]) -> None:
    write_bytes(path, gzip.compress(_jsonl(rows), compresslevel=5, mtime=0))


def _finite(x, default=0.0) -> float:
    x = float(x) if x is not None else default
    return x if x == x and abs(x) != float("inf") else default


def metadata_rows(*, model_id: str, source_id: str, set_name: str, set_description: str, release: str,
                  creator_id: str, creator_name: str, created: float, n_layers: int, d_model: int,
                  sae_cfg: dict, weights_folder: str, dataset: str, notes: str, n_prompts: int | None,
                  n_tokens_in_prompt: int | None) -> dict[str, dict]:
    t = _iso(created)
    return {
        "release.jsonl": {"name": release, "description": f"SAEs trained with saescope ({release})",
                          "descriptionShort": release, "creatorName": creator_name, "creatorNameShort": creator_name,
                          "creatorId": creator_id, "creatorEmail": None, "visibility": "PUBLIC", "isNewUi": False,
                          "featured": False, "urls": [], "defaultSourceSetName": set_name,
                          "defaultSourceId": source_id, "defaultUmapSourceIds": [], "createdAt": t},
        "model.jsonl": {"id": model_id, "instruct": model_id.endswith("-it"), "creatorId": creator_id,
                        "displayNameShort": model_id, "displayName": model_id, "tlensId": None,
                        "dimension": d_model or None, "visibility": "PUBLIC", "defaultSourceSetName": set_name,
                        "defaultSourceId": source_id, "inferenceEnabled": False, "layers": n_layers,
                        "neuronsPerLayer": 0, "owner": "", "website": None, "createdAt": t, "updatedAt": t},
        "sourceset.jsonl": {"modelId": model_id, "name": set_name, "creatorId": creator_id, "hasDashboards": True,
                            "visibility": "PUBLIC", "description": set_description, "type": "sae",
                            "creatorName": creator_name, "urls": [], "creatorEmail": None, "releaseName": release,
                            "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True,
                            "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
                            "showUmap": False, "createdAt": t},
        "source.jsonl": {"id": source_id, "modelId": model_id, "setName": set_name, "creatorId": creator_id,
                         "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [],
                         "saelensConfig": json.dumps(sae_cfg), "saelensRelease": None, "saelensSaeId": None,
                         "hfRepoId": None, "hfFolderId": weights_folder, "visibility": "PUBLIC",
                         "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                         "hasUmapClusters": False, "num_prompts": n_prompts, "num_tokens_in_prompt": n_tokens_in_prompt,
                         "dataset": dataset, "notes": notes, "createdAt": t},
    }


def feature_rows(db, sae_id: str, *, model_id: str, source_id: str, creator_id: str, created: float,
                 width: int, max_examples: int = 40) -> Iterable[tuple[dict, list[dict], list[dict]]]:
    """(Neuron row, Activation rows, Explanation rows) per feature of one analysed SAE, in index order."""
    t = _iso(created)
    stats = db.top_features(sae_id, order_by="idx", limit=max(1, width))
    for s in stats:
        idx = int(s["idx"])
        full = db.feature(sae_id, idx) or {}
        examples = full.get("examples", [])[:max_examples]
        ids = sorted({int(tok) for e in examples for tok in e["tokens"]})
        strings = dict(zip(ids, db.vocab(ids))) if ids else {}
        acts = []
        for e in examples:
            values = [_finite(v) for v in e["acts"]]
            if not values:
                continue
            top = max(range(len(values)), key=values.__getitem__)
            key = f"{model_id}/{source_id}/{idx}/{e['kind']}/{e['quantile']}/{e['rank']}"
            acts.append({"id": "c" + hashlib.sha1(key.encode()).hexdigest()[:24],
                         "tokens": [strings.get(int(tok)) or f"<{int(tok)}>" for tok in e["tokens"]],
                         "modelId": model_id, "layer": source_id, "index": str(idx),
                         "maxValue": values[top], "maxValueTokenIndex": top, "minValue": min(values),
                         "values": values, "creatorId": creator_id, "dataSource": f"saescope-{e['kind']}",
                         "dataIndex": str(e["ctx"]), "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
                         "createdAt": t, "lossValues": [], "logitContributions": None, "binMin": None,
                         "binMax": None, "binContains": None, "qualifyingTokenIndex": int(e["pos"])})
        hist = s.get("hist") or {}
        edges, counts = list(hist.get("edges") or []), list(hist.get("counts") or [])
        centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])][: len(counts)]
        pos, neg = s.get("logits_pos") or [], s.get("logits_neg") or []
        neuron = {"modelId": model_id, "layer": source_id, "index": str(idx), "creatorId": creator_id,
                  "createdAt": t, "maxActApprox": _finite(s.get("max_act")), "hasVector": False, "vector": [],
                  "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
                  "topkCosSimIndices": [], "topkCosSimValues": [], "neuron_alignment_indices": [],
                  "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
                  "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
                  "correlated_features_pearson": [], "correlated_features_l1": [],
                  "neg_str": [str(p[0]) for p in neg], "neg_values": [_finite(p[1]) for p in neg],
                  "pos_str": [str(p[0]) for p in pos], "pos_values": [_finite(p[1]) for p in pos],
                  "frac_nonzero": _finite(s.get("frequency")),
                  "freq_hist_data_bar_heights": [_finite(c) for c in counts[: len(centres)]],
                  "freq_hist_data_bar_values": [_finite(c) for c in centres],
                  "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
                  "decoder_weights_dist": []}
        expl = [{"id": "c" + hashlib.sha1(f"{model_id}/{source_id}/{idx}/label/{lab['id']}".encode()).hexdigest()[:24],
                 "modelId": model_id, "layer": source_id, "index": str(idx), "description": lab["text"],
                 "authorId": creator_id, "embedding": None, "triggeredById": None, "typeName": None,
                 "explanationModelName": lab.get("model"),
                 "notes": f"saescope {lab['source']} label" + (f" by {lab['author']}" if lab.get("author") else ""),
                 "createdAt": _iso(lab.get("created") or created)} for lab in full.get("labels", [])]
        yield neuron, acts, expl


def write_source(out: Path, rows: Iterable[tuple[dict, list[dict], list[dict]]], batch: int = BATCH) -> dict:
    """Write features/, activations/, explanations/ in batches of `batch` features; return counts."""
    counts = {"features": 0, "activations": 0, "explanations": 0}
    buf: list[tuple[dict, list[dict], list[dict]]] = []
    n = 0

    def flush():
        nonlocal n
        _write_gz(out / "features" / f"batch-{n}.jsonl.gz", [r[0] for r in buf])
        _write_gz(out / "activations" / f"batch-{n}.jsonl.gz", [a for r in buf for a in r[1]])
        expl = [e for r in buf for e in r[2]]
        if expl:
            _write_gz(out / "explanations" / f"batch-{n}.jsonl.gz", expl)
        counts["features"] += len(buf)
        counts["activations"] += sum(len(r[1]) for r in buf)
        counts["explanations"] += len(expl)
        buf.clear()
        n += 1

    for r in rows:
        buf.append(r)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return counts


def write_metadata(out: Path, rows: dict[str, dict]) -> None:
    for name, row in rows.items():
        write_bytes(out / name, _jsonl([row]))
