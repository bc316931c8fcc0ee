"""Sparse autoencoder modules: encode, decode, forward, and the JumpReLU step.

All architectures share one module and one parameter set, in the Gemma Scope 2
layout (model activation units, so a saved SAE needs nothing else):

    w_enc (d_in, width)   b_enc (width,)   w_dec (width, d_in)   b_dec (d_in,)   threshold (width,)

    z      = (x - b_dec·[pre_bias]) @ w_enc + b_enc         # (batch, width) pre-activations
    f      = act(z)                                          # (batch, width) sparse codes
    x_hat  = f @ w_dec + b_dec                               # (batch, d_in)

act by architecture:
    jump_relu  z · H(z − θ)       θ > 0 per feature, trained with straight-through estimators
    topk       ReLU of the k largest z per token
    batchtopk  trained as top-(k·batch) over a batch; saved and run as jump_relu with a threshold
    relu       ReLU(z), trained with an L1 penalty (the classic baseline)

`pre_bias` (SAELens' ``apply_b_dec_to_input``) is on while training and folded
into `b_enc` on save (`folded`), together with the input scale.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from .errors import SaescopeError

Architecture = Literal["jump_relu", "topk", "batchtopk", "relu"]
ARCHITECTURES = ("jump_relu", "topk", "batchtopk", "relu")
PARAM_NAMES = ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")
TEXT_FIELDS = ("architecture", "hf_hook_point_in", "hf_hook_point_out", "model_name", "site", "type")


@dataclass
class SAEConfig:
    """What an SAE is and where it reads from. Saved as config.json (Gemma Scope 2 field names)."""

    d_in: int
    width: int
    architecture: Architecture = "jump_relu"
    l0: float = 32.0
    """Target L0 (mean active features per token); k for topk/batchtopk."""
    hf_hook_point_in: str = ""
    hf_hook_point_out: str = ""
    model_name: str = ""
    site: str = ""
    layer: int = -1
    type: str = "sae"
    pre_bias: bool = False
    """Subtract b_dec from the input before encoding (training form; saved SAEs have it folded)."""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        problems = config_problems({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        if isinstance(self.architecture, str) and self.architecture not in ARCHITECTURES:
            problems.append(f"unknown architecture '{self.architecture}': choose from {', '.join(ARCHITECTURES)}")
        if problems:
            raise SaescopeError("\n".join(f"SAE config: {p}" for p in problems))

    @property
    def k(self) -> int:
        return max(1, round(self.l0))

    @property
    def folder_name(self) -> str:
        return f"layer_{self.layer}_width_{self.width}_l0_{round(self.l0)}"

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    @classmethod
    def from_json(cls, d: dict) -> SAEConfig:
        """Our fields from `d`; every other key (including one named "extra") is kept in `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [n for n in ("d_in", "width") if n not in d]
        if missing:
            raise SaescopeError(f"SAE config has no {' or '.join(missing)}: give the SAE's input width (d_in) "
                                "and number of features (width)")
        ours: dict[str, Any] = {k: ("" if v is None and k in TEXT_FIELDS else v) for k, v in d.items() if k in names}
        return cls(**ours, extra={k: v for k, v in d.items() if k not in names})


# --------------------------------------------------------------------------- config checks


def _shown(value) -> str:
    """A config value as the user wrote it in JSON (true, null, "text", 1e+308), cut short."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def l0_problem(l0, width=None, name: str = "l0") -> str | None:
    """Why `l0` is not a usable target L0 (a finite number above 0, below the width), or None."""
    if not _is_real(l0) or not math.isfinite(l0):
        return f"target L0 ({name}) must be a finite number, got {_shown(l0)}"
    usable_width = _is_int(width) and width >= 1  # a bad width is its own problem, reported once
    if l0 <= 0 or (usable_width and l0 >= width):
        bound = f" and below the width ({width})" if usable_width else ""
        return f"target L0 ({name}) must be above 0{bound}, got {_shown(l0)}"
    return None


def config_problems(d: dict, width=None) -> list[str]:
    """Every problem with the type or range of an SAE config's fields, one message each ([] if none).

    Fields absent from `d` are not checked (readers fill them from the weights or defaults); keys
    that are not ours are kept as they are. `width`: the width of the weights, when `d` has none.
    """
    from .models import SITE_KINDS

    out = []
    for name, low, note in (("d_in", 1, ""), ("width", 1, ""), ("layer", -1, " (-1 = unknown)")):
        if name not in d:
            continue
        if not _is_int(d[name]):
            out.append(f"{name} must be a whole number, got {_shown(d[name])}")
        elif d[name] < low:
            out.append(f"{name} must be at least {low}{note}, got {_shown(d[name])}")
    for name in TEXT_FIELDS:
        if name in d and not isinstance(d[name], str | None):  # null: not given (other tools write it)
            out.append(f"{name} must be text, got {_shown(d[name])}")
    if isinstance(d.get("site"), str) and d["site"] not in ("", *SITE_KINDS):
        out.append(f"site must be one of {', '.join(SITE_KINDS)}, got {_shown(d['site'])}")
    if "pre_bias" in d and not isinstance(d["pre_bias"], bool):
        out.append(f"pre_bias must be true or false, got {_shown(d['pre_bias'])}")
    width = d.get("width", width)
    if "l0" in d and (problem := l0_problem(d["l0"], width)):
        out.append(problem)
    return out


class SAEOutput(NamedTuple):
    x_hat: torch.Tensor  # (batch, d_in) reconstruction
    f: torch.Tensor  # (batch, width) codes
    z: torch.Tensor  # (batch, width) pre-activations


class JumpReLUFn(torch.autograd.Function):
    """z·H(z−θ); ∂/∂z = H(z−θ), ∂/∂θ = −(θ/ε)·K((z−θ)/ε) with K the unit rectangle."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        g_z = g * (z > theta)
        g_theta = -(theta / ctx.eps) * window * g
        return g_z, _sum_to(g_theta, theta.shape), None


class StepFn(torch.autograd.Function):
    """H(z−θ); ∂/∂z = 0, ∂/∂θ = −(1/ε)·K((z−θ)/ε). Counts active features for the L0 penalty."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        window = ((z - theta).abs() < ctx.eps / 2).to(g.dtype)
        return None, _sum_to(-(1.0 / ctx.eps) * window * g, theta.shape), None


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    while t.dim() > len(shape):
        t = t.sum(0)
    return t


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, w = cfg.d_in, cfg.width
        self.w_enc = nn.Parameter(torch.zeros(d, w))
        self.b_enc = nn.Parameter(torch.zeros(w))
        self.w_dec = nn.Parameter(torch.zeros(w, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.threshold = nn.Parameter(torch.zeros(w))  # stays fp32 whatever the other dtypes

    @classmethod
    def init(cls, cfg: SAEConfig, generator: torch.Generator | None = None) -> SAE:
        """Gemma Scope init: w_dec He-uniform then unit-norm rows, w_enc = w_decᵀ, biases 0, θ = 0.001."""
        sae = cls(cfg)
        bound = math.sqrt(6.0 / cfg.d_in)
        with torch.no_grad():
            w_dec = torch.empty(cfg.width, cfg.d_in).uniform_(-bound, bound, generator=generator)
            w_dec /= w_dec.norm(dim=1, keepdim=True)
            sae.w_dec.copy_(w_dec)
            sae.w_enc.copy_(w_dec.T)
            sae.threshold.fill_(0.001)
        return sae

    @property
    def uses_threshold(self) -> bool:
        return self.cfg.architecture in ("jump_relu", "batchtopk")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pre_bias:
            x = x - self.b_dec
        return x @ self.w_enc + self.b_enc  # (batch, width)

    def activate(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = z.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(z).scatter(-1, idx, vals.relu())
        if arch == "relu":
            return z.relu()
        return JumpReLUFn.apply(z, self.threshold, eps)  # jump_relu, batchtopk (inference form)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d_in) -> (batch, width) codes."""
        return self.activate(self.pre_acts(x))

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(n, d_in) -> (n, width) codes with negatives set to 0 (only positive codes count as firing): the
        atlas's encoding, in place for thresholded SAEs (no autograd, one (n × width) buffer)."""
        cfg = self.cfg
        if cfg.architecture in ("jump_relu", "batchtopk") and not cfg.pre_bias:
            z = torch.addmm(self.b_enc, x, self.w_enc)  # (n, width)
            return z.masked_fill_(z <= self.threshold.clamp(min=0), 0.0)
        return self.encode(x).clamp_(min=0)

    def feature_code(self, x: torch.Tensor, idx: int) -> torch.Tensor:
        """Code `idx` of (..., d_in) x without computing every code (except for topk, which needs them all)."""
        if self.cfg.architecture == "topk":
            return self.encode(x)[..., idx]
        if self.cfg.pre_bias:
            x = x - self.b_dec
        z = x @ self.w_enc[:, idx] + self.b_enc[idx]  # (...,)
        if self.cfg.architecture == "relu":
            return z.relu()
        return z * (z > self.threshold[idx])

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.w_dec + self.b_dec  # (batch, d_in)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        z = self.pre_acts(x)
        f = self.activate(z)
        return SAEOutput(self.decode(f), f, z)

    def folded(self, scale: float = 1.0) -> SAE:
        """The same SAE in model activation units with no pre-encoder bias.

        Training sees x/scale and subtracts b_dec first. With f' = scale·f:
        z' = x @ w_enc + scale·(b_enc − b_dec @ w_enc), θ' = scale·θ, x̂ = f' @ w_dec + scale·b_dec.
        """
        cfg = SAEConfig.from_json({**self.cfg.to_json(), "pre_bias": False})
        out = SAE(cfg)
        with torch.no_grad():
            b_enc = self.b_enc - (self.b_dec @ self.w_enc if self.cfg.pre_bias else 0.0)
            out.w_enc.copy_(self.w_enc)
            out.w_dec.copy_(self.w_dec)
            out.b_enc.copy_(scale * b_enc)
            out.b_dec.copy_(scale * self.b_dec)
            out.threshold.copy_(scale * self.threshold)
        return out

    # ------------------------------------------------------------------ save / load

    def save(self, folder: str | Path) -> Path:
        """Write config.json + params.safetensors atomically (a folder rename at the end)."""
        from safetensors.torch import save_file

        from .fsio import write_json

        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        tensors = {n: getattr(self, n).detach().float().contiguous().cpu() for n in PARAM_NAMES}
        save_file(tensors, str(tmp / "params.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", self.cfg.to_json())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            import shutil

            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
        return folder

    @classmethod
    def from_params(cls, cfg: SAEConfig, params: dict[str, torch.Tensor], where: str = "SAE") -> SAE:
        """Build an SAE from a parameter dict, checking names, shapes and values."""
        expect = {"w_enc": (cfg.d_in, cfg.width), "b_enc": (cfg.width,), "w_dec": (cfg.width, cfg.d_in),
                  "b_dec": (cfg.d_in,), "threshold": (cfg.width,)}
        sae = cls(cfg)
        with torch.no_grad():
            for name, shape in expect.items():
                if name not in params:
                    if name == "threshold" and cfg.architecture in ("topk", "relu"):
                        continue
                    raise SaescopeError(f"{where}: missing tensor '{name}'")
                t = params[name]
                if not torch.is_floating_point(t):
                    raise SaescopeError(f"{where}: tensor '{name}' has dtype {t.dtype}, expected a float type")
                if tuple(t.shape) != shape:
                    raise SaescopeError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
                if not torch.isfinite(t).all():
                    raise SaescopeError(f"{where}: tensor '{name}' holds NaN or Inf")
                getattr(sae, name).copy_(t.float())
        return sae


def read_config(path: Path) -> dict:
    """An SAE's config.json: a JSON object of bounded size, with clear errors."""
    from .fsio import read_json

    if not path.is_file():
        raise SaescopeError(f"no config.json in {path.parent}")
    if path.stat().st_size > 1_000_000:
        raise SaescopeError(f"{path} is too large to be an SAE config")
    return read_json(path, what="SAE config")
