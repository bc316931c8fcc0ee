"""Sparse training kernels for SAEs on CPU (and GPU).

An SAE with L0 ≈ 50 of 4,096 features uses ~1% of its decoder per token and,
under JumpReLU/TopK, passes gradient to ~1% of its encoder columns. These kernels
do only that work, on the active (token, feature) pairs in flat COO form
`rows, cols` (rows sorted ascending, as `nonzero` returns them):

- `gather_pre_acts`: z[rows, cols] as a function of (w_enc, b_enc, b_dec), given its
  values read from a dense no-grad z; its backward scatters g · x[row] into the W_enc rows of the
  active features (embedding_bag's backward kernel: 2× faster here than `torch.sparse.mm` on COO)
  instead of a dense (width × batch) @ (batch × d_in) product.
- `sparse_decode`: Σ vals · w_dec[cols] per row, with `embedding_bag`.
- `code_grad_probe`: the gradient codes would get from the decoder, for codes that are zero.

Naive references are in tests/test_sae.py.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Active(NamedTuple):
    """Active (token, feature) pairs of a batch, row-major."""

    rows: torch.Tensor  # (nnz,) token index, ascending
    cols: torch.Tensor  # (nnz,) feature index
    offsets: torch.Tensor  # (batch,) start of each row in rows/cols

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Active:
        # one nonzero over the flat mask: ~1 ms cheaper than the (row, col) form at 1,024 × 4,096
        width = mask.shape[1]
        idx = mask.reshape(-1).nonzero().squeeze(1)
        rows = idx.div(width, rounding_mode="floor")
        return cls(rows, idx - rows * width, _offsets(rows, mask.shape[0]))

    @classmethod
    def from_topk(cls, idx: torch.Tensor) -> Active:
        batch, k = idx.shape
        rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
        return cls(rows, idx.reshape(-1), torch.arange(0, batch * k, k, device=idx.device))

    def read(self, m: torch.Tensor) -> torch.Tensor:
        """m[rows, cols] (nnz,) for m (batch, width), through a flat index (a third faster than m[rows, cols])."""
        return m.reshape(-1).index_select(0, self.rows * m.shape[1] + self.cols)

    def subset(self, keep: torch.Tensor) -> Active:
        """The pairs where `keep` (nnz,) is true, still row-major."""
        return self.take(keep.nonzero().squeeze(1))

    def take(self, idx: torch.Tensor) -> Active:
        """The pairs at positions `idx` (ascending), still row-major."""
        rows = self.rows.index_select(0, idx)
        return Active(rows, self.cols.index_select(0, idx), _offsets(rows, self.offsets.shape[0]))

    def cat(self, other: Active) -> Active:
        """These pairs, then `other`'s as further rows (other's row r becomes row batch + r): one kernel call
        for two sets of pairs, e.g. a batch's active features and the aux-k loss's dead ones."""
        batch, nnz = self.offsets.shape[0], self.rows.shape[0]
        return Active(torch.cat([self.rows, other.rows + batch]), torch.cat([self.cols, other.cols]),
                      torch.cat([self.offsets, other.offsets + nnz]))


def _offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


class _GatherPreActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_sel, x_in, w_enc, b_enc, b_dec, rows, cols, b_dec_pairs):
        # z_sel (nnz,) was read from the dense no-grad z; this node only attaches gradients
        ctx.save_for_backward(x_in, w_enc, rows, cols)
        ctx.has_b_dec, ctx.b_dec_pairs = b_dec is not None, b_dec_pairs
        return z_sel.clone()

    @staticmethod
    def backward(ctx, g):  # g (nnz,)
        x_in, w_enc, rows, cols = ctx.saved_tensors
        width = w_enc.shape[1]
        n = g.shape[0] if ctx.b_dec_pairs is None else ctx.b_dec_pairs
        g_first = g.new_zeros(width).index_add_(0, cols[:n], g[:n])  # the pairs that also move b_dec
        g_b_enc = g_first if n == g.shape[0] else g_first.clone().index_add_(0, cols[n:], g[n:])
        # W_enc[:, col] += g · x_in[row] over the pairs: embedding_bag's weight gradient with the pairs as bags' members
        none = cols.new_empty(0)  # bag sizes and max indices: unused in mode sum
        g_w_enc = torch.ops.aten._embedding_bag_dense_backward(x_in.contiguous(), cols, rows, none, none, width,
                                                                False, 0, g, -1).T  # (d_in, width)
        g_b_dec = -(w_enc @ g_first) if ctx.has_b_dec else None
        return None, None, g_w_enc, g_b_enc, g_b_dec, None, None, None


def gather_pre_acts(z_sel: torch.Tensor, x_in: torch.Tensor, w_enc, b_enc, b_dec, act: Active,
                    b_dec_pairs: int | None = None) -> torch.Tensor:
    """z[rows, cols] (nnz,) with gradients to w_enc, b_enc and (when given) the pre-encoder bias b_dec.

    `z_sel` holds the values, read without grad from z = (x − b_dec) @ w_enc + b_enc; `x_in` = x − b_dec (or x).
    With `b_dec_pairs` = n only the first n pairs pass gradient to b_dec.
    """
    return _GatherPreActs.apply(z_sel, x_in, w_enc, b_enc, b_dec, act.rows, act.cols, b_dec_pairs)


class _CodeGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, w_dec, rows, cols, offsets):
        ctx.save_for_backward(w_dec, rows, cols, offsets)
        return vals.new_zeros(()).expand(offsets.shape[0], w_dec.shape[1])

    @staticmethod
    def backward(ctx, g):  # g (batch, d_in)
        w_dec, rows, cols, offsets = ctx.saved_tensors
        # <g[row], w_dec[col]> per pair: the kernel embedding_bag's own backward uses for per_sample_weights
        g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(g.contiguous(), w_dec, cols, offsets,
                                                                           rows, 0, -1)
        return g_vals, None, None, None, None


def code_grad_probe(vals: torch.Tensor, act: Active, w_dec: torch.Tensor) -> torch.Tensor:
    """Zeros (batch, d_in) to add to a reconstruction, through which `vals` (nnz,) receive the gradient they
    would get as codes decoded by w_dec — without decoding them. For codes that are 0 (JumpReLU pairs just
    below θ) whose gradient only feeds the threshold's straight-through estimator."""
    return _CodeGrad.apply(vals, w_dec.detach(), act.rows, act.cols, act.offsets)


def sparse_decode(vals: torch.Tensor, act: Active, w_dec: torch.Tensor) -> torch.Tensor:
    """Codes `vals` (nnz,) at the active pairs -> (batch, d_in), without a dense (batch, width) matrix."""
    return F.embedding_bag(act.cols, w_dec, act.offsets, per_sample_weights=vals, mode="sum")


# ---------------------------------------------------------------- dense kernels (a GPU's step)
#
# On a GPU the step runs on dense (batch, width) tensors: the matrix products are cheap there, and what costs is
# every elementwise pass over those tensors (64 MB each at 4,096 × 4,096 fp32; 256 MB at width 16,384). Autograd
# through `z * (z > θ)` and friends makes ~30 such passes per step. The functions below do the encoder with
# ~9: the pre-activation's backward skips the (batch × d_in) input gradient (only b_dec needs it, as a sum), and each
# gate is one pure elementwise function, fused by torch.compile into one pass forward and one backward on a GPU
# (`_fuse`; eager elsewhere, with the same arithmetic).


def _fuse(fn):
    """`fn` compiled into fused kernels on first use on a GPU (the batch dimension symbolic: the live pipeline's
    batches vary by a few rows); as written on the CPU, with SAESCOPE_COMPILE=0 (the benchmark's eager baseline),
    and from the first time compiling fails (no Triton, an old GPU): the same arithmetic either way."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("SAESCOPE_COMPILE") == "0" or compiled is fn:
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return compiled(*args)
        except Exception as e:
            import logging
            logging.getLogger(__name__).warning("torch.compile of %s failed (%s); running it eagerly from now on",
                                                fn.__name__, str(e).splitlines()[0] if str(e) else type(e).__name__)
            compiled = fn
            return fn(*args)

    run.__name__ = fn.__name__
    run.eager = fn  # type: ignore[attr-defined]  # the eager form, for tests
    return run


class _DensePre(torch.autograd.Function):
    """z = (xn − b_dec)·W_enc + b_enc. Backward gives W_enc its gradient in W_enc's (feature-major) layout and b_dec
    its gradient as −W_enc·Σ ∂z: no (batch × d_in) input gradient, which autograd would make with a full product."""

    # under torch.autocast (TrainConfig.bf16_matmuls) the products run in bf16, and so does the backward's
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, xn, b_dec, w_enc, b_enc):
        x_in = xn - b_dec
        ctx.save_for_backward(x_in, w_enc)
        return torch.addmm(b_enc, x_in, w_enc)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, g_z):
        x_in, w_enc = ctx.saved_tensors
        g_b_enc = g_z.sum(0, dtype=w_enc.dtype)  # (bf16 ∂z: summed in fp32)
        g_w_enc = torch.mm(g_z.T, x_in).T  # (d_in, width) view of a (width, d_in) block, as w_enc is held
        return None, -(w_enc @ g_b_enc), g_w_enc, g_b_enc


def dense_pre_acts(xn: torch.Tensor, b_dec, w_enc, b_enc) -> torch.Tensor:
    """Pre-activations (batch, width) of normalised inputs xn; gradients to b_dec, w_enc, b_enc (not xn)."""
    return _DensePre.apply(xn, b_dec, w_enc, b_enc)


@_fuse
def _jump_forward(z: torch.Tensor, theta: torch.Tensor):
    on = z > theta
    return torch.where(on, z, 0.0), on.sum(0)


@_fuse
def _jump_backward(z: torch.Tensor, theta: torch.Tensor, g_f: torch.Tensor, g_n: torch.Tensor, eps: torch.Tensor):
    # ∂f/∂z = H(z−θ); θ: the STE's −(1/ε)·K((z−θ)/ε) times (θ·∂f + ∂n) — JumpReLUFn's and StepFn's together
    window = (z - theta).abs() < eps / 2
    g_theta = torch.where(window, theta * g_f + g_n, 0.0).sum(0) * (-1.0 / eps)
    return torch.where(z > theta, g_f, 0.0), g_theta


class _DenseJump(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps: float):
        f, per_feature = _jump_forward(z, theta)
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        ctx.mark_non_differentiable(per_feature)
        return f, per_feature.sum().to(theta.dtype), per_feature  # (θ's dtype: fp32 also when z is bf16)

    @staticmethod
    def backward(ctx, g_f, g_n, _):
        z, theta = ctx.saved_tensors
        if g_f is None:
            g_f = torch.zeros_like(z)
        g_n = torch.zeros((), dtype=theta.dtype, device=z.device) if g_n is None else g_n
        g_z, g_theta = _jump_backward(z, theta, g_f, g_n, theta.new_full((), ctx.eps))
        return g_z, g_theta, None


def dense_jump_relu(z: torch.Tensor, theta: torch.Tensor, eps: float):
    """JumpReLU on dense pre-activations: (codes z·H(z−θ), n = Σ H(z−θ) for the L0 penalty, tokens on per feature).

    The same values and gradients as `JumpReLUFn` and `StepFn` (sae.py) together, in one pass each way."""
    return _DenseJump.apply(z, theta, eps)


@_fuse
def _gate_forward(z: torch.Tensor, keep: torch.Tensor):
    on = keep & (z > 0)
    return torch.where(on, z, 0.0), on.sum(0)


@_fuse
def _gate_backward(z: torch.Tensor, keep: torch.Tensor, g_f: torch.Tensor):
    return torch.where(keep & (z > 0), g_f, 0.0)


class _DenseGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, keep):
        f, per_feature = _gate_forward(z, keep)
        ctx.save_for_backward(z, keep)
        ctx.mark_non_differentiable(per_feature)
        return f, per_feature

    @staticmethod
    def backward(ctx, g_f, _):
        z, keep = ctx.saved_tensors
        return _gate_backward(z, keep, g_f), None


def dense_gate(z: torch.Tensor, keep: torch.Tensor):
    """ReLU codes where a (batch, width) bool mask keeps them (TopK, BatchTopK): (codes, tokens on per feature)."""
    return _DenseGate.apply(z, keep)
