"""Train EleutherAI sparsify's TopK SAEs with its own Trainer, timed, for the side-by-side GPU benchmark.

Runs in sparsify's own environment, never in saescope's: sparsify (PyPI ``eai-sparsify``) and the
packages the GPU image lacks are installed from wheels into a separate folder that only this
process sees (``pip install --no-index --no-deps --target``), layered on the system torch/transformers.
A ``python -m venv --system-site-packages`` made from /opt/torch/.venv/bin/python3 would not see that
venv's torch (it inherits the *base* interpreter's site-packages), hence ``--target``.

    # GPU machine (no internet); sparsify's wheels carried in .whl/spx/ (git-ignored, named in `carry`):
    python3 bench/gpu_sparsify.py --install-from .whl/spx --model MODEL_DIR --tokens-file tokens.npy \\
        --layers 0-17 --num-latents 16384 --k 32 --batch-size 32 --max-tokens 10000000 --out /tmp/spx-out

    # here, on CPU (or install once: pip install --no-deps --target /tmp/spx-local eai-sparsify==1.3.3 ...):
    PYTHONPATH=/tmp/spx-local .venv/bin/python bench/gpu_sparsify.py --model DIR --tokens-file t.npy ...

``--install-from WHEELS`` installs every wheel of that folder into ``--site`` (default /tmp/spx) and
re-runs this script with that folder first on PYTHONPATH. Without it, sparsify must already be importable.
Wheels for the GPU image (Python 3.12; torch, transformers, numpy, safetensors, einops, accelerate,
huggingface-hub, pandas, pyarrow, xxhash, fsspec are already there): eai-sparsify 1.3.3, datasets 5.2.0,
dill 0.4.1, multiprocess 0.70.19, natsort 8.4.0, schedulefree 1.4.1, simple-parsing 0.1.9, docstring-parser 0.18.0.

What it does: loads the model like sparsify's CLI (``AutoModel``, bf16 on CUDA, the config's dtype on
CPU), wraps the (n_contexts, ctx_len) token ids of ``--tokens-file`` in a torch Dataset in file order
(sparsify does not shuffle), and calls ``sparsify.Trainer(cfg, dataset, model).fit()`` with sparsify's
defaults except: num_latents, k, batch_size (sequences per step), layers, save_dir/run_name,
log_to_wandb=False, save_every past the last step (one save at the end), and exclude_tokens = the
tokenizer's BOS/EOS/pad/special ids (what saescope drops; ``--exclude none`` keeps sparsify's default).
The SAEs land in ``--out/sparsify/layers.N/{cfg.json, sae.safetensors}`` (sparsify's layout, read by
saescope's ``formats.read_sae_folder``); ``--out/timing.json`` holds the timings and the config.
tokens/s = positions forwarded (BOS etc. included) / fit time (final save and model load excluded);
tokens_per_s_after_first_step leaves out the first step (CUDA/Triton warm-up);
trained_tokens_per_s_with_init_and_save = ordinary tokens / (Trainer init + fit + save), as bench_peers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

RUN_NAME = "sparsify"


def install(wheels: Path, site: Path) -> None:
    """Install every wheel in `wheels` into `site` (offline, no dependency resolution)."""
    files = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not any("sparsify" in Path(f).name for f in files):
        sys.exit(f"no eai_sparsify wheel in {wheels}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *files], check=True)


def reexec_with(site: Path) -> None:
    """Run this script again with `site` first on PYTHONPATH and without --install-from."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--install-from":
            skip = True
        elif not a.startswith("--install-from="):
            argv.append(a)
    sys.exit(subprocess.run([sys.executable, __file__, *argv], env=env).returncode)


def import_sparsify():
    """Import sparsify; `datasets` is only a type annotation in its Trainer, so a missing or broken
    `datasets` (e.g. an older pyarrow on the GPU image) is replaced by an empty stand-in module."""
    try:
        import datasets  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure of datasets
        import types

        print(f"datasets not importable ({type(e).__name__}: {e}); using a stand-in (types only)", file=sys.stderr)
        stub = types.ModuleType("datasets")
        stub.Dataset = type("Dataset", (), {})
        stub.DatasetDict = type("DatasetDict", (), {})
        stub.load_dataset = None
        sys.modules["datasets"] = stub
    import sparsify

    return sparsify


class TokenDataset(torch.utils.data.Dataset):
    """Rows of a 2-D token-id array as sparsify batches: {"input_ids": LongTensor(ctx_len)}."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": torch.tensor(self.ids[i], dtype=torch.long)}

    def select(self, rows: range) -> TokenDataset:
        return TokenDataset(self.ids[rows.start:rows.stop])


def load_tokens(path: Path, max_tokens: int | None, vocab: int) -> np.ndarray:
    ids = np.load(path, mmap_mode="r")
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.size == 0:
        sys.exit(f"{path}: expected a non-empty 2-D integer array (n_contexts, ctx_len), got {ids.dtype} {ids.shape}")
    if max_tokens:
        n = max_tokens // ids.shape[1]
        if n < 1:
            sys.exit(f"--max-tokens {max_tokens} is less than one context of {ids.shape[1]} tokens")
        ids = ids[:n]
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.min() < 0 or ids.max() >= vocab:
        sys.exit(f"{path}: token ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
    return ids


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'0-17', '3,6,9' or 'all' → sorted layer indices."""
    if text == "all":
        return list(range(n_layers))
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    if not out or min(out) < 0 or max(out) >= n_layers:
        sys.exit(f"--layers {text}: the model has layers 0-{n_layers - 1}")
    return sorted(out)


def special_ids(model_dir: Path) -> list[int]:
    """BOS/EOS/pad and the tokenizer's special ids: the positions saescope drops (models.LoadedModel)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *(getattr(tok, "all_special_ids", []) or [])}
    return sorted(int(i) for i in ids if i is not None)


def load_model(model_dir: Path, device: str):
    """As sparsify's CLI does for loss_fn='fvu': the base AutoModel, bf16 where CUDA supports it."""
    from transformers import AutoModel

    bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    model = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else "auto")
    return model.to(device).eval()


def make_config(sparsify, args, layers: list[int], exclude: list[int]):
    cfg = sparsify.TrainConfig(
        sparsify.SaeConfig(num_latents=args.num_latents, k=args.k),
        batch_size=args.batch_size, layers=layers, exclude_tokens=exclude, save_dir=str(args.out),
        run_name=RUN_NAME, log_to_wandb=False, save_every=10**12)
    for name in ("optimizer", "lr", "auxk_alpha", "micro_acc_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    return cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(optimizer, device: str) -> list[float]:
    """Wrap `optimizer.step` to record when each step ends (sparsify already syncs every step via .item())."""
    ends: list[float] = []
    real_step = optimizer.step

    def step(*a, **kw):
        out = real_step(*a, **kw)
        sync(device)
        ends.append(time.perf_counter())
        return out

    optimizer.step = step
    return ends


def train(sparsify, args, model, ids: np.ndarray, layers: list[int], exclude: list[int], device: str) -> dict:
    """Build sparsify's Trainer and fit it, timing init, fit and the final save apart."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = make_config(sparsify, args, layers, exclude)
    t0 = time.perf_counter()
    trainer = sparsify.Trainer(cfg, TokenDataset(ids), model)
    sync(device)
    t_init = time.perf_counter() - t0
    save_s = []
    real_save = trainer.save

    def timed_save():
        sync(device)
        s = time.perf_counter()
        real_save()
        save_s.append(time.perf_counter() - s)

    trainer.save = timed_save
    step_ends = time_steps(trainer.optimizers[0], device)
    t1 = time.perf_counter()
    trainer.fit()
    sync(device)
    t_fit = time.perf_counter() - t1 - sum(save_s)
    n_pos = int(ids.size)
    n_trained = int((~np.isin(ids, np.asarray(exclude, dtype=np.int64))).sum()) if exclude else n_pos
    first = min(args.batch_size, len(ids)) * ids.shape[1]  # positions of the first step
    steady = (n_pos - first) / (step_ends[-1] - step_ends[0]) if len(step_ends) > 1 else None
    return {
        "tokens_forwarded": n_pos, "tokens_trained": n_trained, "steps": trainer.global_step,
        "init_s": round(t_init, 3), "fit_s": round(t_fit, 3), "save_s": round(sum(save_s), 3),
        "tokens_per_s": round(n_pos / t_fit, 1),
        "tokens_per_s_after_first_step": round(steady, 1) if steady else None,
        "trained_tokens_per_s_with_init_and_save": round(n_trained / (t_fit + t_init + sum(save_s)), 1),
        "peak_gpu_mem_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 3)
                             if device.startswith("cuda") else None),
        "train_config": asdict(cfg),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="local Hugging Face model folder")
    p.add_argument("--tokens-file", type=Path, required=True, help=".npy of int token ids (n_contexts, ctx_len)")
    p.add_argument("--layers", default="all", help="'all', '0-17' or '3,6'")
    p.add_argument("--num-latents", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step (sparsify's unit)")
    p.add_argument("--max-tokens", type=int, default=None, help="train on the first N tokens (whole contexts)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--exclude", choices=("special", "none"), default="special",
                   help="special: skip BOS/EOS/pad/special positions as saescope does; none: sparsify's default")
    p.add_argument("--optimizer", choices=("signum", "adam", "muon"), default=None, help="default: sparsify's")
    p.add_argument("--lr", type=float, default=None, help="default: sparsify's (by num_latents)")
    p.add_argument("--auxk-alpha", dest="auxk_alpha", type=float, default=None, help="default: sparsify's")
    p.add_argument("--micro-acc-steps", dest="micro_acc_steps", type=int, default=None)
    p.add_argument("--install-from", type=Path, default=None, help="folder of wheels to install first (offline)")
    p.add_argument("--site", type=Path, default=Path("/tmp/spx"), help="where --install-from installs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.install_from:
        install(args.install_from, args.site)
        reexec_with(args.site)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sparsify = import_sparsify()
    t0 = time.perf_counter()
    model = load_model(args.model, device)
    load_s = time.perf_counter() - t0
    cfg = model.config
    ids = load_tokens(args.tokens_file, args.max_tokens, cfg.vocab_size)
    layers = parse_layers(args.layers, cfg.num_hidden_layers)
    exclude = special_ids(args.model) if args.exclude == "special" else []
    args.out.mkdir(parents=True, exist_ok=True)
    result = train(sparsify, args, model, ids, layers, exclude, device)
    result.update(
        tool="sparsify", sparsify_version=sparsify.__version__, torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        model=str(args.model), model_dtype=str(model.dtype), attn_implementation=cfg._attn_implementation,
        model_load_s=round(load_s, 3), ctx_len=int(ids.shape[1]), layers=layers,
        sae_folder=str(args.out / RUN_NAME))
    tmp = args.out / "timing.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(args.out / "timing.json")
    print(json.dumps({k: v for k, v in result.items() if k != "train_config"}))


if __name__ == "__main__":
    main()
