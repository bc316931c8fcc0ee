"""The end-to-end phase: the last `TrainConfig.e2e_fraction` of the tokens, with each SAE spliced into the model.

What the model does with an SAE's reconstruction is what users measure (ΔLM loss, KL), and a small reconstruction
error can still move the next-token distribution a lot. So after the main phase (train.py: reconstruction), the same
trainers (λ controller for the target L0, lr schedule) go on for the rest of the tokens with

    loss = reconstruction + λ·(L0 term) + e2e_kl_coef · KL(p_clean ‖ p_spliced)

where p_spliced is the model's next-token distribution with the SAE's reconstruction x̂ replacing the activation at
its site (ordinary positions only; BOS/EOS/pad stay clean), through the rest of the frozen model to the logits. The
gradient reaches the SAE's parameters through x̂ only. The phase starts Adam's moments over (the main phase's are
scaled to its small reconstruction gradients: kept, they made the first KL steps move each weight 8–25× the lr and
the SAEs diverged; `SAETrainer.start_end_to_end`) and runs at `e2e_lr` 0.1× the peak lr, where the cosine ended.
With the thresholds frozen the L0 term gives no gradient (its straight-through gradient reaches θ only).

One step = one or more whole contexts (≈ batch_size tokens). Per step, one clean pass (stopped before the head,
harvest.capture) records every layer's inputs and every SAE's site for all SAEs; the clean head runs once over the
whole vocabulary to choose the scored vocabulary (the union of the top `e2e_vocab` tokens at every position); then
each SAE re-runs the model from its layer with autograd (harvest.run_from, splicing through harvest.replace_site, the
same mechanism as the eval stage's ΔLM) and the head only on that vocabulary. Single process, live model only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SaescopeError
from .harvest import capture, capture_layer_inputs, keep_mask, replace_site, run_captured, run_from
from .models import LoadedModel, Site
from .train import MultiTrainer, SAETrainer

HEAD_CHUNK = 64  # positions per full-vocabulary head call when picking the scored vocabulary (262k logits each)


class CleanPass(NamedTuple):
    """What one clean forward pass gives every SAE of a step."""

    keep: torch.Tensor  # (batch, seq) ordinary positions: spliced, and their next-token distributions scored
    acts: dict[str, torch.Tensor]  # site key -> (n, d) activations at the ordinary positions, in `keep` order
    layer_inputs: dict  # layer index -> (args, kwargs) of its call, to re-run the model from any layer
    resid: dict[int, torch.Tensor]  # layer -> (batch, seq, d) its output, for the resid_post sites
    vocab: torch.Tensor  # (V,) the scored vocabulary
    log_p: torch.Tensor  # (n, V) the clean model's log-probabilities over `vocab`, renormalised there


def clean_pass(lm: LoadedModel, ids: torch.Tensor, sites: list[Site], top: int) -> CleanPass:
    """Run the clean model on `ids` (batch, seq) once for every SAE of a step."""
    last = lm.site("resid_post", lm.n_layers - 1)
    keep = keep_mask(lm, ids)
    with capture_layer_inputs(lm) as layer_inputs, capture(lm, [*sites, last]) as store:
        run_captured(lm, ids)
    on = keep.to(store[last.key].device)
    h = store[last.key][on]  # (n, d) the clean last residuals at ordinary positions
    with torch.no_grad():
        picks = [lm.logits_from_resid(h[i : i + HEAD_CHUNK]).topk(min(top, lm.unembedding().shape[0])).indices
                 for i in range(0, h.shape[0], HEAD_CHUNK)]
        vocab = torch.cat(picks).unique()
        log_p = F.log_softmax(lm.logits_from_resid(h, vocab).float(), dim=-1)
    acts = {s.key: store[s.key][on].float() for s in sites}
    resid = {s.layer: store[s.key] for s in sites if s.kind == "resid_post"}
    return CleanPass(keep, acts, dict(layer_inputs), resid, vocab, log_p)


def spliced_kl(lm: LoadedModel, clean: CleanPass, site: Site, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean KL(p_clean ‖ p_spliced) over the scored positions, with x_hat (n, d) (model units, with autograd)
    replacing the activation at `site` on the ordinary positions; differentiable in x_hat. A resid_post site
    re-runs the model from the next layer on; the others re-run their own layer with the site replaced."""
    keep = clean.keep.to(x_hat.device)

    def fill(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        out[keep] = x_hat.to(t.dtype)
        return out

    if site.kind == "resid_post":  # the layer's output is the next layer's input: start there
        h = run_from(lm, site.layer + 1, clean.layer_inputs, fill(clean.resid[site.layer]))
    else:
        with replace_site(site, fill, keep):
            h = run_from(lm, site.layer, clean.layer_inputs)
    log_q = F.log_softmax(lm.logits_from_resid(h[keep], clean.vocab).float(), dim=-1)
    return (clean.log_p.exp() * (clean.log_p - log_q)).sum(-1).mean()


def end_to_end(lm: LoadedModel, trainer: MultiTrainer, contexts: Iterable[list[int]], progress: bool = True) -> None:
    """Train every SAE of `trainer` from its `tokens_done` to `train.tokens` end to end, on `contexts` (the
    training stream after those the main phase used). Checkpoints and resumes as the main phase."""
    cfg = trainer.train
    if trainer.tokens_done >= cfg.tokens:
        return
    if not trainer.world.trivial:
        raise SaescopeError("the end-to-end phase runs in a single process: launch without torchrun, or use --e2e 0")
    sites = {t.key: lm.site(t.cfg.site, t.cfg.layer) for t in trainer.trainers}
    unique = list({s.key: s for s in sites.values()}.values())

    def kl_term(clean: CleanPass):
        def extra(t: SAETrainer, x_hat: torch.Tensor) -> torch.Tensor:
            return cfg.e2e_kl_coef * spliced_kl(lm, clean, sites[t.key], x_hat * t.scale)

        return extra

    bar = tqdm(total=cfg.tokens - cfg.main_tokens, initial=max(0, trainer.tokens_done - cfg.main_tokens),
               unit="tok", unit_scale=True, desc="end-to-end", disable=not progress, dynamic_ncols=True)
    batch: list[list[int]] = []
    try:
        for c in contexts:
            batch.append(c)
            if len(batch) * len(c) < cfg.batch_size:
                continue
            clean = clean_pass(lm, torch.tensor(batch, dtype=torch.long), unique, cfg.e2e_vocab)
            n_before, batch = trainer.tokens_done, []
            if not clean.keep.any():
                continue
            trainer.step_spliced(clean.acts, len(clean.keep), kl_term(clean))
            bar.update(trainer.tokens_done - n_before)
            if trainer.tokens_done >= cfg.tokens:
                break
    finally:
        bar.close()
    trainer.poll_all()
    if trainer.tokens_done < cfg.tokens:
        raise SaescopeError(f"the corpus ran out after {trainer.tokens_done:,} training tokens (asked for "
                            f"{cfg.tokens:,}): use a larger corpus or a smaller --tokens")
