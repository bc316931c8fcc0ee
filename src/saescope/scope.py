"""The Python API over a run: look at features, and at what fires on your own text.

    scope = Scope.open("runs/gemma-3-270m")
    scope.feature("resid_post/6", 123)      # stats, examples, logit effects, labels
    scope.inspect("The Eiffel Tower", top=5)  # per token, per SAE: the top features and their labels
    scope.activations("The Eiffel Tower", "resid_post/6", 123)  # one feature on every token of your text
    scope.similar("resid_post/6", 123)      # decoder-cosine neighbours in this and adjacent layers
    scope.search("farm animals")            # features about a concept, over every layer

The web app calls these same functions, so both return plain JSON-able data.
The model and the SAEs load on first use; features.sqlite opens on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import SaescopeError
from .featuredb import FeatureDB
from .runs import Run, as_run
from .sae import SAE, read_config
from .tokens import one_line, texts, token_text, visible

if TYPE_CHECKING:
    from .search import Mode as SearchMode

LABEL_PREFERENCE = ("human", "llm", "offline")
"""Which current label `inspect` shows when a feature has several."""


class _LazySAEs(Mapping):
    """id → SAE, each loaded from the run folder on first access."""

    def __init__(self, run: Run):
        self._run = run
        self._loaded: dict[str, SAE] = {}

    def __getitem__(self, sae_id: str) -> SAE:
        if sae_id not in self._loaded:
            if sae_id not in self._run.sae_ids():
                raise KeyError(sae_id)
            sae = self._run.load_sae(sae_id)
            sae.requires_grad_(False)
            self._loaded[sae_id] = sae
        return self._loaded[sae_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._run.sae_ids())

    def __len__(self) -> int:
        return len(self._run.sae_ids())


class Scope:
    """One run, opened for looking: `.run`, `.model` (lazy), `.saes` (lazy id → SAE), `.db`."""

    def __init__(self, run: Run):
        self.run = run
        self.saes = _LazySAEs(run)
        self._db: FeatureDB | None = None

    @classmethod
    def open(cls, run_dir: str | Path | Run) -> Scope:
        return cls(as_run(run_dir))

    @cached_property
    def model(self):
        return self.run.model

    @property
    def db(self) -> FeatureDB:
        """features.sqlite of the run (created empty if the run has none yet)."""
        if self._db is None:
            self._db = self.run.reader_db()
        return self._db

    def _db_if_any(self) -> FeatureDB | None:
        return self.db if self._db is not None or self.run.db_path.is_file() else None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Scope({str(self.run.root)!r})"

    # ---------------------------------------------------------------- features

    def sae_info(self, ref: str | int) -> dict:
        """{id, site, layer, width} for a full id, "site/LAYER" or "LAYER"."""
        sae_id = self.run.resolve_sae(ref)
        cfg = read_config(self.run.sae_path(sae_id) / "config.json")
        return {"id": sae_id, "site": cfg.get("site") or sae_id.split("/")[0], "layer": cfg.get("layer"),
                "width": int(cfg.get("width") or 0)}

    def feature(self, sae: str | int, index: int) -> dict | None:
        """Everything known about one feature, or None when it has not been analysed.

        Keys: sae_id, idx, site, layer, width, frequency, n_fired, max_act, mean_act,
        hist ({edges, counts, scale}), examples (kind, rank, quantile, max_act, pos, ctx,
        tokens (display strings), token_ids, acts), logits_pos / logits_neg
        ([{token, value}], most promoted / suppressed first), labels (current, newest
        first, each with its scores).
        """
        info = self.sae_info(sae)
        idx = _index(index, info)
        db = self._db_if_any()
        row = db.feature(info["id"], idx) if db is not None else None
        if db is None or row is None:
            return None
        from .label.evidence import TokenTable

        table = TokenTable(db)
        examples = []
        for e in row.pop("examples"):
            ids = [int(t) for t in e["tokens"]]
            examples.append({"kind": e["kind"], "rank": e["rank"], "quantile": e["quantile"],
                             "max_act": e["max_act"], "pos": e["pos"], "ctx": e["ctx"],
                             "tokens": table.display(ids), "token_ids": ids,
                             "acts": [round(float(a), 4) for a in e["acts"]]})
        out = {"sae_id": info["id"], "idx": idx, "site": info["site"], "layer": info["layer"],
               "width": info["width"]}
        out.update({k: row[k] for k in ("frequency", "n_fired", "max_act", "mean_act", "hist")})
        out["dead"] = not row["n_fired"]
        for key in ("logits_pos", "logits_neg"):
            out[key] = [{"token": token_text(t), "value": v} for t, v in (row.get(key) or [])]
        out["examples"] = examples
        out["labels"] = row["labels"]
        return out

    # ---------------------------------------------------------------- inspect

    def search(self, query: str, limit: int = 20, mode: SearchMode = "concept") -> list[dict]:
        """Features about `query` over every layer, best first (`saescope.search.search`), as plain dicts:
        sae_id, layer, idx, label, score (detection), output, frequency, snippet, evidence, steer, ..."""
        from dataclasses import asdict

        from .search import search

        return [asdict(h) for h in search(self.run, query, limit=limit, mode=mode)]

    def inspect(self, text: str, top: int = 5, saes: list[str] | None = None, fast: bool = False) -> dict:
        """Run `text` through the model and every SAE (or those in `saes`): per token, per SAE,
        the `top` most active features with their activation and current label. `fast`: the model's
        matrix products in bf16 where the CPU has native bf16 (`LoadedModel.fast_matmuls`); the result's
        "precision" says what ran ("fp32"/the model's dtype, or "bf16 matmuls").

        Returns {"text", "tokens": [{"id", "text", "bos"}], "layers": [{"sae_id", "layer",
        "site", "features": [[{"idx", "act", "label"}, ...] per token], "l0": [active features
        per token]}]}. The BOS position is included in tokens (bos=True) and gets no features.
        """
        from .harvest import activations

        if int(top) < 1:
            raise SaescopeError(f"top must be at least 1, got {top}")
        lm = self.model
        ids, keep, tokens = self._prompt(text)
        sae_ids = [self.run.resolve_sae(s) for s in saes] if saes is not None else self.run.sae_ids()
        if not sae_ids:
            raise SaescopeError(f"run {self.run.root} has no SAEs: train some first (`saescope train`)")
        models = {i: self.saes[i] for i in sae_ids}
        sites = {i: lm.site(s.cfg.site, s.cfg.layer) for i, s in models.items()}
        with lm.fast_matmuls() if fast else nullcontext():
            acts = activations(lm, ids, list({s.key: s for s in sites.values()}.values()))
        precision = (fast and lm.fast_precision) or str(lm.dtype).removeprefix("torch.")
        labels = _LabelCache(self._db_if_any())
        layers = []
        order = sorted(sae_ids, key=lambda i: (models[i].cfg.layer, models[i].cfg.site, i))
        for sae_id in order:
            sae = models[sae_id]
            with torch.no_grad():
                f = sae.encode(acts[sites[sae_id].key][0].float().to(sae.w_enc.device))  # (T, width)
                vals, idx = f.topk(min(int(top), sae.cfg.width), dim=1)
                l0 = ((f > 0) & keep.to(f.device)[:, None]).sum(1).tolist()
            top_v, top_i, kept = vals.tolist(), idx.tolist(), keep.tolist()
            labels.prefetch(sae_id, {i for p, row in enumerate(top_i) if kept[p] for i in row})
            per_token = [[{"idx": i, "act": v, "label": labels.get(sae_id, i)} for v, i in zip(top_v[p], top_i[p])
                          if v > 0] if kept[p] else [] for p in range(len(kept))]
            layers.append({"sae_id": sae_id, "layer": sae.cfg.layer, "site": sae.cfg.site, "features": per_token,
                           "l0": l0})
        return {"text": text, "tokens": tokens, "layers": layers, "precision": precision}

    def _prompt(self, text: str) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """`text` as model input: ids (1, T) with BOS first, the keep mask (T,) of ordinary tokens,
        and the tokens [{"id", "text", "bos"}]. Refuses text that is not a string, tokenises to
        nothing, or passes the model's context."""
        from .harvest import keep_mask

        lm = self.model
        tok = lm.tokenizer
        if not isinstance(text, str):
            raise SaescopeError(f"text must be a string, not {type(text).__name__}")
        body = tok(text, add_special_tokens=False)["input_ids"]
        if not any(i not in lm.special_ids for i in body):
            raise SaescopeError("the text tokenises to nothing: type some words to inspect")
        bos = lm.bos_id
        ids = torch.tensor([([bos] if bos is not None else []) + list(body)], dtype=torch.long)
        lm.check_fits(ids.shape[1])
        keep = keep_mask(lm, ids)[0]
        strings = texts([str(s) for s in tok.convert_ids_to_tokens(ids[0].tolist())])
        tokens = [{"id": int(i), "text": s, "bos": p == 0 and bos is not None}
                  for p, (i, s) in enumerate(zip(ids[0].tolist(), strings))]
        return ids, keep, tokens

    def activations(self, text: str, sae: str | int, index: int) -> dict:
        """One feature's activation on every token of `text` (activation testing).

        Returns {"sae_id", "idx", "tokens": [{"id", "text", "bos"}], "acts": [float per token]
        (0 at BOS/EOS/pad), "max_act": the largest here, "max_act_analysed": the feature's
        max over the analysed tokens (None before `saescope analyze`)}.
        """
        from .harvest import activations

        info = self.sae_info(sae)
        idx = _index(index, info)
        ids, keep, tokens = self._prompt(text)
        model = self.saes[info["id"]]
        site = self.model.site(model.cfg.site, model.cfg.layer)
        x = activations(self.model, ids, [site])[site.key][0]  # (T, d_in)
        with torch.no_grad():
            f = model.feature_code(x.float().to(model.w_enc.device), idx).cpu()  # (T,): this code only
        acts = [round(float(a), 4) if k else 0.0 for a, k in zip(f.tolist(), keep.tolist())]
        db = self._db_if_any()
        row = db.feature_stats(info["id"], idx) if db is not None else None
        return {"sae_id": info["id"], "idx": idx, "tokens": tokens, "acts": acts, "max_act": max(acts),
                "max_act_analysed": row["max_act"] if row else None}

    def similar(self, sae: str | int, index: int, k: int = 8, span: int = 1) -> list[dict]:
        """Features whose decoder direction is closest (cosine) to this one's, in the same SAE and
        in the SAEs of the same site `span` layers above and below (same d_in only).

        Returns one group per SAE, by layer: [{"sae_id", "layer", "features": [{"idx", "cosine",
        "label"}, ...]}], `k` per group, highest cosine first (the feature itself left out).
        """
        info = self.sae_info(sae)
        idx = _index(index, info)
        if int(k) < 1 or int(span) < 0:
            raise SaescopeError(f"k must be at least 1 and span at least 0, got k={k}, span={span}")
        me = self.saes[info["id"]]
        with torch.no_grad():
            d = torch.nn.functional.normalize(me.w_dec[idx].float(), dim=0)  # (d_in,)
        labels = _LabelCache(self._db_if_any())
        groups = []
        for other_id in self.run.sae_ids():
            other = self.saes[other_id]
            if other.cfg.site != me.cfg.site or abs(other.cfg.layer - me.cfg.layer) > span \
                    or other.cfg.d_in != me.cfg.d_in:
                continue
            with torch.no_grad():
                cos = torch.nn.functional.normalize(other.w_dec.float(), dim=1) @ d.to(other.w_dec.device)
                if other_id == info["id"]:
                    cos[idx] = -2.0
                vals, top = cos.topk(min(int(k), cos.numel() - (other_id == info["id"])))
            groups.append({"sae_id": other_id, "layer": other.cfg.layer, "features": [
                {"idx": int(i), "cosine": round(float(v), 4), "label": labels.get(other_id, int(i))}
                for v, i in zip(vals.tolist(), top.tolist())]})
        return sorted(groups, key=lambda g: (g["layer"], g["sae_id"]))


def _index(index, info: dict) -> int:
    if isinstance(index, bool):
        raise SaescopeError(f"feature index must be a whole number, not {index!r}")
    try:
        idx = int(index)
    except (TypeError, ValueError):
        raise SaescopeError(f"feature index must be a whole number, not {index!r}") from None
    if not 0 <= idx < info["width"]:
        raise SaescopeError(f"feature {idx} is out of range for SAE {info['id']} (width {info['width']}): "
                            f"use 0..{info['width'] - 1}")
    return idx


class _LabelCache:
    """Current label text of (sae_id, idx), preferring human > llm > offline; None without a DB."""

    def __init__(self, db: FeatureDB | None):
        self.db = db
        self.cache: dict[tuple[str, int], str | None] = {}

    def prefetch(self, sae_id: str, idxs) -> None:
        """Read the labels of many features of one SAE in a few queries (`get` then finds them cached)."""
        if self.db is None:
            return
        missing = [int(i) for i in idxs if (sae_id, int(i)) not in self.cache]
        for i, labels in self.db.labels_of(sae_id, missing).items():
            self.cache[(sae_id, i)] = best_label(labels)

    def get(self, sae_id: str, idx: int) -> str | None:
        if self.db is None:
            return None
        key = (sae_id, idx)
        if key not in self.cache:
            self.cache[key] = best_label(self.db.labels(sae_id, idx))
        return self.cache[key]


def best_label(labels: list[dict]) -> str | None:
    """The text to show for a feature among its current labels: labels written for its present weights
    first, then human > llm > offline; a label written for replaced weights is marked so."""
    if not labels:
        return None
    rank = {source: i for i, source in enumerate(LABEL_PREFERENCE)}
    best = min(labels, key=lambda lab: (bool(lab.get("stale")), rank.get(lab["source"], len(rank))))
    return best["text"] + (" (written for old weights)" if best.get("stale") else "")


# --------------------------------------------------------------------------- text rendering (CLI)

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(counts: list[int]) -> str:
    """Counts as a row of block characters (empty bins as spaces)."""
    top = max(counts, default=0)
    if top <= 0:
        return ""
    return "".join(" " if c == 0 else SPARK[min(len(SPARK) - 1, int(len(SPARK) * c / (top + 1e-9)))] for c in counts)


def _highlight(tokens: list[str], acts: list[float], scale: float, style) -> str:
    """Tokens joined, firing ones styled: bold red above half of `scale`, yellow below."""
    out = []
    for t, a in zip(tokens, acts):
        t = one_line(t)
        if a > 0:
            core = t.lstrip()
            out.append(t[: len(t) - len(core)] + style(core, fg="red" if a >= 0.5 * scale else "yellow", bold=True))
        else:
            out.append(t)
    return "".join(out)


def _plain(text: str, **_) -> str:
    return text


def feature_card(card: dict, n_examples: int = 8, style=None) -> str:
    """A feature as text: labels, density, histogram, logit effects, top / quantile / random contexts.

    `style(text, fg=..., bold=...)` marks firing tokens (e.g. click.style); plain by default,
    where firing tokens are wrapped [[like this]].
    """
    mark = style or (lambda text, **_: f"[[{text}]]")
    lines = [f"{card['sae_id']}  feature {card['idx']}  (layer {card['layer']}, {card['site']})"
             + ("  DEAD: never fired on the analysed tokens" if card.get("dead") else "")]
    for lab in card.get("labels") or []:
        stale = ", STALE: written for the SAE's old weights" if lab.get("stale") else ""
        lines.append(f"label ({lab['source']}{', ' + lab['model'] if lab.get('model') else ''}{stale}): {lab['text']}")
    if not card.get("labels"):
        lines.append("label: (none yet)")
    lines.append(f"frequency {100 * card['frequency']:.3g}% ({card['n_fired']:,} tokens)   "
                 f"max {card['max_act']:.4g}   mean {card['mean_act']:.4g}")
    hist = card.get("hist")
    if hist:
        lines.append(f"activations {sparkline(hist['counts'])}  ({hist['edges'][0]:.3g} … {hist['edges'][-1]:.3g}, "
                     f"log scale)")
    if card.get("logits_pos"):
        lines.append("promotes:   " + "  ".join(f"{visible(d['token'])} {d['value']:+.3g}"
                                                 for d in card["logits_pos"]))
    if card.get("logits_neg"):
        lines.append("suppresses: " + "  ".join(f"{visible(d['token'])} {d['value']:+.3g}"
                                                 for d in card["logits_neg"]))
    for group in card.get("similar") or []:  # Scope.similar: decoder-cosine neighbours
        lines.append(f"similar in layer {group['layer']} (decoder cosine): " + "  ".join(
            f"#{f['idx']} {f['cosine']:.2f}" + (f" {f['label'][:40]!r}" if f["label"] else "") for f in group["features"]))
    examples = card.get("examples") or []
    scale = max((e["max_act"] for e in examples), default=0.0)
    for kind, title in (("top", "top contexts"), ("quantile", "quantile examples (weakest bin first)"),
                        ("random", "random contexts where it does not fire")):
        group = [e for e in examples if e["kind"] == kind]
        if kind == "quantile":
            group = [e for e in group if e["rank"] == 0]
        if not group:
            continue
        lines.append(f"{title}:")
        for e in group[:n_examples]:
            tag = f"q{e['quantile']} " if kind == "quantile" else ""
            lines.append(f"  {tag}{e['max_act']:>8.3g}  {_highlight(e['tokens'], e['acts'], scale, mark)}")
    if not examples:
        lines.append("no examples: the feature never fired on the analysed tokens")
    return "\n".join(lines)


def inspect_table(result: dict, style=None) -> str:
    """`Scope.inspect` output as text: one block per token, one line per SAE."""
    style = style or _plain
    lines = []
    for p, tok in enumerate(result["tokens"]):
        lines.append(f"{p:>3} {visible(tok['text'])}" + ("  (BOS: no features)" if tok["bos"] else ""))
        if tok["bos"]:
            continue
        for lay in result["layers"]:
            feats = lay["features"][p]
            cells = []
            for d in feats:
                label = f" {d['label']!r}" if d["label"] else ""
                cells.append(style(f"#{d['idx']}", bold=True) + f" {d['act']:.3g}{label}")
            lines.append(f"      L{lay['layer']:<2} {lay['site']:<10} " + ("   ".join(cells) if cells else "-"))
    return "\n".join(lines)
