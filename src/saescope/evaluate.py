"""Fidelity of every SAE in a run: L0, FVU, dead/dense, ΔLM loss, KL, CE recovered, with standard errors.

Two distributions: the held-out split of the run's corpus, and a corpus the run never trained on
(`--other`, default ``pydoc``: Python's reference manual), side by side in eval.json and eval.png.
BOS/EOS/pad positions are excluded from every metric: the SAE is spliced in only at ordinary positions
and CE is measured only on ordinary target tokens.

Cost (the 262k-token LM head dominates): per batch of contexts one clean pass, stopped before the head,
captures every layer's inputs and is shared by all SAEs; each SAE re-runs the model only from its layer
on; the zero-ablation pass runs once per site (on every ZERO_EVERY-th batch; it only feeds CE recovered);
the head's log-softmax runs once per variant per scored token, on PER_CONTEXT random targets per context.
Standard errors are over contexts (a context's tokens are correlated), delta method for ratios.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SaescopeError
from .fsio import atomic_path, read_json, write_json
from .harvest import capture, capture_layer_inputs, keep_mask, replace_site, run_captured, run_from
from .models import LoadedModel, Site
from .runs import Run, as_run, holds_run
from .sae import SAE

DENSE_FRACTION = 0.1
CE_TOKENS = 768  # scored held-out target tokens per SAE for ΔLM / KL / CE recovered (default run; see RESULTS.md)
PER_CONTEXT = 64  # scored targets drawn per context: more contexts for the same head cost, smaller SE
ZERO_EVERY = 4  # the zero-ablation pass (for CE recovered only) runs on every 4th batch of 4 contexts
OTHER = "pydoc"  # the second held-out distribution: a corpus the default run never trains on


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


def _pick_targets(keep: torch.Tensor, per_context: int | None, gen: torch.Generator) -> torch.Tensor:
    """(batch, seq-1) mask of the target positions scored: ordinary targets, at most `per_context` of them
    per context, drawn uniformly at random (`gen`) so that scored tokens spread over many contexts."""
    ok = keep[:, 1:].clone()  # ordinary targets (the first one is predicted from BOS)
    if per_context is None:
        return ok
    for b in range(ok.shape[0]):
        idx = ok[b].nonzero().squeeze(1)
        if idx.numel() > per_context:
            ok[b, idx[torch.randperm(idx.numel(), generator=gen)[per_context:]]] = False
    return ok


def _score_head(lm: LoadedModel, clean: torch.Tensor, variants: dict, targets: torch.Tensor,
                chunk: int = 128) -> tuple[torch.Tensor, dict]:
    """Next-token CE of the clean residuals `clean` (n, d) and, for every variant (n, d), its CE and
    KL(clean ‖ variant), all in nats per token (n,). The head's log-softmax runs once per variant per token."""
    ce_clean = torch.empty(clean.shape[0])
    out = {name: (torch.empty(clean.shape[0]), torch.empty(clean.shape[0])) for name in variants}
    for i in range(0, clean.shape[0], chunk):
        t = targets[i : i + chunk, None].to(clean.device)
        lp = F.log_softmax(lm.logits_from_resid(clean[i : i + chunk]).float(), dim=-1)  # (c, vocab)
        ce_clean[i : i + chunk] = -lp.gather(1, t)[:, 0].cpu()
        p = lp.exp()
        neg_entropy = torch.einsum("nv,nv->n", p, lp)
        del lp
        for name, h in variants.items():
            lq = F.log_softmax(lm.logits_from_resid(h[i : i + chunk]).float(), dim=-1)
            out[name][0][i : i + chunk] = -lq.gather(1, t)[:, 0].cpu()
            out[name][1][i : i + chunk] = (neg_entropy - torch.einsum("nv,nv->n", p, lq)).cpu()
            del lq
    return ce_clean, out


def _batch_losses(lm: LoadedModel, saes: dict[str, SAE], ids: torch.Tensor, targets: torch.Tensor,
                  zero_sites: list[Site]) -> tuple[torch.Tensor, dict]:
    """One clean pass (stopped before the head) shared by every SAE; one zero-ablation pass per site in
    `zero_sites`; then the head once per variant on the `targets` (batch, seq-1) positions."""
    keep = keep_mask(lm, ids)
    last = lm.site("resid_post", lm.n_layers - 1)
    with capture_layer_inputs(lm) as layer_inputs, capture(lm, [last]) as store:
        run_captured(lm, ids)
    pick = targets.to(store[last.key].device)

    def spliced(site, fn):
        with replace_site(site, fn, keep):
            return run_from(lm, site.layer, layer_inputs)[:, :-1][pick]

    variants = {("sae", k): spliced(lm.site(s.cfg.site, s.cfg.layer), lambda t, s=s: s(t.float()).x_hat)
                for k, s in saes.items()}
    variants.update({("zero", site.key): spliced(site, torch.zeros_like) for site in zero_sites})
    tgt_ids = ids[:, 1:][targets]
    return _score_head(lm, store[last.key][:, :-1][pick], variants, tgt_ids)


def ratio_se(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Σa / Σb over clusters (contexts) and its standard error: the delta-method (linearised) estimate
    for a ratio of sums over i.i.d. clusters, sqrt(C/(C-1) Σ_c (a_c − R b_c)²) / Σb. NaN below 2 clusters."""
    a, b = a.double(), b.double()
    total = float(b.sum())
    if total == 0:
        return math.nan, math.nan
    r = float(a.sum()) / total
    c = a.numel()
    se = math.sqrt(c / (c - 1) * float((a - r * b).pow(2).sum())) / abs(total) if c > 1 else math.nan
    return r, se


def delta_lm_loss(lm: LoadedModel, saes: dict[str, SAE], contexts: list[list[int]], batch_size: int = 4,
                  per_context: int | None = None, zero_every: int = 1, seed: int = 0,
                  progress: bool = True) -> dict[str, dict]:
    """ΔLM loss, KL(clean ‖ spliced) and CE recovered vs zero-ablation of each SAE, with standard errors.

    Scores `per_context` random ordinary targets per context (all when None); the zero-ablation pass runs
    on every `zero_every`-th batch, once per site (never when 0: then no CE recovered). Standard errors are
    over contexts (tokens of one context are correlated, so the context is the independent unit).
    """
    gen = torch.Generator().manual_seed(seed)
    sums: dict = defaultdict(lambda: defaultdict(list))  # (kind, key) -> quantity -> per-context sums
    zero_sites = {(s.cfg.site, s.cfg.layer): lm.site(s.cfg.site, s.cfg.layer) for s in saes.values()}
    bar = tqdm(total=len(contexts), desc="eval ΔLM", unit="ctx", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for n_batch, b in enumerate(range(0, len(contexts), batch_size)):
            ids = torch.tensor(contexts[b : b + batch_size], dtype=torch.long)
            targets = _pick_targets(keep_mask(lm, ids), per_context, gen)
            zeros = list(zero_sites.values()) if zero_every and n_batch % zero_every == 0 else []
            _accumulate(sums, targets, *_batch_losses(lm, saes, ids, targets, zeros), zeroed=bool(zeros))
            bar.update(ids.shape[0])
    bar.close()
    return {key: _summarise(sums[("sae", key)], sums.get(("zero", lm.site(s.cfg.site, s.cfg.layer).key)))
            for key, s in saes.items()}


def _accumulate(sums: dict, targets: torch.Tensor, ce_clean: torch.Tensor, out: dict, zeroed: bool) -> None:
    """Add one batch's per-token losses to `sums` as per-context sums (one entry per context of the batch)."""
    ctx = targets.nonzero()[:, 0]  # the context of each scored token, in the order the tokens were scored

    def per_ctx(v):
        return torch.zeros(targets.shape[0], dtype=torch.float64).index_add_(0, ctx, v.double())

    n_ctx, clean_ctx = per_ctx(torch.ones_like(ce_clean)), per_ctx(ce_clean)
    for (kind, key), (ce, kl) in out.items():
        acc = sums[(kind, key)]
        for name, v in (("n", n_ctx), ("clean", clean_ctx), ("ce", per_ctx(ce)), ("kl", per_ctx(kl))):
            acc[name].append(v)
        if zeroed and kind == "sae":
            acc["ce_zeroed"].append(acc["ce"][-1])


def _summarise(sae: dict, zero: dict | None) -> dict:
    """Per-SAE means and standard errors from per-context sums (zero: the site's zero-ablation sums)."""
    n, clean, ce, kl = (torch.cat(sae[k]) for k in ("n", "clean", "ce", "kl"))
    dlm, dlm_se = ratio_se(ce - clean, n)
    kl_mean, kl_se = ratio_se(kl, n)
    out = {"ce_clean": ratio_se(clean, n)[0], "ce_sae": ratio_se(ce, n)[0], "delta_lm_loss": dlm,
           "delta_lm_loss_se": dlm_se, "kl": kl_mean, "kl_se": kl_se, "n_ce_tokens": int(n.sum()),
           "n_ce_contexts": int((n > 0).sum())}
    if zero:  # the zero pass ran on some batches only: the SAE's CE on those same contexts is "ce_zeroed"
        zn, zclean, zce, sae_ce = (torch.cat(v) for v in (zero["n"], zero["clean"], zero["ce"], sae["ce_zeroed"]))
        rec, rec_se = ratio_se(zce - sae_ce, zce - zclean)
        out.update({"ce_zero": ratio_se(zce, zn)[0], "ce_recovered": rec, "ce_recovered_se": rec_se,
                    "n_zero_tokens": int(zn.sum())})
    return out


def check_eval_args(eval_tokens: int, ce_tokens: int) -> None:
    """Refuse evaluation sizes that measure nothing (before anything is loaded or marked)."""
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise SaescopeError(f"--tokens must be a positive whole number, got {eval_tokens!r}")
    if isinstance(ce_tokens, bool) or not isinstance(ce_tokens, int) or ce_tokens < 0:
        raise SaescopeError(f"--ce-tokens must be 0 (skip ΔLM) or a positive whole number, got {ce_tokens!r}")


def _measure(lm: LoadedModel, saes: dict[str, SAE], contexts, eval_tokens: int, ce_tokens: int,
             progress: bool, desc: str) -> tuple[dict, int]:
    """Fidelity on the first `eval_tokens` ordinary tokens of `contexts`, and ΔLM/KL/CE recovered on
    `ce_tokens` scored targets per SAE (PER_CONTEXT per context) from the start of the same stream."""
    from .harvest import harvest

    want = math.ceil(ce_tokens / PER_CONTEXT)
    kept: list[list[int]] = []

    def remember(it):
        for c in it:
            if len(kept) < want:
                kept.append(c)
            yield c

    it = iter(contexts)
    sites = sorted({(s.cfg.site, s.cfg.layer) for s in saes.values()}, key=lambda t: (t[1], t[0]))
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for b in harvest(lm, remember(it), [lm.site(k, layer) for k, layer in sites], batch_size=8,
                     max_tokens=eval_tokens, progress=progress, desc=f"eval acts ({desc})"):
        for k, v in b.acts.items():
            parts[k].append(v)
    kept.extend(itertools.islice(it, want - len(kept)))
    acts = {k: torch.cat(v) for k, v in parts.items()}
    metrics = {i: fidelity(s, acts[f"{s.cfg.site}/{s.cfg.layer}"]) for i, s in saes.items()}
    if want > 0:
        for i, d in delta_lm_loss(lm, saes, kept, per_context=PER_CONTEXT, zero_every=ZERO_EVERY,
                                  progress=progress).items():
            metrics[i].update(d)
    return metrics, int(next(iter(acts.values())).shape[0])


def other_corpus(run, other: str):
    """The never-trained-on corpus, refused when it is the run's own training corpus."""
    from .corpus import Corpus

    trained = run.manifest.get("corpus", {}).get("source")
    if str(other) == str(trained):
        raise SaescopeError(f"--other '{other}' is the corpus this run trained on: give text it never read "
                            "(e.g. --other pydoc), or --other none")
    return Corpus(other)


@holds_run("eval")
def evaluate(run: Run | str | os.PathLike, eval_tokens: int = 8192, ce_tokens: int = CE_TOKENS, other: str | None = OTHER,
             other_ce_tokens: int | None = None, progress: bool = True) -> dict:
    """Evaluate every SAE of `run` on held-out tokens of its corpus and, unless `other` is None, on a
    corpus it never trained on (all of it; `other_ce_tokens` scored targets, by default a third of
    `ce_tokens`); write eval.json and eval.png. Returns the metrics."""
    check_eval_args(eval_tokens, ce_tokens)
    if other_ce_tokens is not None:
        check_eval_args(eval_tokens, other_ce_tokens)
    run = as_run(run)
    ids = run.sae_ids()
    if not ids:
        raise SaescopeError(f"run {run.root} has no SAEs to evaluate: train some first")
    extra = other_corpus(run, other) if other else None
    lm = run.model
    saes = {i: run.load_sae(i).to(lm.device) for i in ids}
    for i, s in saes.items():
        site = lm.site(s.cfg.site, s.cfg.layer)
        if site.width != s.cfg.d_in:
            raise SaescopeError(f"SAE {i} reads {s.cfg.d_in} dims but {site.hook_name} has {site.width}: it belongs to another model")
    ctx_len = int(run.manifest.get("config", {}).get("ctx_len", 256))
    corpus = run.corpus()
    metrics, n_tokens = _measure(lm, saes, corpus.contexts(lm.tokenizer, part="heldout", ctx_len=ctx_len),
                                 eval_tokens, ce_tokens, progress, "held-out")
    dists = {"heldout": {"corpus": corpus.describe(), "part": "heldout", "tokens": n_tokens}}
    for i, s in saes.items():
        metrics[i] = {"site": s.cfg.site, "layer": s.cfg.layer, "width": s.cfg.width, "l0_target": s.cfg.l0,
                      "architecture": s.cfg.architecture, **metrics[i]}
    if extra is not None:
        other_n = math.ceil(ce_tokens / 3) if other_ce_tokens is None else other_ce_tokens
        more, n_other = _measure(lm, saes, extra.contexts(lm.tokenizer, part="all", ctx_len=ctx_len),
                                 eval_tokens, other_n, progress, str(other))
        dists["other"] = {"corpus": extra.describe(), "part": "all", "tokens": n_other}
        for i in saes:
            metrics[i]["other"] = more[i]
    result = {"model": run.manifest["model"], "eval_tokens": n_tokens, "heldout": True, "distributions": dists,
              "ce": {"tokens_per_sae": ce_tokens, "targets_per_context": PER_CONTEXT, "zero_every": ZERO_EVERY,
                     "se": "standard errors over contexts (a context's tokens are correlated), delta method "
                           "for ratios; KL(clean || spliced) in nats per target token"},
              "saes": metrics}
    write_json(run.root / "eval.json", result)
    plot_eval(result, run.root / "eval.png")
    return result


PANELS = [("l0", "L0"), ("fvu", "FVU"), ("delta_lm_loss", "ΔLM loss (nats, ± SE)"), ("kl", "KL(clean ‖ spliced), nats"),
          ("ce_recovered", "CE loss recovered"), ("dead_fraction", "dead fraction"), ("dense_fraction", "dense fraction")]


def drop_from_eval(run_root: Path, sae_id: str) -> bool:
    """Remove an SAE's metrics from the run's eval.json (listed under "replaced") and redraw eval.png
    without them; False when eval.json has none."""
    path = run_root / "eval.json"
    if not path.is_file():
        return False
    result = read_json(path, what="eval results")
    if sae_id not in (result.get("saes") or {}):
        return False
    del result["saes"][sae_id]
    result["replaced"] = sorted({*result.get("replaced", []), sae_id})
    write_json(path, result)
    png = run_root / "eval.png"
    if result["saes"] and png.is_file():
        plot_eval(result, png)
    else:
        png.unlink(missing_ok=True)
    return True


def plot_eval(result: dict, path) -> None:
    """Metrics by layer, one colour per (site, width, L0 target); held-out split solid, the other text dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list] = defaultdict(list)
    for m in result["saes"].values():
        groups[f"{m['site']} w{m['width']} L0*{m['l0_target']:g}"].append(m)
    other = result.get("distributions", {}).get("other")
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for n, (name, ms) in enumerate(sorted(groups.items())):
            ms = sorted(ms, key=lambda m: m["layer"])
            layers = [m["layer"] for m in ms]
            for dist, ls, ms_d in (("held-out", "-", ms), ("other", "--", [m.get("other", {}) for m in ms])):
                ys = [m.get(key, math.nan) for m in ms_d]
                err = [m.get(f"{key}_se", math.nan) for m in ms_d]
                if all(math.isnan(y) for y in ys):
                    continue
                ax.errorbar(layers, ys, yerr=err, marker="o", ls=ls, color=f"C{n}", capsize=2, label=f"{name} ({dist})")
            if key == "l0":
                ax.plot(layers, [m["l0_target"] for m in ms], ls=":", color="gray", lw=1)
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes.flat[-1].axis("off")
    axes.flat[-1].legend(*axes.flat[0].get_legend_handles_labels(), fontsize=8, loc="center")
    where = f"; dashed: {other['corpus']['source']} (never trained on, {other['tokens']:,} tokens)" if other else ""
    fig.suptitle(f"{result['model']}: {result['eval_tokens']:,} held-out tokens{where}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


__all__ = ["evaluate", "fidelity", "delta_lm_loss", "plot_eval", "ratio_se"]
