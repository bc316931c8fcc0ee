"""Steering's decoding cost on the CPU: Gemma 3 270M generating in fp32 vs bf16, and the LM head's strided input.

1. `generate`: 2 rows (steering's steered + unsteered) × 40 sampled tokens, one CPU thread (as `steer` decodes),
   the model loaded by `load_model` in float32 and in bfloat16 (what `models.generation_dtype` picks on a CPU
   with native bf16), each timed `--repeats` times after one warm-up; the texts are compared.
2. `F.linear` of Gemma's 262k-token head on a batch of prompts' last positions as transformers hands them over
   (a strided view, `hidden[:, -1:, :]`) and made contiguous (what `load_model`'s pre-hook on the head does).

Prints a table; nothing is written (results go to bench/RESULTS.md by hand, with the machine and the load).

    .venv/bin/python bench/bench_generate.py [--repeats 2] [--rows 8]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from saescope.models import DEFAULT_MODEL, load_model


def time_generate(dtype: str, repeats: int) -> tuple[list[float], str]:
    lm = load_model(DEFAULT_MODEL, device="cpu", dtype=dtype)
    ids = lm.tokenizer(["The best part of the holiday was"] * 2, return_tensors="pt")
    times, text = [], ""
    for k in range(repeats + 1):
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.no_grad():
            out = lm.model.generate(**ids, max_new_tokens=40, min_new_tokens=40, do_sample=True)
        if k:  # the first call is the warm-up
            times.append(time.perf_counter() - t)
        text = lm.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
    return times, text


def time_head(rows: int, dtype: torch.dtype) -> tuple[float, float]:
    weight = torch.randn(262144, 640).to(dtype)
    hidden = torch.randn(rows, 8, 640, dtype=dtype)
    last = hidden[:, -1:, :]  # what `generate`'s first step hands the head
    out = []
    for x in (last, last.contiguous()):
        torch.nn.functional.linear(x, weight)
        t = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        out.append(time.perf_counter() - t)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.2f}, bf16 fast: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    texts = {}
    for dtype in ("float32", "bfloat16"):
        times, texts[dtype] = time_generate(dtype, args.repeats)
        print(f"generate 2 × 40 tokens, {dtype:>8}: " + ", ".join(f"{t:.2f} s" for t in times))
    print(f"same text: {texts['float32'] == texts['bfloat16']}  (fp32: {texts['float32'][:60]!r})")
    for dtype in (torch.float32, torch.bfloat16):
        strided, contiguous = time_head(args.rows, dtype)
        print(f"head on {args.rows} last positions, {str(dtype)[6:]:>8}: strided {strided * 1e3:,.0f} ms, "
              f"contiguous {contiguous * 1e3:,.0f} ms")


if __name__ == "__main__":
    main()
