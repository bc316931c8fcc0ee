"""Held-out fidelity of every SAE in a run: L0, FVU, dead/dense, ΔLM loss, CE recovered.

Only held-out documents are used (corpus split), and BOS/EOS/pad positions are
excluded from every metric: the SAE is spliced in only at ordinary positions and
CE is measured only on ordinary target tokens.

The ΔLM splice reuses the clean pass: the inputs of every layer are captured once,
then for each SAE the model runs again only from the SAE's layer on.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SaescopeError
from .fsio import atomic_path, write_json
from .harvest import keep_mask
from .models import LoadedModel, Site
from .sae import SAE

DENSE_FRACTION = 0.1


def fidelity(sae: SAE, x: torch.Tensor, chunk: int = 4096) -> dict:
    """L0, FVU, dead and dense fractions of `sae` on activations x (n, d_in)."""
    n = x.shape[0]
    fired = torch.zeros(sae.cfg.width, device=x.device)
    l0_sum, err_sum = 0.0, 0.0
    with torch.no_grad():
        for i in range(0, n, chunk):
            out = sae(x[i : i + chunk])
            active = out.f > 0
            fired += active.sum(0)
            l0_sum += float(active.sum())
            err_sum += float((x[i : i + chunk] - out.x_hat).pow(2).sum())
        total_var = float((x - x.mean(0)).pow(2).sum())
    freq = fired / n
    return {"l0": l0_sum / n, "fvu": err_sum / max(total_var, 1e-30), "dead_fraction": float((fired == 0).float().mean()),
            "dense_fraction": float((freq > DENSE_FRACTION).float().mean()), "n_tokens": n}


@contextlib.contextmanager
def _capture_layer_inputs(lm: LoadedModel):
    """Record (args, kwargs) of every decoder layer call during a forward pass."""
    seen: dict[int, tuple] = {}
    handles = []

    def hook(i):
        def fn(module, args, kwargs):
            seen[i] = (args, dict(kwargs))

        return fn

    try:
        for i, layer in enumerate(lm.layers):
            handles.append(layer.register_forward_pre_hook(hook(i), with_kwargs=True))
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _replace_site(site: Site, fn, keep: torch.Tensor):
    """Replace the activation at `site` by fn(activation) at positions where `keep` is True."""

    def swap(t):
        new = fn(t)
        return torch.where(keep[..., None].to(t.device), new.to(t.dtype), t)

    if site.io == "output":

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (swap(output[0]), *output[1:])
            return swap(output)

        h = site.module.register_forward_hook(hook)
    else:

        def hook(module, args):
            return (swap(args[0]), *args[1:])

        h = site.module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        h.remove()


def _ce(lm: LoadedModel, resid: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, chunk: int = 256) -> tuple[float, int]:
    """Summed next-token CE over ordinary targets, from the last layer's residual (batch, seq, d)."""
    target_ok = keep[:, 1:]
    h = resid[:, :-1][target_ok]  # (n, d)
    targets = ids[:, 1:][target_ok].to(h.device)
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        logits = lm.logits_from_resid(h[i : i + chunk]).float()
        total += float(F.cross_entropy(logits, targets[i : i + chunk], reduction="sum"))
    return total, int(h.shape[0])


def _run_from(lm: LoadedModel, start: int, layer_inputs: dict) -> torch.Tensor:
    args, kwargs = layer_inputs[start]
    h = args[0]
    for i in range(start, lm.n_layers):
        a, kw = layer_inputs[i]
        out = lm.layers[i](h, *a[1:], **kw)
        h = out[0] if isinstance(out, tuple) else out
    return h


def delta_lm_loss(lm: LoadedModel, saes: dict[str, SAE], contexts: list[list[int]], batch_size: int = 4,
                  progress: bool = True) -> dict[str, dict]:
    """CE with each SAE spliced in, minus clean CE; and CE recovered vs zero-ablation of the site."""
    totals: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    bar = tqdm(total=len(contexts) * len(saes), desc="eval ΔLM", unit="ctx", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for b in range(0, len(contexts), batch_size):
            ids = torch.tensor(contexts[b : b + batch_size], dtype=torch.long)
            keep = keep_mask(lm, ids)
            with _capture_layer_inputs(lm) as layer_inputs:
                out = lm.model(input_ids=ids.to(lm.device), use_cache=False, output_hidden_states=False)
            clean_logits = out.logits
            t_ok = keep[:, 1:]
            clean_ce = float(F.cross_entropy(clean_logits[:, :-1][t_ok].float(), ids[:, 1:][t_ok].to(clean_logits.device),
                                             reduction="sum"))
            n_tok = int(t_ok.sum())
            del out, clean_logits
            for key, sae in saes.items():
                site = lm.site(sae.cfg.site, sae.cfg.layer)
                for name, fn in (("sae", lambda t, s=sae: s(t.float()).x_hat), ("zero", torch.zeros_like)):
                    with _replace_site(site, fn, keep):
                        h = _run_from(lm, site.layer, layer_inputs)
                    ce, _ = _ce(lm, h, ids, keep)
                    totals[key][name] += ce
                totals[key]["clean"] += clean_ce
                totals[key]["n"] += n_tok
                bar.update(ids.shape[0])
    bar.close()
    result = {}
    for key, t in totals.items():
        n = max(t["n"], 1)
        clean, spliced, zero = t["clean"] / n, t["sae"] / n, t["zero"] / n
        rec = (zero - spliced) / (zero - clean) if abs(zero - clean) > 1e-9 else float("nan")
        result[key] = {"ce_clean": clean, "ce_sae": spliced, "ce_zero": zero, "delta_lm_loss": spliced - clean,
                       "ce_recovered": rec, "n_ce_tokens": int(t["n"])}
    return result


def check_eval_args(eval_tokens: int, delta_contexts: int) -> None:
    """Refuse evaluation sizes that measure nothing (before anything is loaded or marked)."""
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise SaescopeError(f"--tokens must be a positive whole number, got {eval_tokens!r}")
    if isinstance(delta_contexts, bool) or not isinstance(delta_contexts, int) or delta_contexts < 0:
        raise SaescopeError(f"--ce-contexts must be 0 or more, got {delta_contexts!r}")


def evaluate(run, eval_tokens: int = 8192, delta_contexts: int = 4, progress: bool = True) -> dict:
    """Evaluate every SAE of `run` on held-out tokens; write eval.json and eval.png. Returns the metrics."""
    from .harvest import harvest

    check_eval_args(eval_tokens, delta_contexts)
    ids = run.sae_ids()
    if not ids:
        raise SaescopeError(f"run {run.root} has no SAEs to evaluate: train some first")
    lm = run.model
    saes = {i: run.load_sae(i).to(lm.device) for i in ids}
    for i, s in saes.items():
        site = lm.site(s.cfg.site, s.cfg.layer)
        if site.width != s.cfg.d_in:
            raise SaescopeError(f"SAE {i} reads {s.cfg.d_in} dims but {site.hook_name} has {site.width}: it belongs to another model")
    corpus = run.corpus()
    ctx_len = int(run.manifest.get("config", {}).get("ctx_len", 256))
    sites = sorted({(s.cfg.site, s.cfg.layer) for s in saes.values()}, key=lambda t: (t[1], t[0]))
    site_objs = [lm.site(k, layer) for k, layer in sites]
    acts: dict[str, list] = defaultdict(list)
    contexts: list[list[int]] = []

    def remember(it):
        for c in it:
            if len(contexts) < delta_contexts:
                contexts.append(c)
            yield c

    stream = remember(corpus.contexts(lm.tokenizer, part="heldout", ctx_len=ctx_len))
    for b in harvest(lm, stream, site_objs, batch_size=8, max_tokens=eval_tokens, progress=progress, desc="eval acts"):
        for k, v in b.acts.items():
            acts[k].append(v)
    acts = {k: torch.cat(v) for k, v in acts.items()}
    metrics = {}
    for i, s in saes.items():
        metrics[i] = {"site": s.cfg.site, "layer": s.cfg.layer, "width": s.cfg.width, "l0_target": s.cfg.l0,
                      "architecture": s.cfg.architecture, **fidelity(s, acts[f"{s.cfg.site}/{s.cfg.layer}"])}
    if delta_contexts > 0:
        for i, d in delta_lm_loss(lm, saes, contexts, progress=progress).items():
            metrics[i].update(d)
    result = {"model": run.manifest["model"], "eval_tokens": int(next(iter(acts.values())).shape[0]),
              "heldout": True, "saes": metrics}
    write_json(run.root / "eval.json", result)
    plot_eval(result, run.root / "eval.png")
    return result


def plot_eval(result: dict, path) -> None:
    """Metrics by layer, one line per (site, width, L0 target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("l0", "L0 (held-out)"), ("fvu", "FVU"), ("delta_lm_loss", "ΔLM loss (nats)"),
              ("ce_recovered", "CE loss recovered"), ("dead_fraction", "dead fraction"), ("dense_fraction", "dense fraction")]
    groups: dict[str, list] = defaultdict(list)
    for m in result["saes"].values():
        groups[f"{m['site']} w{m['width']} L0*{m['l0_target']:g}"].append(m)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for name, ms in sorted(groups.items()):
            ms = sorted(ms, key=lambda m: m["layer"])
            ys = [m.get(key, math.nan) for m in ms]
            ax.plot([m["layer"] for m in ms], ys, marker="o", label=name)
            if key == "l0":
                ax.plot([m["layer"] for m in ms], [m["l0_target"] for m in ms], ls="--", color="gray", lw=1)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{result['model']}: {result['eval_tokens']:,} held-out tokens")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


__all__ = ["evaluate", "fidelity", "delta_lm_loss", "plot_eval"]
