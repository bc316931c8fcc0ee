"""Sparse training kernels for SAEs on CPU (and GPU).

An SAE with L0 ≈ 50 of 4,096 features uses ~1% of its decoder per token and,
under JumpReLU/TopK, passes gradient to ~1% of its encoder columns. These kernels
do only that work:

- `gather_pre_acts`: the selected pre-activations z[b, idx[b, k]] as a function of
  (w_enc, b_enc, b_dec), computed from a dense no-grad z; its backward is a sparse
  (width × batch) @ (batch × d_in) product instead of a dense one.
- `sparse_decode`: Σ_k vals[b, k] · w_dec[idx[b, k]] with `embedding_bag`.

Naive references are in tests/test_kernels.py.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


class _GatherPreActs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_sel, x_in, w_enc, b_enc, b_dec, idx):
        # z_sel (batch, k) was computed from the dense no-grad z; this node only attaches gradients
        ctx.save_for_backward(x_in, w_enc, idx)
        ctx.has_b_dec = b_dec is not None
        return z_sel.clone()

    @staticmethod
    def backward(ctx, g):  # g (batch, k)
        x_in, w_enc, idx = ctx.saved_tensors
        batch, k = idx.shape
        width = w_enc.shape[1]
        flat_idx, flat_g = idx.reshape(-1), g.reshape(-1)
        g_b_enc = torch.zeros(width, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, flat_g)
        rows = torch.arange(batch, device=g.device).repeat_interleave(k)
        s = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_g, (width, batch), check_invariants=False)
        g_w_enc = torch.sparse.mm(s, x_in).T  # (d_in, width)
        g_b_dec = -(w_enc @ g_b_enc) if ctx.has_b_dec else None
        return None, None, g_w_enc, g_b_enc, g_b_dec, None


def gather_pre_acts(z: torch.Tensor, x_in: torch.Tensor, w_enc, b_enc, b_dec, idx: torch.Tensor) -> torch.Tensor:
    """z[b, idx[b, k]] with gradients to w_enc, b_enc and (when given) the pre-encoder bias b_dec.

    `z` = (x − b_dec) @ w_enc + b_enc computed without grad; `x_in` = x − b_dec (or x).
    """
    z_sel = z.gather(1, idx)  # (batch, k)
    return _GatherPreActs.apply(z_sel, x_in, w_enc, b_enc, b_dec, idx)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """(batch, k) codes at (batch, k) feature indices -> (batch, d_in), without a dense (batch, width) matrix."""
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals, mode="sum")


def ragged_to_padded(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of True entries per row, padded: (idx (batch, kmax), valid (batch, kmax) bool)."""
    counts = mask.sum(1)
    kmax = max(int(counts.max()), 1)
    # topk on the mask puts the True columns first (ties resolved arbitrarily, which is fine)
    _, idx = mask.to(torch.int8).topk(kmax, dim=1, sorted=False)
    return idx, mask.gather(1, idx)
