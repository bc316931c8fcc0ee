"""Train many SAEs from one activation stream: the model runs once per token.

`MultiTrainer` owns one `SAETrainer` per SAE (layer × site × width × target L0)
and feeds each batch of harvested activations to every SAE on that site.

The recipe (Gemma Scope, adapted so that it also works for a 100k-token CPU run):
- inputs divided by one scalar per SAE so that E‖x‖² = 1 (measured on the first
  batch); b_dec starts at the first batch's mean and is subtracted before the
  encoder; both are folded into the saved weights;
- JumpReLU thresholds start at each feature's (1 − L0*/width) quantile on the first
  batch, so L0 starts on target instead of drifting there over thousands of steps;
- sparsity: λ·L0/L0* (STE through the thresholds) with λ adapted every step by an
  integral controller on log λ, so L0 settles on its target for any token budget
  (the Gemma Scope 2 quadratic target-L0 penalty has zero pull at the target and
  settles above it when the run is short);
- batches of 256 tokens below 1B tokens (more steps), 4,096 from 1B on;
- TopK short runs (< 1B tokens): schedule-free Adam (β1 = 0, β2 = 0.999, interpolation 0.9; the
  running average of the iterates is what gets saved), lr 8e-3 at width ≤ 4096, b_enc/b_dec at
  3% of it (biases in units of E‖x‖² = 1 that move at the weights' rate wreck the early layers'
  reconstructions; measured in bench/RESULTS.md), lr warm-up from 0.1·lr over the first 5% of steps;
- JumpReLU/BatchTopK/ReLU short runs: Adam β = (0, 0.999), lr scaled to the width, b_enc/b_dec at 3%
  of it (at the full lr they set off divergences on Gemma layers 6/7/9), the same warm-up, then cosine
  decay to `lr_end`·lr;
- billions of tokens: the Gemma Scope recipe, Adam β = (0, 0.999) at 7e-5 for every parameter,
  the same warm-up then cosine decay;
- decoder rows unit-norm with the gradient component parallel to each row removed before the step;
- dead features (no firing in `dead_tokens`) get an auxiliary-k loss: the top
  pre-activations among dead features are asked to reconstruct the residual error;
- JumpReLU: every 16 steps until 90% of the tokens, dead features get their threshold back at the
  batch's (1 − L0*/width) quantile (`revive_dead`): on Gemma 3 270M's layers 0–2 most thresholds
  otherwise end far above anything their features see (bench/RESULTS.md).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from tqdm.auto import tqdm

from .distributed import SINGLE, World
from .errors import SaescopeError
from .kernels import (
    Active,
    code_grad_probe,
    dense_gate,
    dense_jump_relu,
    dense_pre_acts,
    gather_pre_acts,
    sparse_decode,
)
from .sae import SAE, JumpReLUFn, SAEConfig, StepFn


@dataclass
class TrainConfig:
    """How the SAEs learn. Field docstrings are the CLI help."""

    tokens: int = 100_000
    """Training tokens per SAE (all SAEs see the same tokens)."""
    batch_size: int = 0
    """Tokens per optimisation step; 0 = auto: 256 below 1B tokens (more steps: what a short budget needs most),
    4,096 (Gemma Scope's) from 1B on."""
    lr: float = 0.0
    """Peak learning rate; 0 = auto: adam 4e-3/sqrt(width/1024) capped to [1e-4, 2e-3], sf-adam 8e-3·sqrt(4096/width)
    capped at 8e-3; 7e-5 from 1B tokens on."""
    lr_end: float = 0.1
    """adam/signum: final learning rate as a fraction of the peak (cosine decay after the warm-up)."""
    optimizer: str = "auto"
    """auto (sf-adam for TopK below 1B tokens, adam otherwise), adam (β1 = 0, cosine decay), sf-adam
    (schedule-free around Adam β1 = 0: constant lr, the running average is exported), signum
    (sign of the momentum) or sf-signum (schedule-free sign descent: sparsify's optimiser)."""
    betas: tuple[float, float] = (0.0, 0.999)
    """adam: (β1, β2); sf-adam uses β2 only."""
    bias_lr: float = 0.0
    """Learning rate of b_enc and b_dec as a fraction of lr; 0 = auto (0.03 below 1B tokens or with sf-*, else 1)."""
    threshold_lr: float = 1.0
    """Learning rate of the JumpReLU thresholds as a fraction of lr."""
    momentum: float = 0.9
    """signum: momentum; sf-*: weight of the running average in the point where gradients are taken."""
    eps: float = 0.01
    """JumpReLU STE bandwidth, in units where E‖x‖² = 1."""
    lambda_init: float = 0.001
    """Initial sparsity coefficient (then adapted towards the target L0)."""
    lambda_rate: float = 0.1
    """Integral gain of the L0 controller (log λ per step per unit relative L0 error)."""
    aux_coef: float = 1 / 32
    """Weight of the auxiliary-k loss on dead features (0 disables it)."""
    dead_tokens: int = 0
    """A feature is dead after this many tokens without firing; 0 = auto (tokens/5, at most 10M)."""
    revive_dead: bool = True
    """Every REVIVE_EVERY steps until `revive_until` of the tokens, give dead features their threshold back at the
    batch's (1 − L0*/width) quantile of their own pre-activations, as at the start (their encoder and decoder, which
    the auxiliary loss keeps training, stay). Without it most of layers 0–2's features of Gemma 3 270M never fire."""
    revive_until: float = 0.9
    """Fraction of the tokens after which dead features are no longer revived."""
    floor_tokens: int = 2048
    """JumpReLU: a feature that has not fired for this many tokens gets its threshold lowered by `floor_decay` per step
    until it fires again, for the whole run (0 disables): a floor under each feature's firing rate. Without it 12–21%
    of layers 1, 2 and 4's features of Gemma 3 270M fire less than once in 10k held-out tokens."""
    floor_decay: float = 0.05
    """Relative decrease per step of a silent feature's threshold (see `floor_tokens`); below 1."""
    bf16_matmuls: bool = True
    """On a GPU, the step's matrix products in bf16 with fp32 accumulation (torch.autocast), as sparsify's: weights,
    gradients, optimiser state, the JumpReLU thresholds (and every comparison with them) and the losses stay fp32.
    False: TF32 products. On an H200, 18 SAEs of width 16,384 trained 1.39× faster than with TF32 at the same held-out
    FVU and L0 (bench/RESULTS.md); ignored on the CPU."""
    cuda_graphs: bool = True
    """On a GPU, replay each SAE's whole step (forward, backward, Adam, controller) as one CUDA graph, captured on the
    step's second occurrence of a batch size: the ~100 small kernel launches of a step cost the host more time than
    the GPU needs for them (bench/RESULTS.md). Off for data parallel, the end-to-end phase and other optimisers."""
    e2e_fraction: float = 0.0
    """Share of the tokens spent at the end in the end-to-end phase (endtoend.py): each SAE spliced into the model
    at its site and trained on KL(clean ‖ spliced next-token distribution) plus its reconstruction loss, one context
    per step. 0 = off. Needs the live model (not --cache) and a single process. On Gemma 3 270M at 0.05 it lowers
    ΔLM by 8–17% (layers 6/12/17, 16k tokens each, L0 within +6%; bench/RESULTS.md), and on 2 CPU cores
    an end-to-end token costs ~12× a reconstruction token (layers 6, 12, 17), so it stays off by default."""
    e2e_kl_coef: float = 1.0
    """End-to-end phase: weight of the KL (nats per scored token) against the reconstruction loss (normalised units,
    E‖x‖² = 1)."""
    e2e_lr: float = 0.1
    """End-to-end phase: constant learning rate as a fraction of the peak lr; 0.1 goes on from where the main phase's
    cosine decay ends (lr_end). Gemma 3 270M layer 12, 20 steps with fresh Adam moments: 0.1 lowered held-out ΔLM
    1.76 → 1.48, 0.3 to 1.50, 1.0 raised it to 1.90 (bench/RESULTS.md)."""
    e2e_fresh_adam: bool = True
    """End-to-end phase: start Adam's moments over at its first step (`SAETrainer.start_end_to_end`). False keeps
    the main phase's, whose second moments are ~100× too small for the KL's gradients: Gemma 3 270M's SAEs diverged."""
    e2e_threshold_lr: float = 0.0
    """End-to-end phase: learning rate of the JumpReLU thresholds as a fraction of the phase's; 0 freezes them, so
    that the KL cannot buy fidelity with a higher L0 (tiny model: held-out L0 5.3 → 7.8 with them learning, 5.3 when
    frozen; the L0 controller acts through the thresholds, so it rests too)."""
    e2e_vocab: int = 32
    """End-to-end phase: the KL is taken over the union of the clean model's top `e2e_vocab` next tokens at every
    scored position of the step's context (renormalised there; ~2k tokens holding ~96% of the probability on
    Gemma 3 270M), not over the whole vocabulary, whose 262k-token head would cost ~100× more."""
    matryoshka: tuple[float, ...] = ()
    """Matryoshka SAE: nested prefixes of the dictionary as fractions of the width (e.g. 0.0625,0.25); the
    reconstruction loss is the mean of the full dictionary's and each prefix's (features 0..m−1 alone), so the first
    features learn to reconstruct on their own. Empty = off."""
    seed: int = 0
    checkpoint_every: int = 200
    """Steps between checkpoints."""

    def __post_init__(self):
        if self.tokens < 1:
            raise SaescopeError("--tokens must be positive")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise SaescopeError(f"--lr must be a positive number (or 0 for the automatic lr), got {self.lr}")
        for name in ("lr_end", "bias_lr", "threshold_lr", "momentum", "eps", "lambda_init", "lambda_rate",
                     "aux_coef", "revive_until", "floor_decay", "e2e_fraction", "e2e_kl_coef", "e2e_lr",
                     "e2e_threshold_lr", *(f"betas[{i}]" for i in range(len(self.betas)))):
            v = self.betas[int(name[6])] if name.startswith("betas") else getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise SaescopeError(f"training setting {name} must be a finite number ≥ 0, got {v}")
        if self.floor_decay >= 1 or self.floor_tokens < 0:
            raise SaescopeError(f"floor_decay must be below 1 and floor_tokens ≥ 0, got {self.floor_decay}, "
                                f"{self.floor_tokens}")
        if self.batch_size == 0:
            self.batch_size = 4096 if self.long_run else 256
        if self.batch_size < 2:
            raise SaescopeError("--batch-size must be at least 2")
        if self.optimizer not in OPTIMIZERS:
            raise SaescopeError(f"unknown optimizer '{self.optimizer}': choose one of {', '.join(OPTIMIZERS)}")
        if self.e2e_fraction > 1:
            raise SaescopeError(f"--e2e must be a fraction of the tokens between 0 and 1, got {self.e2e_fraction}")
        if self.e2e_vocab < 1:
            raise SaescopeError(f"training setting e2e_vocab must be at least 1, got {self.e2e_vocab}")
        self.matryoshka = tuple(float(f) for f in self.matryoshka)
        if any(not (math.isfinite(f) and 0 < f < 1) for f in self.matryoshka):
            raise SaescopeError(f"--matryoshka prefixes are fractions of the width between 0 and 1 (exclusive), "
                                f"got {','.join(map(str, self.matryoshka))}")

    @property
    def long_run(self) -> bool:
        """Billions of tokens: the Gemma Scope recipe (Adam, cosine decay, every parameter at lr)."""
        return self.tokens >= 1_000_000_000

    def optimizer_for(self, architecture: str) -> str:
        """auto: schedule-free Adam for short TopK runs. Not for the L0-controlled architectures: with it
        the L0 controller lost its target on the synthetic test data (JumpReLU, target 3: training L0 0.7–1.0),
        though it held on Gemma 3 270M (bench/RESULTS.md)."""
        if self.optimizer != "auto":
            return self.optimizer
        return "sf-adam" if architecture == "topk" and not self.long_run else "adam"

    def bias_lr_for(self, optimizer: str) -> float:
        """auto: 0.03 below 1B tokens (and with sf-*): in units where E‖x‖² = 1 biases that move at the weights'
        lr (2e-3) shift the input by ~5% of its norm per step; on Gemma 3 270M layers 6, 7 and 9 that set off
        a divergence (train FVU 0.7 → 224 in 3 steps) that killed 80% of the features (bench/RESULTS.md).
        1 (Gemma Scope) for the long-run recipe, whose lr is 7e-5."""
        return self.bias_lr or (0.03 if optimizer.startswith("sf-") or not self.long_run else 1.0)

    def lr_for(self, width: int, optimizer: str = "adam") -> float:
        if self.lr > 0:
            return self.lr
        if self.long_run:
            return 7e-5
        if optimizer.startswith("sf-"):
            return float(min(8e-3, 8e-3 * math.sqrt(4096 / width)))
        return float(min(2e-3, max(1e-4, 4e-3 / math.sqrt(width / 1024))))

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.tokens / self.batch_size))

    @property
    def main_tokens(self) -> int:
        """Tokens of the main (reconstruction) phase; the rest go to the end-to-end phase."""
        return self.tokens - round(self.e2e_fraction * self.tokens)

    @property
    def dead_after(self) -> int:
        return self.dead_tokens or min(10_000_000, max(self.batch_size, self.tokens // 5))


OPTIMIZERS = ("auto", "adam", "sf-adam", "signum", "sf-signum")
LAYOUT = 3  # checkpoint layout: 2 = Adam state of w_enc kept feature-major (width, d_in); 3 = parameter groups
AUX_ROWS = 64  # tokens per step that feed the auxiliary loss (64 vs 256: same FVU, fewer revived features, 13–15% faster steps)
AUX_K = 128  # dead features per token asked to explain the error
REVIVE_EVERY = 16  # steps between revivals of dead features
REVIVE_AFTER = 1.0  # revive features silent for this share of the dead window (`dead_after`)
THETA_MIN = 1e-4  # the smallest JumpReLU threshold a revival sets (normalised units)
REVIVE_SHARE = 0.5  # at most this many dead features per revival, as a share of the (global) batch's rows
POLL_EVERY = 16  # on a GPU, steps between host reads of a trainer's state (each read waits for the GPU's queue)
GRAPHS_MAX = 32  # CUDA graphs per SAE (one per batch size × aux on/off; the default corpus's chunks give ~10 sizes)


class Signum(torch.optim.Optimizer):
    """Sign of the momentum: every parameter moves by exactly lr per step (Bernstein et al. 2018)."""

    def __init__(self, params, lr: float, momentum: float = 0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            if group["momentum"] == 0:  # plain sign descent (sf-signum): no buffer to keep
                torch._foreach_add_(ps, torch._foreach_sign([p.grad for p in ps]), alpha=-group["lr"])
                continue
            for p in ps:
                if not self.state[p]:
                    self.state[p]["momentum"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum"] for p in ps]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, [p.grad for p in ps], alpha=1 - group["momentum"])
            torch._foreach_add_(ps, torch._foreach_sign(bufs), alpha=-group["lr"])


class ScheduleFree:
    """Schedule-free learning (Defazio et al. 2024) around a base optimiser.

    The base optimiser steps z, its own copy of the parameters; x is the lr²-weighted running
    average of z; the model's parameters hold y = (1 − β)·z + β·x, where the gradients are taken.
    Only y and z are stored: x = (y − (1 − β)·z)/β, so what the trainer does to y between steps
    (unit-norm decoder rows, clamped thresholds) carries into the average. No decay schedule:
    export x (`averaged`)."""

    def __init__(self, groups: list[dict], make_base, momentum: float):
        self.params = [list(g["params"]) for g in groups]
        self.z = [[p.detach().clone() for p in ps] for ps in self.params]
        self.base = make_base([{**g, "params": zs} for g, zs in zip(groups, self.z)])
        self.momentum = momentum
        self.weight_sum = 0.0

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for ps in self.params:
            for p in ps:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr, beta = self.base.param_groups[0]["lr"], self.momentum
        self.weight_sum += lr * lr
        c = lr * lr / self.weight_sum if self.weight_sum > 0 else 1.0
        # y' = (1 − β)z' + βx' with x' = (1 − c)x + cz' and x = (y − (1 − β)z)/β, as two lerps on y:
        # (1 − c)·y − (1 − c)(1 − β)·z + (1 − β + βc)·z'
        for ps, zs in zip(self.params, self.z):
            torch._foreach_lerp_(ps, zs, 1 - 1 / beta)
            for p, z in zip(ps, zs):
                z.grad = p.grad
        self.base.step()
        for ps, zs in zip(self.params, self.z):
            torch._foreach_lerp_(ps, zs, 1 - beta + beta * c)
            for z in zs:
                z.grad = None  # else the previous step's gradients stay alive beside the next backward's

    @torch.no_grad()
    def reset(self) -> None:
        """z = x = y (after the parameters were set from the data)."""
        for ps, zs in zip(self.params, self.z):
            torch._foreach_copy_(zs, ps)

    @torch.no_grad()
    def averaged(self, p: torch.Tensor) -> torch.Tensor:
        """x (the running average) of parameter p."""
        for ps, zs in zip(self.params, self.z):
            for q, z in zip(ps, zs):
                if q is p:
                    return torch.lerp(z, p, 1 / self.momentum)
        raise KeyError("not a parameter of this optimiser")

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "z": self.z, "weight_sum": self.weight_sum}

    def load_state_dict(self, d: dict) -> None:
        self.base.load_state_dict(d["base"])
        with torch.no_grad():
            for a, b in zip(self.z, d["z"]):
                torch._foreach_copy_(a, b)
        self.weight_sum = d["weight_sum"]


class _Forward(NamedTuple):
    """What a forward pass hands to `SAETrainer._learn`."""

    loss: torch.Tensor
    recon: torch.Tensor  # mean squared reconstruction error (normalised units)
    n_active: torch.Tensor  # how many codes of the batch are > 0 (L0 × batch)
    n_dead: int
    along: Callable[[], torch.Tensor]  # () -> (width,): each decoder row's gradient along itself, after backward
    x_hat: torch.Tensor  # (batch, d_in) the reconstruction (normalised units), for a loss added on top (end-to-end)


class StepStats(NamedTuple):
    """One step's values; the first three are 0-dim tensors on the trainer's device (`float()` reads them)."""

    loss: torch.Tensor
    fvu: torch.Tensor
    l0: torch.Tensor
    dead_fraction: float


@functools.cache
class _Graph(NamedTuple):
    """A captured step: replay `graph` after copying the batch into `x`; `stats` are its output tensors."""

    graph: Any  # torch.cuda.CUDAGraph
    x: torch.Tensor
    stats: StepStats


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large tensors every time (gradients of W×d, codes,
    the B×d reconstructions). By default glibc serves blocks it last saw freed above its adaptive
    threshold with fresh mmaps and trims the heap top beyond twice that, so many steps pay page faults
    and kernel zero-fills on tens of MB: 8–11% of a width-4096 step at batch 1,024 (bench/RESULTS.md).
    Process-wide, done once per process; a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's upper limit for it on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)


def _grad(p: torch.Tensor) -> torch.Tensor:
    """A parameter's gradient after backward (every SAE parameter gets one in a step)."""
    assert p.grad is not None
    return p.grad


@dataclass
class SAETrainer:
    """One SAE in training: the module (training form), its optimiser and controller state."""

    cfg: SAEConfig
    train: TrainConfig
    device: torch.device = torch.device("cpu")
    dense: bool | None = None
    """The step's kernels: sparse (kernels.py; the CPU's) or dense matrix products (a GPU's); None = by device."""
    sae: SAE = field(init=False)
    opt: torch.optim.Optimizer | ScheduleFree = field(init=False)
    scale: float = 0.0
    base_lr: float = 0.0  # peak learning rate
    step: int = 0
    since_fired: torch.Tensor = field(init=False)  # (width,) tokens since each feature last fired
    failed: str = ""
    e2e_start: int = -1  # the step at which the end-to-end phase began (`start_end_to_end`); -1 before it
    scratch: dict = field(default_factory=dict)  # reusable buffers, see _scratch_z
    # Running values kept as float64 tensors on the device, read on the host only when asked (`poll`, the
    # properties below): a host read waits for the GPU's queue to drain.
    _log_lambda: torch.Tensor = field(init=False)  # log of the sparsity coefficient λ (L0 controller)
    _batch_threshold: torch.Tensor = field(init=False)  # batchtopk: running min selected activation
    _ema: dict = field(init=False)  # "fvu", "l0": exponential moving averages of the training batches' values
    _bad: torch.Tensor = field(init=False)  # a loss was NaN/Inf since the last poll
    _n_dead: int = 0  # dead features at the last poll (every step on the CPU)
    world: World = SINGLE  # data parallel: the ranks that train this same SAE on their own rows
    # CUDA graphs of the whole step, by (batch size, auxiliary loss on): `_graph_step`
    _graphs: dict = field(default_factory=dict, init=False)
    _graph_seen: set = field(default_factory=set, init=False)
    graph_off: str = ""  # why graphs are off for this SAE (a capture failed), "" while they may be used

    def __post_init__(self):
        _keep_freed_memory()
        self.device = torch.device(self.device)
        self.dense = self.device.type == "cuda" if self.dense is None else self.dense
        gen = torch.Generator().manual_seed(self.train.seed + self.cfg.layer * 1009 + self.cfg.width)
        cfg = SAEConfig.from_json({**self.cfg.to_json(), "pre_bias": True})
        self.sae = SAE.init(cfg, generator=gen).to(self.device)  # the same initial weights on every device
        # w_enc (d_in, width) is held feature-major: the sparse encoder gradient comes out in that layout,
        # and Adam steps its contiguous (width, d_in) view — no transposing copy of a 2.6M-entry matrix per step
        self.sae.w_enc = torch.nn.Parameter(self.sae.w_enc.detach().T.contiguous().T)
        self._w_enc_t = self.sae.w_enc.detach().T  # shares storage with w_enc
        f64: dict[str, Any] = {"dtype": torch.float64, "device": self.device}
        self._log_lambda = torch.tensor(math.log(self.train.lambda_init), **f64)
        self._batch_threshold = torch.zeros((), **f64)
        self._ema = {"fvu": torch.tensor(math.nan, **f64), "l0": torch.tensor(math.nan, **f64)}
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.since_fired = torch.zeros(self.cfg.width, device=self.device)
        params = [self._w_enc_t if p is self.sae.w_enc else p for p in self.sae.parameters()]
        self._grad_params = params  # what the optimiser steps (data parallel: the gradients to all-reduce)
        opt = self.train.optimizer_for(self.cfg.architecture)
        lr = self.base_lr = self.train.lr_for(self.cfg.width, opt)
        groups: list[dict] = [{"params": [p for p in params if p.dim() == 2]},
                  {"params": [self.sae.b_enc, self.sae.b_dec], "lr_scale": self.train.bias_lr_for(opt)},
                  {"params": [self.sae.threshold], "lr_scale": self.train.threshold_lr, "role": "threshold"}]
        if opt.endswith("signum"):
            def make(gs):
                return Signum(gs, lr=lr, momentum=0.0 if opt.startswith("sf-") else self.train.momentum)
        else:
            def make(gs):
                b1, b2 = self.train.betas
                betas = (0.0, b2) if opt.startswith("sf-") else (b1, b2)
                # capturable on a GPU (a CUDA graph may step it): the same arithmetic, step counts on the device
                return torch.optim.Adam(gs, lr=lr, betas=betas, eps=1e-8, fused=True,
                                        capturable=self.device.type == "cuda")
        self.opt = ScheduleFree(groups, make, self.train.momentum) if opt.startswith("sf-") else make(groups)

    @property
    def key(self) -> str:
        return f"{self.cfg.site}/{self.cfg.folder_name}"

    @property
    def end_to_end(self) -> bool:
        """In the end-to-end phase (endtoend.py): its own lr, thresholds frozen, no CUDA graph."""
        return self.e2e_start >= 0

    def start_end_to_end(self) -> None:
        """Enter the end-to-end phase (once: a run resumed inside it reads `e2e_start` from its checkpoint). With
        `e2e_fresh_adam`, Adam's moments start over: its second moments are those of the main phase's converged
        reconstruction gradients, ~100× smaller than the KL's, so its first end-to-end steps moved each weight by
        8–25× the lr (Gemma 3 270M layer 12: W_dec by 4.7% of its norm in one step at 0.1× peak lr, 0.3% with
        fresh moments), and the SAEs diverged (bench/RESULTS.md). Adam's bias correction makes the fresh
        moments right from the first step."""
        if self.end_to_end:
            return
        self.e2e_start = self.step
        self._graphs.clear()  # (the phase steps eagerly; its fresh moments are new tensors)
        if self.train.e2e_fresh_adam and isinstance(self.opt, torch.optim.Adam):
            self.opt.state.clear()

    @property
    def log_lambda(self) -> float:
        return float(self._log_lambda)

    @property
    def batch_threshold(self) -> float:
        return float(self._batch_threshold)

    @property
    def ema(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._ema.items()}

    def poll(self) -> None:
        """Read what the host needs from the device (one wait): a NaN/Inf loss since the last poll fails this
        SAE; the count of dead features decides whether the next steps add the auxiliary loss."""
        if bool(self._bad):
            self.failed = f"{self.key}: loss became NaN/Inf by step {self.step}; this SAE stopped (the others go on)"
            raise RuntimeError(self.failed)
        self._n_dead = int((self.since_fired >= self.train.dead_after).sum())

    # ------------------------------------------------------------------ one step

    def _first_batch(self, x: torch.Tensor, n_rows: int) -> None:
        """Scale, b_dec and thresholds from the first batch (data parallel: the global batch of `n_rows`)."""
        w = self.world
        self.scale = float(w.row_mean(x.pow(2).sum(1), n_rows).sqrt())
        xn = x / self.scale
        sae = self.sae
        with torch.no_grad():
            sae.b_dec.copy_(w.row_mean(xn, n_rows))
            if sae.uses_threshold:
                z = (xn - sae.b_dec) @ sae.w_enc + sae.b_enc
                # θ = each feature's (1 − L0/width) quantile over the batch: the (m+1)-th largest value, so
                # that m = L0/width of the batch lie above it (topk: 20× faster than torch.quantile at 4,096)
                m = round(n_rows * self.cfg.l0 / self.cfg.width)
                theta = w.kth_largest(z, m + 1, n_rows)
                sae.threshold.copy_(theta.clamp_min(1e-4))
        if isinstance(self.opt, ScheduleFree):
            self.opt.reset()

    def lr_now(self) -> float:
        total = self.train.total_steps
        warm = max(1, min(1000, total // 20))
        base = self.base_lr
        if self.step < warm:
            return base * (0.1 + 0.9 * self.step / warm)
        if self.end_to_end:
            return base * self.train.e2e_lr
        if isinstance(self.opt, ScheduleFree):
            return base  # schedule-free: constant after the warm-up
        t = (self.step - warm) / max(1, total - warm)
        end = self.train.lr_end
        return base * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def _scratch_z(self, x: torch.Tensor) -> torch.Tensor:
        """The (batch, width) buffer for the pre-activations, reused from step to step (and shared by the SAEs of
        one MultiTrainer, which step one after another): a fresh one of 64 MB at batch 4,096 is fresh pages
        from the OS every step, which cost 5–8% of the step on CPU."""
        key = (x.shape[0], self.cfg.width, x.dtype, x.device)
        if key not in self.scratch:
            self.scratch[key] = torch.empty(key[:2], dtype=x.dtype, device=x.device)
        return self.scratch[key]

    def step_on(self, x: torch.Tensor, rows: tuple[int, int] | None = None,
                extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepStats:
        """One optimisation step on raw activations x (batch, d_in); `extra`(x̂ in normalised units) is added to the
        loss (the end-to-end phase's KL, endtoend.py).

        Data parallel: `rows` = (first_row, n_rows): x is rows first_row.. of the step's global batch of n_rows
        rows; every `self.world` call makes a batch statistic global (no-ops in a single process)."""
        if self.failed:
            raise RuntimeError(self.failed)
        rows = rows or (0, x.shape[0])
        if self.step == 0:
            self._first_batch(x, rows[1])
        stats = self._graph_step(x) if extra is None and self._graphable(x, rows) else None
        if stats is None:
            stats = self._step_body(x, rows, extra)
        if self._revival_due():  # (after the rate floor: the two commute, a revived feature's θ is set anew)
            self.revive_dead(x / self.scale, rows[1])
        return stats

    def _step_body(self, x: torch.Tensor, rows: tuple[int, int], extra=None, set_lr: bool = True) -> StepStats:
        """Forward, backward, optimiser, controller and rate floor: what a step runs eagerly or a graph captures."""
        xn = x / self.scale  # (batch, d_in), E‖xn‖² ≈ 1
        lam = self._log_lambda.exp().float()
        fwd = self._forward_dense(xn, lam, rows) if self.dense else self._forward_sparse(xn, lam, rows)
        if extra is not None:
            fwd = fwd._replace(loss=fwd.loss + extra(fwd.x_hat))
        stats = self._learn(xn, fwd, rows[1], set_lr)
        self.lower_silent_thresholds()
        return stats

    # ------------------------------------------------------------------ the step as a CUDA graph

    def _graphable(self, x: torch.Tensor, rows: tuple[int, int]) -> bool:
        return (self.train.cuda_graphs and bool(self.dense) and x.is_cuda and self.world.trivial
                and not self.end_to_end and not self.graph_off and self.step >= 1
                and type(self.opt) is torch.optim.Adam)

    def _graph_step(self, x: torch.Tensor) -> StepStats | None:
        """One step as a replay of a captured CUDA graph, or None (then the step runs eagerly). A batch size (and
        auxiliary loss on or off) runs eagerly the first time it comes — lazy initialisation and torch.compile's
        kernels must not happen during a capture —, is captured the second time, and replayed from then on; the
        replay costs the host a few launches instead of the step's ~100 (bench/RESULTS.md). The returned stats
        are the graph's own tensors, overwritten by its next replay."""
        B = x.shape[0]
        key = (B, self._aux_rows(B, self._n_dead, (0, B)) > 0)
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._graph_seen or len(self._graphs) >= GRAPHS_MAX:  # (a bound on their memory)
                self._graph_seen.add(key)
                return None
            try:
                graph = self._graphs[key] = self._capture(x)
            except Exception as err:  # a kernel that cannot be captured, an old driver: eager from now on
                self.graph_off = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                import logging

                logging.getLogger(__name__).warning("%s: CUDA graph capture failed (%s); stepping eagerly",
                                                    self.key, self.graph_off)
                return None
        self._set_lr()
        graph.x.copy_(x)
        graph.graph.replay()
        self.step += 1
        return graph.stats

    def _capture(self, x: torch.Tensor) -> _Graph:
        """Capture the step (forward, backward, Adam with its lr tensors, controller, rate floor) on a static copy of
        x. Nothing runs during a capture: the caller replays it for this step. One memory pool for all the SAEs of a
        MultiTrainer (their graphs replay one after another)."""
        for group in self.opt.param_groups:  # lr as a device tensor, filled before each replay
            if not torch.is_tensor(group["lr"]):
                group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        static_x = x.clone()
        pool = self.scratch.setdefault(("graph_pool", x.device), torch.cuda.graph_pool_handle())
        graph = torch.cuda.CUDAGraph()
        step, B = self.step, x.shape[0]
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(x.device)
        try:
            # thread_local: a prefetching thread may copy the next chunk meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                stats = self._step_body(static_x, (0, B), set_lr=False)
        finally:
            self.step = step  # the capture ran the Python, not the step
        return _Graph(graph, static_x, stats)

    # ------------------------------------------------------------------ dead features

    def _revival_due(self) -> bool:
        t = self.train
        return (t.revive_dead and self.cfg.architecture == "jump_relu"
                and self.step % REVIVE_EVERY == 0 and self.step * t.batch_size < t.revive_until * t.tokens)

    @torch.no_grad()
    def lower_silent_thresholds(self) -> None:
        """A floor under each JumpReLU feature's firing rate: θ of the features silent for `floor_tokens` shrinks by
        `floor_decay` per step until they fire again. Why: after the revivals the sparsity gradient keeps pushing
        rarely useful features' θ up until they stop firing, and a silent feature gets no gradient on θ that could
        bring it back: on layers 1, 2 and 4 of Gemma 3 270M 12–21% of the features ended firing less than once in
        10k held-out tokens, most of them alive in training (bench/RESULTS.md). One elementwise product per step;
        `since_fired` is global, so every data-parallel rank does the same."""
        t = self.train
        if t.floor_tokens > 0 and self.cfg.architecture == "jump_relu":
            silent = self.since_fired >= t.floor_tokens
            self.sae.threshold.mul_(torch.where(silent, 1.0 - t.floor_decay, 1.0))

    @torch.no_grad()
    def revive_dead(self, xn: torch.Tensor, n_rows: int) -> int:
        """Re-initialise dead features' thresholds (xn: this rank's rows of a global batch of `n_rows`, normalised
        units); returns how many. Why: on Gemma 3 270M's early layers a few huge tokens dominate the first batch,
        and most features' θ end up far above anything they see (median max z/θ 0.24 on layer 0's dead features,
        bench/RESULTS.md), while their encoder norms and decoder rows look like live ones'. Each gets θ at the
        batch's (m+1)-th largest pre-activation, m = n_rows·L0*/width, as at the start, and a fresh optimiser state
        for θ; one whose pre-activations are nearly all ≤ 0 also gets its b_enc moved up (below). At most
        REVIVE_SHARE·n_rows per call, the longest silent first."""
        sae = self.sae
        n_quiet = int((self.since_fired >= REVIVE_AFTER * self.train.dead_after).sum())
        feats = self.since_fired.topk(min(n_quiet, max(1, int(REVIVE_SHARE * n_rows)))).indices  # longest silent first
        if len(feats) == 0:
            return 0
        x = self.world.all_rows(xn, n_rows)  # (n_rows, d_in): the global batch, the same on every rank
        z = (x - sae.b_dec) @ self._w_enc_t[feats].T + sae.b_enc[feats]  # (n_rows, n)
        m = round(n_rows * self.cfg.l0 / self.cfg.width)
        q = z.topk(min(m + 1, n_rows), dim=0).values[-1]  # (n,) the (m+1)-th largest pre-activation
        # A feature whose pre-activations are (nearly) all ≤ 0 fires at no θ > 0. At a high lr (Adam with
        # β2 = 0.999 can step a rarely firing feature by up to 1/√(1−β2) ≈ 32× lr) features sink there, with or
        # without the rate floor: at lr 4e-3, batch 4,096, width 16,384, 13,551 of the 14,586 dead features of
        # layer 7 had max z ≤ 0 on held-out text (bench/RESULTS.md, "GPU, session 17"). Such a feature's b_enc
        # moves up so that its m largest pre-activations come out above the live features' median θ.
        low = q < THETA_MIN
        if bool(low.any()):
            live = self.since_fired < self.train.dead_after
            ref = (sae.threshold[live] if bool(live.any()) else sae.threshold).median().clamp_min(THETA_MIN)
            sunk = feats[low]
            sae.b_enc[sunk] += ref - q[low]
            q = torch.where(low, ref, q)  # (every q ≥ THETA_MIN now)
            self._reset_optimizer_rows(sunk, [sae.b_enc])
        sae.threshold[feats] = q
        self._reset_optimizer_rows(feats, [sae.threshold])
        self.since_fired[feats] = 0
        self._n_dead = int((self.since_fired >= self.train.dead_after).sum())
        return len(feats)

    def _reset_optimizer_rows(self, feats: torch.Tensor, params: list[torch.Tensor]) -> None:
        """Forget the optimiser's history of features `feats` in `params` (each with one row per feature): momentum
        0, Adam's second moment at the mean of the other features' (a 0 would make the next steps ~30× lr), and for
        schedule-free the base iterate z = the new weights (so that the running average starts there too)."""
        sfo = self.opt if isinstance(self.opt, ScheduleFree) else None
        base: torch.optim.Optimizer = sfo.base if sfo is not None else cast(torch.optim.Optimizer, self.opt)
        pairs = zip(sum(sfo.params, []), sum(sfo.z, [])) if sfo is not None else ((p, p) for p in self._grad_params)
        keep = torch.ones(self.cfg.width, dtype=torch.bool, device=self.device).index_fill_(0, feats, False)
        for p, q in pairs:
            if not any(p is r for r in params):
                continue
            if sfo is not None:
                q[feats] = p[feats]
            for name, v in base.state.get(q, {}).items():
                if not torch.is_tensor(v) or v.shape != q.shape:
                    continue
                fill = v[keep].mean(0) if name == "exp_avg_sq" and keep.any() else 0.0
                v[feats] = fill

    def _mark_fired(self, fired: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
        """Count tokens since each feature last fired; (dead mask, dead count as last read on the host)."""
        self.world.any_(fired)  # [dist] fired on any rank
        self.since_fired += n_rows
        self.since_fired.masked_fill_(fired, 0)  # (an index_put with a mask would wait for the GPU)
        dead = self.since_fired >= self.train.dead_after
        if self.device.type == "cpu":  # free here; on a GPU the count is read every POLL_EVERY steps (`poll`)
            self._n_dead = int(dead.sum())
        return dead, self._n_dead

    def _aux_rows(self, B: int, n_dead: int, rows: tuple[int, int]) -> int:
        """How many of this batch's rows feed the auxiliary loss: the (global) batch's first AUX_ROWS rows."""
        return min(B, max(0, AUX_ROWS - rows[0])) if self.train.aux_coef > 0 and n_dead > 0 else 0

    def _aux_loss(self, err: torch.Tensor, e_hat: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        """Auxiliary-k: how well the dead features' codes reconstruct the error left on the first rows."""
        B, aux_rows, n_rows = err.shape[0], e_hat.shape[0], rows[1]
        e = err[:aux_rows].detach()
        loss = (e - e_hat).pow(2).sum(1).mean() / (e - e.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
        if n_rows != B:  # [dist] reduce_grads weighs this rank by B/n_rows; its share of the aux rows is its own
            loss = loss * (n_rows / B) * (aux_rows / min(n_rows, AUX_ROWS))
        return loss

    def _forward_sparse(self, xn: torch.Tensor, lam: torch.Tensor, rows: tuple[int, int]) -> _Forward:
        """The loss through the sparse kernels (kernels.py): the CPU's path, work only on active pairs."""
        sae, arch, eps = self.sae, self.cfg.architecture, self.train.eps
        x_in = xn - sae.b_dec.detach()
        b_enc = sae.b_enc.detach()
        biased = arch in ("topk", "batchtopk")  # the others compare x_in·W_enc with b_enc-shifted cut-offs
        z = self._scratch_z(xn)
        with torch.no_grad():  # (batch, width): the one dense product (without b_enc, it is a pass cheaper)
            torch.addmm(b_enc, x_in, sae.w_enc, out=z) if biased else torch.mm(x_in, sae.w_enc, out=z)
        act, z_sel, below, z_below = self._sparse_pairs(z, b_enc, biased, rows)
        B, n_act = xn.shape[0], act.cols.numel()
        fired = torch.zeros(self.cfg.width, dtype=torch.bool, device=self.device)
        fired[act.cols[z_sel > 0]] = True  # where the code f(z) > 0
        dead, n_dead = self._mark_fired(fired, rows[1])
        aux_rows = self._aux_rows(B, n_dead, rows)
        pairs, x_pairs = act, x_in
        if aux_rows:
            # auxiliary-k on a slice of the batch: dead features learn to explain the residual error. Their pairs
            # ride in the same kernel calls as the batch's, as extra rows (one W×d gradient each, not two)
            z_rows = z[:aux_rows] if biased else z[:aux_rows] + b_enc
            aux = Active.from_topk(z_rows.masked_fill(~dead, float("-inf")).topk(min(AUX_K, n_dead), dim=1,
                                                                                  sorted=False).indices)
            pairs, x_pairs = act.cat(aux), torch.cat([x_in, x_in[:aux_rows]])
            z_sel = torch.cat([z_sel, aux.read(z_rows)])
        z_all = gather_pre_acts(z_sel, x_pairs, sae.w_enc, sae.b_enc, sae.b_dec, pairs, b_dec_pairs=n_act)
        z_sel, aux_z = z_all[:n_act], z_all[n_act:].relu()
        if aux_rows:  # × 1 where the pick is dead; 0 for a feature that fired since `n_dead` was read
            aux_z = aux_z * dead.index_select(0, aux.cols)
        if below is not None and z_below is not None:  # jump_relu
            theta_sel, theta_below = sae.threshold.gather(0, act.cols), sae.threshold.gather(0, below.cols)
            f = JumpReLUFn.apply(z_sel, theta_sel, eps)
            # below θ the code is 0 and z gets no gradient, but θ gets the STE gradients of both functions
            f_below = JumpReLUFn.apply(z_below, theta_below, eps)
            n_soft = StepFn.apply(z_sel, theta_sel, eps).sum() + StepFn.apply(z_below, theta_below, eps).sum()
            sparsity = lam * n_soft / B / self.cfg.l0
        else:
            f = z_sel.relu()
            sparsity = lam * f.sum() / B if arch == "relu" else z_sel.new_zeros(())
        codes = torch.cat([f, aux_z]) if aux_rows else f.view(-1)  # a node of its own, used only by the decoder
        g_codes: list[torch.Tensor] = []  # ∂recon/∂code per pair: each decoder row's gradient along itself
        codes.register_hook(g_codes.append)
        decoded = sparse_decode(codes, pairs, sae.w_dec)  # (B + aux_rows, d_in)
        x_hat = decoded[:B] + sae.b_dec
        if below is not None:  # zeros, through which θ learns from ∂loss/∂code there (no W_dec gradient)
            x_hat = x_hat + code_grad_probe(f_below, below, sae.w_dec)
        err = xn - x_hat
        recon = err.pow(2).sum(1).mean()
        prefixes = [self._prefix_error_sparse(xn, codes, pairs, m, f_below, below) for m in self.prefix_sizes]
        loss = (recon + sum(prefixes)) / (1 + len(prefixes)) + sparsity
        if aux_rows:
            loss = loss + self.train.aux_coef * self._aux_loss(err, decoded[B:], rows)

        def along() -> torch.Tensor:  # <∂/∂w_c, w_c> = Σ_(pairs of c) code·∂/∂code
            return g_codes[0].new_zeros(self.cfg.width).index_add_(0, pairs.cols, codes.detach() * g_codes[0])

        return _Forward(loss, recon, (f.detach() > 0).sum(), n_dead, along, x_hat)

    @property
    def prefix_sizes(self) -> list[int]:
        """Matryoshka: the nested prefixes' sizes below the full width, smallest first ([] when off)."""
        return sorted({max(1, round(f * self.cfg.width)) for f in self.train.matryoshka} - {self.cfg.width})

    def _prefix_error_sparse(self, xn: torch.Tensor, codes: torch.Tensor, pairs: Active, m: int,
                             f_below: torch.Tensor | None, below: Active | None) -> torch.Tensor:
        """Matryoshka: mean squared error of the reconstruction from features 0..m−1 alone (sparse path)."""
        sae = self.sae
        x_m = sparse_decode(codes * (pairs.cols < m), pairs, sae.w_dec)[: xn.shape[0]] + sae.b_dec
        if below is not None and f_below is not None:  # θ learns from this prefix's loss too
            x_m = x_m + code_grad_probe(f_below * (below.cols < m), below, sae.w_dec)
        return (xn - x_m).pow(2).sum(1).mean()

    def _sparse_pairs(self, z: torch.Tensor, b_enc: torch.Tensor, biased: bool, rows: tuple[int, int]):
        """The active (token, feature) pairs of no-grad pre-activations z and their pre-activations; for jump_relu
        also the pairs in the STE window just below θ and theirs (else None, None)."""
        arch, eps = self.cfg.architecture, self.train.eps
        if arch == "jump_relu":  # active features, and those within the STE window below θ apart
            theta = self.sae.threshold.detach()
            near = Active.from_mask(z > theta - b_enc - eps / 2)
            z_near = near.read(z) + b_enc.index_select(0, near.cols)
            on = z_near > theta.index_select(0, near.cols)
            i_on, i_below = on.nonzero().squeeze(1), on.logical_not().nonzero().squeeze(1)
            return (near.take(i_on), z_near.index_select(0, i_on), near.take(i_below),
                    z_near.index_select(0, i_below))
        if arch == "topk":
            act = Active.from_topk(z.topk(self.cfg.k, dim=1, sorted=False).indices)
        elif arch == "batchtopk":
            flat = z.relu().flatten()
            top = self.world.top_values(flat, self.cfg.k * rows[1])  # [dist] the global batch's top k·n
            mask = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top.indices, True).view_as(z) & (z > 0)
            act = Active.from_mask(mask)
            self._track_batch_threshold(top.values)
        else:  # relu
            act = Active.from_mask(z > -b_enc)
        z_sel = act.read(z) if biased else act.read(z) + b_enc.index_select(0, act.cols)
        return act, z_sel, None, None

    def _forward_dense(self, xn: torch.Tensor, lam: torch.Tensor, rows: tuple[int, int]) -> _Forward:
        """The same loss with dense (batch, width) tensors and no host reads: a GPU's path, where the matrix
        products beat the sparse kernels' scattered reads and many small launches, and the elementwise work is
        fused (kernels.py, "dense kernels"; bench/RESULTS.md)."""
        # (no cast cache: a CUDA graph's capture must not keep casts made outside it, torch's CUDA-graph notes)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.train.bf16_matmuls and xn.is_cuda,
                            cache_enabled=False):
            return self._forward_dense_products(xn, lam, rows)

    def _forward_dense_products(self, xn: torch.Tensor, lam: torch.Tensor, rows: tuple[int, int]) -> _Forward:
        sae, arch, eps, k = self.sae, self.cfg.architecture, self.train.eps, self.cfg.k
        B = xn.shape[0]
        z = dense_pre_acts(xn, sae.b_dec, sae.w_enc, sae.b_enc)  # (batch, width)
        if arch == "jump_relu":
            f, n_on, per_feature = dense_jump_relu(z, sae.threshold, eps)
            sparsity = lam * n_on / B / self.cfg.l0
        elif arch in ("topk", "batchtopk"):
            keep = torch.zeros_like(z, dtype=torch.bool)
            if arch == "topk":
                keep.scatter_(1, z.detach().topk(k, dim=1, sorted=False).indices, True)
            else:
                top = self.world.top_values(z.detach().relu().flatten(), k * rows[1])  # [dist] global top k·n
                keep.view(-1).index_fill_(0, top.indices, True)
                self._track_batch_threshold(top.values)
            f, per_feature = dense_gate(z, keep)
            sparsity = z.new_zeros(())
        else:  # relu
            f = z.relu()
            per_feature = (f.detach() > 0).sum(0)
            sparsity = lam * f.sum() / B
        # tokens on per feature, counted in the gate's pass: for the dead-feature clock and for L0
        dead, n_dead = self._mark_fired(per_feature > 0, rows[1])
        x_hat = f @ sae.w_dec + sae.b_dec
        err = xn - x_hat
        recon = err.pow(2).sum(1).mean()
        prefixes = [(xn - f[:, :m] @ sae.w_dec[:m] - sae.b_dec).pow(2).sum(1).mean() for m in self.prefix_sizes]
        loss = (recon + sum(prefixes)) / (1 + len(prefixes)) + sparsity
        # auxiliary-k while the host's last dead count (every POLL_EVERY steps on a GPU) is positive, masked on the
        # device by this step's dead features: a stale count only starts it up to POLL_EVERY steps late
        aux_rows = self._aux_rows(B, n_dead, rows)
        if aux_rows:  # the dead features' top pre-activations on the first rows (b_dec gets no gradient here)
            x_in = (xn[:aux_rows] - sae.b_dec).detach()
            z_aux = torch.addmm(sae.b_enc, x_in, sae.w_enc).masked_fill(~dead, float("-inf"))
            top = z_aux.topk(min(AUX_K, self.cfg.width), dim=1, sorted=False)  # beyond the dead ones: −∞ → 0
            vals = top.values.relu() * dead.index_select(0, top.indices.view(-1)).view_as(top.values)
            aux_f = torch.zeros_like(z_aux).scatter(1, top.indices, vals)
            aux = self._aux_loss(err, aux_f @ sae.w_dec, rows) * dead.any()  # 0 (no gradient) when none is dead
            loss = loss + self.train.aux_coef * aux

        def along() -> torch.Tensor:  # <∂/∂w_c, w_c> straight from the dense gradient
            return (_grad(sae.w_dec) * sae.w_dec.detach()).sum(1)

        return _Forward(loss, recon, per_feature.sum(), n_dead, along, x_hat)

    def _track_batch_threshold(self, values: torch.Tensor) -> None:
        """batchtopk: running average of the smallest positive selected value (the saved JumpReLU threshold)."""
        if self.world.trivial:
            kmin = values.masked_fill(values <= 0, math.inf).min().double()
            kmin = torch.where(kmin.isfinite(), kmin, 0.0)
        else:  # [dist] over every rank's values
            kmin = torch.tensor(self.world.min_positive(values[values > 0]), dtype=torch.float64, device=self.device)
        # in place (a captured CUDA graph reads and writes these very tensors)
        self._batch_threshold.copy_(kmin if self.step == 0 else 0.99 * self._batch_threshold + 0.01 * kmin)

    def _set_lr(self) -> None:
        """This step's learning rate in every parameter group (into the group's lr tensor once graphs are on)."""
        lr = self.lr_now()
        for group in self.opt.param_groups:
            v = lr * group.get("lr_scale", 1.0)
            if self.end_to_end and group.get("role") == "threshold":
                v *= self.train.e2e_threshold_lr
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(v)
            else:
                group["lr"] = v

    def _learn(self, xn: torch.Tensor, fwd: _Forward, n_rows: int, set_lr: bool = True) -> StepStats:
        """Backward, the decoder-row projection, the optimiser step and the controller, for either path
        (`set_lr` False: a CUDA graph's capture, whose lr tensors are filled before each replay)."""
        sae, loss, B = self.sae, fwd.loss, xn.shape[0]
        check = self.device.type == "cpu" or not self.world.trivial  # (data parallel: every rank agrees now)
        if check and not self.world.all_true(torch.isfinite(loss)):
            self.failed = f"{self.key}: loss became {float(loss)} at step {self.step}; this SAE stopped (the others go on)"
            raise RuntimeError(self.failed)
        self._bad |= ~loss.detach().isfinite()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # no gradient along each unit-norm decoder row
            _grad(sae.w_dec).addcmul_(fwd.along()[:, None], sae.w_dec, value=-1.0)
        self._w_enc_t.grad, sae.w_enc.grad = _grad(sae.w_enc).T, None  # hand it to Adam (which zeroes only its own)
        self.world.reduce_grads(self._grad_params, B / n_rows)  # [dist] the global batch's gradients
        if set_lr:
            self._set_lr()
        self.opt.step()
        with torch.no_grad():
            sae.w_dec.div_(sae.w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
            sae.threshold.clamp_(min=1e-6)

        l0 = fwd.n_active.double() / B
        recon, total_var = fwd.recon.detach(), (xn - xn.mean(0)).pow(2).sum(1).mean()
        if not self.world.trivial:  # [dist] L0 (for the λ controller) and FVU of the global batch
            l0, recon, total_var = self._global_stats(fwd.n_active, recon, xn, n_rows)
        if self.cfg.architecture in ("jump_relu", "relu"):
            self._log_lambda.copy_((self._log_lambda + self.train.lambda_rate * (l0 / self.cfg.l0 - 1.0)).clamp(
                math.log(1e-6), math.log(1e3)))
        fvu = (recon / total_var.clamp_min(1e-12)).double()
        a = 0.1 if self.step > 0 else 1.0
        for name, v in (("fvu", fvu), ("l0", l0)):
            old = self._ema[name]
            old.copy_(torch.where(old.isnan(), v, (1 - a) * old + a * v))
        self.step += 1
        return StepStats(loss.detach(), fvu, l0, fwd.n_dead / self.cfg.width)

    def _global_stats(self, n_active: torch.Tensor, recon: torch.Tensor, xn: torch.Tensor, n_rows: int):
        """Data parallel: L0, reconstruction error and total variance of the global batch (one all-reduce)."""
        B = xn.shape[0]
        sums = self.world.sum_floats(float(n_active), float(recon) * B,
                                     float(xn.pow(2).sum()), *xn.sum(0).tolist())
        mean_sq = sum(v * v for v in sums[3:]) / n_rows / n_rows  # ‖mean‖²
        f64: dict[str, Any] = {"dtype": torch.float64, "device": self.device}
        total_var = torch.tensor(max(sums[2] / n_rows - mean_sq, 0.0), **f64)
        return torch.tensor(sums[0] / n_rows, **f64), torch.tensor(sums[1] / n_rows, **f64), total_var

    # ------------------------------------------------------------------ results and state

    def export(self) -> SAE:
        """The trained SAE in model units (normalisation and pre-encoder bias folded in)."""
        sae = self.sae
        if isinstance(self.opt, ScheduleFree):  # export the average x, not the interpolation y
            sae = SAE(self.sae.cfg)
            with torch.no_grad():
                for name, p in self.sae.named_parameters():
                    x = self.opt.averaged(self._w_enc_t if p is self.sae.w_enc else p)
                    getattr(sae, name).copy_(x.T if p is self.sae.w_enc else x)
        out = sae.folded(self.scale).to("cpu")
        if self.cfg.architecture == "batchtopk":
            out.cfg.architecture = "jump_relu"
            out.cfg.extra["trained_as"] = "batchtopk"
            with torch.no_grad():
                out.threshold.fill_(self.batch_threshold * self.scale)
        out.cfg.extra.update({"tokens_trained": self.step * self.train.batch_size, "train": asdict(self.train)})
        if self.prefix_sizes:  # Matryoshka: the nested dictionaries are features [0, m) for each m
            out.cfg.extra["matryoshka_prefixes"] = [*self.prefix_sizes, self.cfg.width]
        return out

    def state_dict(self) -> dict:
        return {"layout": LAYOUT, "sae": self.sae.state_dict(), "opt": self.opt.state_dict(), "scale": self.scale,
                "log_lambda": self.log_lambda, "step": self.step, "since_fired": self.since_fired,
                "batch_threshold": self.batch_threshold, "ema": self.ema, "failed": self.failed,
                "e2e_start": self.e2e_start}

    def load_state_dict(self, d: dict) -> None:
        if d.get("layout") != LAYOUT:
            raise SaescopeError("this checkpoint was written by an older saescope (different optimiser layout); "
                                "delete the run's checkpoints folder to start training over")
        self.sae.load_state_dict(d["sae"])
        self.opt.load_state_dict(d["opt"])
        f64: dict[str, Any] = {"dtype": torch.float64, "device": self.device}
        self.scale, self.step, self.failed = d["scale"], d["step"], d["failed"]
        self.e2e_start = d.get("e2e_start", -1)
        self._log_lambda = torch.tensor(d["log_lambda"], **f64)
        self.since_fired = d["since_fired"].to(self.device)
        self._batch_threshold = torch.tensor(d["batch_threshold"], **f64)
        self._ema = {k: torch.tensor(v, **f64) for k, v in d["ema"].items()}
        self._n_dead = int((self.since_fired >= self.train.dead_after).sum())
        for group in self.opt.param_groups:  # (a graph's lr tensor, saved with the state) back to a number
            if torch.is_tensor(group["lr"]):
                group["lr"] = float(group["lr"])
        self._graphs.clear()  # captured on tensors this replaced
        self._graph_seen.clear()


class Chunk(NamedTuple):
    """A piece of the activation stream: site key -> (n, d_in), and how far along the source it ends."""

    acts: dict[str, torch.Tensor]
    n_contexts: int
    rows_per_rank: tuple[int, ...] | None = None
    """Data parallel from a live harvest: every rank's row count of this chunk (each rank holds its own rows).
    None: the same chunk on every rank (a cache: each rank takes its slice of every step) or a single process."""


class MultiTrainer:
    """Every SAE of a run, trained together from one stream of activation chunks.

    With several processes (`world`, see distributed.py): in data mode every rank holds every SAE and the
    trainers all-reduce what must be global; in layers mode each rank holds its own layers' SAEs and steps
    them alone on the exchanged chunks.

    Checkpoints: checkpoint_dir/state.pt is the commit point (each file written atomically).
    - single process: state.pt holds every SAE's state and the position in the stream;
    - data parallel: the SAEs are the same on every rank, so rank 0 alone writes state.pt, with every rank's
      position in its shard (`positions`);
    - layer parallel: 1. each rank writes its SAEs' state to rank<R>.step<S>.pt; 2. barrier; 3. rank 0
      writes state.pt naming step S with every rank's position; 4. barrier; 5. each rank deletes its other
      rank files. A kill before 3 leaves the last state.pt and its rank files; from 3 on, the new ones.
    state.pt records the world (size and mode) and a resume under another world is refused.
    """

    def __init__(self, sae_cfgs: list[SAEConfig], train: TrainConfig, checkpoint_dir: Path | None = None,
                 world: World = SINGLE, device: torch.device | str = "cpu"):
        if not sae_cfgs:
            raise SaescopeError("no SAEs to train: give at least one layer, site, width and L0")
        self.train = train
        self.world = world
        self.device = torch.device(device)
        scratch: dict = {}  # one pre-activation buffer per shape for all SAEs: they step one after another
        mine = world if world.mode == "data" else SINGLE  # layers: each rank's SAEs are its own
        self.trainers = [SAETrainer(c, train, device=self.device, scratch=scratch, world=mine) for c in sae_cfgs]
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.tokens_done = 0  # global: every rank's rows
        self.contexts_done = 0  # this rank's position in its stream (its shard of the corpus, or cache chunks)
        self.steps_done = 0
        self.failures: list[str] = []

    @property
    def sites(self) -> list[str]:
        return sorted({f"{t.cfg.site}/{t.cfg.layer}" for t in self.trainers})

    def _site_key(self, t: SAETrainer) -> str:
        return f"{t.cfg.site}/{t.cfg.layer}"

    def _load(self, path: Path) -> dict:
        try:
            return torch.load(path, weights_only=True, map_location=self.device)
        except Exception as err:
            raise SaescopeError(f"checkpoint {path} is unreadable ({err}); delete it to start over") from err

    def resume(self) -> bool:
        """Load the last checkpoint, if any. Returns whether one was loaded."""
        path = self.checkpoint_dir / "state.pt" if self.checkpoint_dir else None
        if path is None or not path.is_file():
            return False
        state, w = self._load(path), self.world
        theirs = state.get("world", SINGLE.describe)
        if theirs != w.describe:
            raise SaescopeError(f"checkpoint {path} was written by {theirs['world_size']} process(es) in "
                                f"{theirs['mode']} mode, not {w.size} in {w.mode} mode: launch it as before, or "
                                "delete the run's checkpoints folder to start over")
        if w.mode == "layers":
            assert self.checkpoint_dir is not None
            state = {**state, **self._load(self.checkpoint_dir / f"rank{w.rank}.step{state['steps_done']}.pt")}
        keys = [t.key for t in self.trainers]
        if state.get("keys") != keys:
            raise SaescopeError(f"checkpoint {path} is for other SAEs ({state.get('keys')}); delete it to start over")
        for t, s in zip(self.trainers, state["trainers"]):
            t.load_state_dict(s)
        self.tokens_done, self.steps_done = state["tokens_done"], state["steps_done"]
        self.contexts_done = state["positions"][w.rank] if "positions" in state else state["contexts_done"]
        return True

    def checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        w = self.world
        common: dict[str, Any] = {"tokens_done": self.tokens_done, "contexts_done": self.contexts_done, "steps_done": self.steps_done}
        if not w.trivial:
            common.update(world=w.describe, positions=w.gather_ints(self.contexts_done))
        mine = {"keys": [t.key for t in self.trainers], "trainers": [t.state_dict() for t in self.trainers]}
        if w.mode != "layers":
            if w.rank == 0:
                self._save("state.pt", {**mine, **common})
            return
        name = f"rank{w.rank}.step{self.steps_done}.pt"
        self._save(name, mine)
        w.barrier()
        if w.rank == 0:
            self._save("state.pt", common)
        w.barrier()
        for old in self.checkpoint_dir.glob(f"rank{w.rank}.step*.pt"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _save(self, name: str, state: dict) -> None:
        from .fsio import atomic_path

        assert self.checkpoint_dir is not None
        with atomic_path(self.checkpoint_dir / name) as tmp:
            torch.save(state, tmp)

    def fit(self, chunks: Iterable[Chunk], progress: bool = True) -> None:
        """Train on chunks until `train.main_tokens` tokens (all of `train.tokens` unless an end-to-end phase
        follows, endtoend.py); each chunk is split into steps of ~batch_size."""
        cfg = self.train
        stop = cfg.main_tokens
        if self.tokens_done >= stop:  # resumed after the main phase
            return
        bar = tqdm(total=stop, initial=min(self.tokens_done, stop), unit="tok", unit_scale=True,
                   desc="train", disable=not progress or self.world.rank != 0, dynamic_ncols=True)
        try:
            for chunk in chunks:
                if self.tokens_done >= stop:
                    break
                acts = {k: v.to(self.device, torch.float32, non_blocking=True) for k, v in chunk.acts.items()}
                plan = self._plan(chunk)
                for rows, first_row, n_rows in plan:
                    if self.tokens_done >= stop:
                        break
                    rows = rows.to(self.device)  # the same order on every device
                    self._step_all({k: v[rows] for k, v in acts.items()}, (first_row, n_rows))
                    self.tokens_done += n_rows
                    bar.update(max(0, min(n_rows, stop - bar.n)))
                    self.steps_done += 1
                self.contexts_done += chunk.n_contexts
                bar.set_postfix_str(self._postfix(), refresh=False)
                if self.steps_done // cfg.checkpoint_every != (self.steps_done - len(plan)) // cfg.checkpoint_every:
                    self.checkpoint()
        finally:
            bar.close()
        self.poll_all()
        if self.tokens_done < stop:
            raise SaescopeError(
                f"the corpus ran out after {self.tokens_done:,} training tokens (asked for {stop:,}): "
                "use a larger corpus or a smaller --tokens"
            )

    def _plan(self, chunk: Chunk) -> list[tuple[torch.Tensor, int, int]]:
        """The chunk's steps, each (this rank's rows of the chunk, where they start in the step's global batch,
        the global batch's size): a seeded shuffle cut into steps of ~batch_size rows."""
        w, n = self.world, next(iter(chunk.acts.values())).shape[0]
        gen = torch.Generator().manual_seed(self.train.seed * 1_000_003 + self.contexts_done)
        perm = torch.randperm(n, generator=gen)
        sizes = chunk.rows_per_rank or (n,)
        n_steps = max(1, round(sum(sizes) / self.train.batch_size))
        steps = perm.tensor_split(n_steps)
        if w.mode != "data":
            return [(rows, 0, len(rows)) for rows in steps]
        if chunk.rows_per_rank is None:  # the same chunk on every rank: each takes its slice of every step
            parts = [rows.tensor_split(w.size) for rows in steps]
            return [(p[w.rank], sum(len(q) for q in p[: w.rank]), sum(len(q) for q in p)) for p in parts]
        lens = [[len(p) for p in torch.arange(s).tensor_split(n_steps)] for s in sizes]  # every rank's step sizes
        return [(rows, sum(r[j] for r in lens[: w.rank]), sum(r[j] for r in lens)) for j, rows in enumerate(steps)]

    def step_spliced(self, acts: dict[str, torch.Tensor], n_contexts: int,
                     extra: Callable[[SAETrainer, torch.Tensor], torch.Tensor]) -> None:
        """One step of every SAE on all rows of `acts` (site key -> (n, d_in)), in order, with extra(trainer, x̂)
        added to each SAE's loss: the end-to-end phase's step (endtoend.py). Counts and checkpoints as `fit`."""
        n = next(iter(acts.values())).shape[0]
        for t in self.trainers:
            t.start_end_to_end()
        self._step_all({k: v.to(self.device, torch.float32) for k, v in acts.items()}, None, extra)
        self.tokens_done += n
        self.steps_done += 1
        self.contexts_done += n_contexts
        if self.steps_done % self.train.checkpoint_every == 0:
            self.checkpoint()

    def _step_all(self, acts: dict[str, torch.Tensor], rows: tuple[int, int] | None = None,
                  extra: Callable[[SAETrainer, torch.Tensor], torch.Tensor] | None = None) -> None:
        # host reads are free on the CPU (the step itself reads the dead count and a NaN loss there); on a GPU
        # each waits for the queue, so they come every POLL_EVERY steps
        cpu = self.device.type == "cpu"
        check = cpu or (self.steps_done + 1) % POLL_EVERY == 0 or not self.world.trivial
        for t in self.trainers:
            if t.failed:
                continue
            x = acts[self._site_key(t)]
            # NaN/Inf anywhere (on any rank) makes a sum non-finite
            if check and not t.world.all_true(torch.isfinite(x.sum())):
                t.failed = f"{t.key}: NaN/Inf in the input activations; this SAE stopped (the others go on)"
                self.failures.append(t.failed)
                continue
            try:
                t.step_on(x, rows, None if extra is None else functools.partial(extra, t))
                if check and not cpu:
                    t.poll()
            except RuntimeError as err:
                if not t.failed:
                    raise
                self.failures.append(str(err))

    def poll_all(self) -> None:
        """Read every trainer's pending state (a GPU polls every POLL_EVERY steps; the last steps are read here)."""
        for t in self.trainers:
            if t.failed:
                continue
            try:
                t.poll()
            except RuntimeError as err:
                self.failures.append(str(err))

    def _postfix(self) -> str:
        ok = [t for t in self.trainers if not t.failed and not math.isnan(t.ema["l0"])]
        if not ok:
            return ""
        l0 = [t.ema["l0"] for t in ok]
        fvu = [t.ema["fvu"] for t in ok]
        return f"L0 {min(l0):.0f}–{max(l0):.0f} FVU {min(fvu):.3f}–{max(fvu):.3f}" + (
            f" failed {len(self.failures)}" if self.failures else "")

    def save(self, saes_dir: Path) -> list[Path]:
        """Save every SAE that trained without failing, in the Gemma Scope 2 layout (data parallel: rank 0 alone,
        as every rank holds the same SAEs; layers: each rank its own)."""
        out: list[Path] = []
        if self.world.mode == "data" and self.world.rank != 0:
            return out
        for t in self.trainers:
            if t.failed or t.step == 0:
                continue
            out.append(t.export().save(Path(saes_dir) / t.cfg.site / t.cfg.folder_name))
        return out

