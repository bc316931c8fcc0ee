"""GPU benchmark (issue #21): Gemma 3 270M, all 18 layers, resid_post, width 16,384, on one CUDA GPU.

    python bench/gpu.py --prepared .gpu --out OUT [--train-tokens 4000000] [--sparsify-python PY]

Skips with the reason when torch sees no CUDA GPU (`--allow-cpu` runs the same phases on the CPU with
small sizes, to check the script). Inputs come from bench/gpu_prepare.py (the GPU machine has no network):
the default corpus packed into contexts of 1,024 tokens (train and held-out) and the model's GGUF.

Phases, in this order, each written to OUT/gpu.json as soon as it ends (a time-out keeps what finished):
1. bare forward: the decoder stack only (no LM head, no hooks), and the whole model with its LM head;
2. harvest: saescope's forward that captures all 18 sites and drops BOS/EOS/pad positions;
3. harvest + train, JumpReLU (target L0 32) then BatchTopK (k 32): 18 SAEs of width 16,384 trained from
   the live model, batch 4,096 tokens, SAEs in fp32 (TF32 matmuls), model in bf16; tokens/s over the run
   and over its second half (steady state), peak GPU memory, held-out FVU/L0 per layer;
4. sparsify (EleutherAI): its own Trainer, in its own venv (bench/gpu_sparsify.py), TopK k 32, 16,384
   latents, on the same train contexts; its saved SAEs are read with saescope.formats and evaluated here
   on the same held-out activations;
5. cache: harvest to an on-disk fp16 cache, then train the 18 JumpReLU SAEs from it (pinned, overlapped
   host→GPU copies), with TF32 matmuls and in strict fp32 side by side.

On this workplace's lent GPU (no network, 64 MiB per call, warm 30 s between calls): bench/gpu_session.sh does
the whole check in two back-to-back calls (its comment says how; session 17 in bench/RESULTS.md). The model is
unpacked there in ~45 s and kept in /tmp/saescope-gpu-bench/model for later calls on the same machine (`--model`
that folder instead of `--compact`). The first machine start took 40 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from saescope import devices  # noqa: E402
from saescope.evaluate import fidelity  # noqa: E402
from saescope.formats import read_sae_folder  # noqa: E402
from saescope.harvest import harvest  # noqa: E402
from saescope.models import load_model  # noqa: E402
from saescope.pipeline import sae_configs  # noqa: E402
from saescope.train import Chunk, MultiTrainer, TrainConfig  # noqa: E402

RESULTS: dict = {}
START = time.time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_gib(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def save(out: Path) -> None:
    tmp = out / "gpu.json.tmp"
    tmp.write_text(json.dumps(RESULTS, indent=1))
    os.replace(tmp, out / "gpu.json")


def contexts(tokens: np.ndarray, n_tokens: int) -> list[list[int]]:
    n = min(len(tokens), -(-n_tokens // tokens.shape[1]))
    return tokens[:n].astype(np.int64).tolist()


# ------------------------------------------------------------------------------------------- phases


def bare_forward(lm, ctxs, batch: int) -> dict:
    """Tokens/s of the decoder stack alone and of the whole model (LM head included), no hooks."""
    decoder = lm.model.get_decoder()
    out = {}
    for name, fn in (("decoder", lambda ids: decoder(input_ids=ids, use_cache=False)),
                     ("with_lm_head", lambda ids: lm.model(input_ids=ids, use_cache=False, logits_to_keep=0))):
        with torch.no_grad():
            fn(torch.tensor(ctxs[:batch], device=lm.device))  # warm-up
            sync(lm.device)
            t0, n = time.perf_counter(), 0
            for i in range(0, len(ctxs) - batch + 1, batch):
                ids = torch.tensor(ctxs[i:i + batch], device=lm.device)
                fn(ids)
                n += ids.numel()
            sync(lm.device)
        out[name] = {"tokens": n, "tok_s": round(n / (time.perf_counter() - t0))}
    return out


def harvest_rate(lm, ctxs, sites, batch: int) -> dict:
    list(harvest(lm, iter(ctxs[:batch]), sites, batch_size=batch, progress=False))  # warm-up
    sync(lm.device)
    t0, n = time.perf_counter(), 0
    for b in harvest(lm, iter(ctxs), sites, batch_size=batch, progress=False):
        n += len(b.token_ids)
    sync(lm.device)
    return {"tokens": n, "tok_s": round(n / (time.perf_counter() - t0))}


STEP_VARIANTS = {  # name: (architecture, TrainConfig settings, batch multiple)
    "jump_relu_fused": ("jump_relu", {"cuda_graphs": False, "bf16_matmuls": False}, 1),  # session 9's step
    "jump_relu_graph": ("jump_relu", {"bf16_matmuls": False}, 1),  # the step replayed as one CUDA graph, TF32
    "jump_relu_graph_bf16": ("jump_relu", {"bf16_matmuls": True}, 1),  # the default on a GPU
    "batchtopk_graph_bf16": ("batchtopk", {"bf16_matmuls": True}, 1),
    "jump_relu_graph_bf16_2x": ("jump_relu", {"bf16_matmuls": True}, 2),
}


def step_rates(lm, sites, width: int, l0: float, batch: int, steps: int = 8) -> dict:
    """Training alone (no model): 18 SAEs stepping on random activations, dense fused step: each kernel launched
    (session 9's), replayed as CUDA graphs (now the default), with bf16 matrix products, BatchTopK, twice the
    batch. The first 3 steps (compile, the first-seen eager step, the capture) are not timed."""
    from saescope.sae import SAEConfig

    out = {}
    x = torch.randn(2 * batch * (steps + 3), lm.d_model, device=lm.device)
    one_batch = batch
    for name, (arch, settings, mult) in STEP_VARIANTS.items():
        batch = mult * one_batch
        cfgs = [SAEConfig(d_in=lm.d_model, width=width, architecture=arch, l0=l0, site="resid_post",
                          layer=s.layer) for s in sites]
        mt = MultiTrainer(cfgs, TrainConfig(tokens=10**9, batch_size=batch, **settings), device=lm.device)
        try:
            reset_peak(lm.device)
            t_compile = time.perf_counter()
            for i in range(steps + 3):
                if i == 3:
                    sync(lm.device)
                    t0 = time.perf_counter()
                    out.setdefault("warmup_s", {})[name] = round(t0 - t_compile, 1)
                mt._step_all({s.key: x[i * batch:(i + 1) * batch] for s in sites})
            sync(lm.device)
            out[name] = {"tok_s": round(steps * batch / (time.perf_counter() - t0)), "peak_gib": peak_gib(lm.device),
                         "batch": batch, "graphs": sum(len(t._graphs) for t in mt.trainers),
                         "graph_off": sorted({t.graph_off for t in mt.trainers if t.graph_off})}
            if name == "jump_relu_graph_bf16" and lm.device.type == "cuda":
                out["profile_graph_bf16"] = profile_steps(mt, sites, x[:batch], lm.device)
        except Exception as err:  # a variant that fails keeps the others
            out[name] = {"tok_s": None, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        del mt
    return out


def profile_steps(mt, sites, x, dev, steps: int = 2) -> list[str]:
    """The kernels of `steps` steps of every SAE, by GPU time (torch.profiler): where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            mt._step_all({s.key: x for s in sites})
        sync(dev)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60)
    return table.splitlines()


def heldout_acts(lm, ctxs, sites) -> dict[str, torch.Tensor]:
    acts: dict[str, list] = {s.key: [] for s in sites}
    for b in harvest(lm, iter(ctxs), sites, batch_size=8, progress=False):
        for k, v in b.acts.items():
            acts[k].append(v)
    return {k: torch.cat(v) for k, v in acts.items()}


def held_out(saes: dict[int, object], acts: dict[str, torch.Tensor], dev) -> dict:
    per_layer = {}
    for layer, sae in sorted(saes.items()):
        m = fidelity(sae.to(dev), acts[f"resid_post/{layer}"])
        per_layer[layer] = {k: round(v, 4) for k, v in m.items() if k in ("fvu", "l0", "dead_fraction")}
    fvus = [m["fvu"] for m in per_layer.values()]
    return {"per_layer": per_layer, "mean_fvu": round(float(np.mean(fvus)), 4),
            "mean_l0": round(float(np.mean([m["l0"] for m in per_layer.values()])), 2)}


class Clock:
    """Wraps a chunk stream: wall time and tokens at each chunk, for the steady-state rate."""

    def __init__(self, chunks, dev):
        self.chunks, self.dev, self.marks = chunks, dev, []

    def __iter__(self):
        for c in self.chunks:
            sync(self.dev)
            self.marks.append((time.perf_counter(), sum(int(v.shape[0]) for v in list(c.acts.values())[:1])))
            yield c

    def rates(self, t_end: float) -> dict:
        times = [t for t, _ in self.marks] + [t_end]
        toks = np.cumsum([0] + [n for _, n in self.marks])
        total = toks[-1] / (times[-1] - times[0])
        half = len(self.marks) // 2
        steady = (toks[-1] - toks[half]) / (times[-1] - times[half]) if half else total
        return {"tokens": int(toks[-1]), "tok_s": round(float(total)), "tok_s_second_half": round(float(steady))}


def train_live(lm, ctxs, sites, arch: str, tokens: int, width: int, l0: float, batch: int, hbatch: int,
               held_sets: dict[str, dict[str, torch.Tensor]], **settings) -> dict:
    cfgs = sae_configs(lm, "gemma-3-270m", ["resid_post"], [s.layer for s in sites], [width], [l0], arch)
    reset_peak(lm.device)
    t0 = time.perf_counter()
    trainer = MultiTrainer(cfgs, TrainConfig(tokens=tokens, batch_size=batch, **settings), device=lm.device)
    stream = harvest(lm, iter(ctxs), sites, batch_size=hbatch, progress=False)
    clock = Clock((Chunk(b.acts, b.n_contexts) for b in stream), lm.device)
    trainer.fit(clock, progress=False)
    sync(lm.device)
    t_end = time.perf_counter()
    out = {**clock.rates(t_end), "wall_s": round(t_end - t0, 1), "peak_gib": peak_gib(lm.device),
           "failures": trainer.failures, "batch": batch, "width": width, "l0": l0, "settings": settings,
           "graphs": sum(len(t._graphs) for t in trainer.trainers),
           "graph_off": sorted({t.graph_off for t in trainer.trainers if t.graph_off})}
    saes = {t.cfg.layer: t.export() for t in trainer.trainers if not t.failed}
    for name, acts in held_sets.items():  # "heldout", then each --heldout-extra sample ("heldout_NAME")
        out[name] = held_out(saes, acts, lm.device)
    # the training batches' L0 (EMA of the last ~10 steps) and the controller's λ, per layer: against held-out L0
    out["train_l0"] = {t.cfg.layer: round(t.ema["l0"], 2) for t in trainer.trainers if not t.failed}
    out["log_lambda"] = {t.cfg.layer: round(t.log_lambda, 3) for t in trainer.trainers if not t.failed}
    del trainer
    return out


def train_cache(lm, ctxs, sites, tokens: int, width: int, l0: float, batch: int, hbatch: int, folder: Path,
                held, tf32: bool) -> dict:
    from saescope.pipeline import _cache_chunks
    from saescope.store import CacheWriter

    if not (folder / "manifest.json").is_file() or not json.loads((folder / "manifest.json").read_text()).get(
            "complete"):
        t0 = time.perf_counter()
        with CacheWriter(folder, {s.key: s.width for s in sites}, dtype="float16") as writer:
            for b in harvest(lm, iter(ctxs), sites, batch_size=hbatch, max_tokens=tokens, progress=False):
                writer.add(b)
        RESULTS.setdefault("cache_write", {"tokens": tokens, "s": round(time.perf_counter() - t0, 1)})
    cfgs = sae_configs(lm, "gemma-3-270m", ["resid_post"], [s.layer for s in sites], [width], [l0], "jump_relu")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        reset_peak(lm.device)
        train = TrainConfig(tokens=tokens, batch_size=batch, bf16_matmuls=False)
        trainer = MultiTrainer(cfgs, train, device=lm.device)
        t0 = time.perf_counter()
        clock = Clock(_cache_chunks(folder, trainer, train), lm.device)
        trainer.fit(clock, progress=False)
        sync(lm.device)
        t_end = time.perf_counter()
        out = {**clock.rates(t_end), "wall_s": round(t_end - t0, 1), "peak_gib": peak_gib(lm.device), "tf32": tf32}
        out["heldout"] = held_out({t.cfg.layer: t.export() for t in trainer.trainers if not t.failed}, held,
                                  lm.device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def sparsify(args, model_folder: str, train_file: Path, layers: list[int], tokens: int, held, dev) -> dict:
    """sparsify's own Trainer in its own venv (bench/gpu_sparsify.py), then held-out FVU here."""
    out_dir = Path(args.work) / "sparsify-out"
    cmd = [args.sparsify_python, str(HERE / "gpu_sparsify.py"), "--model", model_folder, "--tokens-file",
           str(train_file), "--layers", ",".join(map(str, layers)), "--num-latents", str(args.width), "--k",
           str(int(args.l0)), "--batch-size", str(args.sparsify_batch), "--max-tokens", str(tokens), "--out",
           str(out_dir)] + (["--install-from", args.sparsify_wheels] if args.sparsify_wheels else [])
    log("sparsify: " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.sparsify_timeout)
    tail = (proc.stdout + proc.stderr)[-3000:]
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    timing = json.loads((out_dir / "timing.json").read_text())
    saes = {}
    for folder in sorted(p.parent for p in out_dir.rglob("cfg.json")):
        layer = int(folder.name.split(".")[-1])
        saes[layer] = read_sae_folder(folder)
    return {"timing": timing, "heldout": held_out(saes, held, dev), "log_tail": tail[-800:]}


# ------------------------------------------------------------------------------------------- main


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = devices.use(args.device)  # on CUDA: TF32 matrix products, as `saescope --device cuda`
    RESULTS.update({"device": devices.describe(dev), "torch": torch.__version__, "args": vars(args),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    prepared = Path(args.prepared)
    train_tok = np.load(prepared / "tokens-train.npz")["tokens"]
    held_tok = np.load(prepared / "tokens-heldout.npz")["tokens"]
    t0 = time.perf_counter()
    if args.compact:
        args.model = compact_model(prepared, Path(args.work))
    lm = load_model(args.model, device=str(dev))
    RESULTS["model_load_s"] = round(time.perf_counter() - t0, 1)
    layers = list(range(lm.n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    sites = lm.sites(kinds=("resid_post",), layers=layers)
    RESULTS.update({"model": args.model, "dtype": str(lm.dtype), "layers": layers, "ctx_len": int(train_tok.shape[1])})
    log(f"model on {RESULTS['device']} in {RESULTS['model_load_s']} s; {len(layers)} layers")
    fwd_ctx = contexts(train_tok, args.forward_tokens)
    steps = [("forward", lambda: bare_forward(lm, fwd_ctx, args.harvest_batch)),
             ("harvest", lambda: harvest_rate(lm, fwd_ctx, sites, args.harvest_batch)),
             ("train_step_only", lambda: step_rates(lm, sites, args.width, args.l0, args.batch))]
    samples = {"heldout": held_tok} | {f"heldout_{Path(p).stem.removeprefix('tokens-heldout-')}": np.load(p)["tokens"]
                                         for p in filter(None, (args.heldout_extra or "").split(","))}
    held_all = {name: heldout_acts(lm, tok.astype(np.int64).tolist(), sites) for name, tok in samples.items()}
    for name, acts in held_all.items():
        RESULTS[f"{name}_tokens"] = int(next(iter(acts.values())).shape[0])
    held = held_all["heldout"]
    train_ctx = contexts(train_tok, args.train_tokens * 11 // 10)
    for i, run_name in enumerate(args.archs.split(",")):  # e.g. jump_relu, jump_relu+bf16, batchtopk+bf16
        arch, *opts = run_name.split("+")
        settings: dict = {"bf16_matmuls": "bf16" in opts, "cuda_graphs": "eager" not in opts}
        hbatch = args.harvest_batch
        for opt in opts:  # NAME=VALUE: a TrainConfig field (e.g. lambda_rate=0.4, floor_tokens=0); hb=N contexts
            if opt.startswith("hb="):  # per forward pass (each pass's rows are shuffled into its steps)
                hbatch = int(opt[3:])
            elif "=" in opt:
                name, value = opt.split("=", 1)
                default = getattr(TrainConfig, name)  # (optimizer=adam: a string)
                settings[name] = value if isinstance(default, str) else type(default)(float(value))
        batch = args.batch * (2 if "2x" in opts else 1)
        steps.append((f"train_{run_name}", lambda arch=arch, settings=settings, batch=batch, hbatch=hbatch: train_live(
            lm, train_ctx, sites, arch, args.train_tokens, args.width, args.l0, batch, hbatch, held_all, **settings)))
        if i == 0 and args.sparsify_python:  # right after ours, before the other runs
            steps.append(("sparsify", lambda: sparsify(args, lm_folder(args.model),
                                                       write_train_file(args, train_tok), layers, args.train_tokens,
                                                       held, dev)))
    if args.cache_tokens:
        folder = Path(args.work) / "cache"
        cache_ctx = contexts(train_tok, args.cache_tokens * 11 // 10)
        for tf32 in (True, False):
            steps.append((f"cache_train_{'tf32' if tf32 else 'fp32'}", lambda tf32=tf32: train_cache(
                lm, cache_ctx, sites, args.cache_tokens, args.width, args.l0, args.batch, args.harvest_batch, folder,
                held, tf32)))
    for name, fn in steps:
        if args.only and name not in args.only.split(","):
            continue
        if time.time() - START > args.deadline_s:
            RESULTS[name] = {"error": f"skipped: past the --deadline-s of {args.deadline_s:.0f} s"}
            continue
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            RESULTS[name] = fn()
        except Exception as err:  # one phase failing keeps the others
            import traceback

            RESULTS[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        RESULTS[name]["phase_s"] = round(time.perf_counter() - t, 1)
        save(out)
        log(f"{name}: {summary(RESULTS[name])}")
    save(out)


def compact_model(prepared: Path, work: Path) -> str:
    """The model folder from bench/gpu_prepare.py --compact's pieces: the GGUF (unused embedding rows zeroed)
    dequantised by transformers, and the tokenizer as converted on the preparing machine."""
    import gzip
    import hashlib
    import tarfile

    from transformers import AutoModelForCausalLM

    info = json.loads((prepared / "prepared.json").read_text())["compact"]
    folder = work / "model"
    if (folder / "config.json").is_file():
        return str(folder)
    data = gzip.decompress(b"".join((prepared / p).read_bytes() for p in info["parts"]))
    if hashlib.sha256(data).hexdigest() != info["gguf_sha256"]:
        raise SystemExit("bench/gpu.py: the compact GGUF's pieces do not add up (SHA-256 differs); send them again")
    gg = work / "gg" / info["file"]
    gg.parent.mkdir(parents=True, exist_ok=True)
    gg.write_bytes(data)
    model = AutoModelForCausalLM.from_pretrained(gg.parent, gguf_file=gg.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    with tarfile.open(prepared / "tokenizer.tar.gz") as tar:
        tar.extractall(folder, filter="data")
    log(f"compact model: {info['rows_kept']:,} of {info['vocab']:,} embedding rows, unpacked to {folder}")
    return str(folder)


def lm_folder(model: str) -> str:
    from saescope.models import _resolve

    return _resolve(model)


def write_train_file(args, tokens: np.ndarray) -> Path:
    path = Path(args.work) / "tokens-train.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tokens[: -(-args.train_tokens * 11 // 10 // tokens.shape[1])].astype(np.int64))
    return path


def summary(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:300]
    keys = ("tok_s", "tok_s_second_half", "peak_gib", "wall_s")
    parts = [f"{k} {r[k]}" for k in keys if k in r]
    if "decoder" in r or "jump_relu_fused" in r:
        parts = [f"{k} {v.get('tok_s')} tok/s" for k, v in r.items() if isinstance(v, dict) and "tok_s" in v]
    for key in [k for k in r if k.startswith("heldout") and isinstance(r[k], dict)]:
        parts.append(f"{key} FVU {r[key]['mean_fvu']} L0 {r[key]['mean_l0']}")
    if r.get("train_l0"):
        parts.append(f"train-batch L0 mean {np.mean(list(r['train_l0'].values())):.1f}")
    if "timing" in r:
        parts.append(f"sparsify {r['timing']}")
    return ", ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepared", default=".gpu")
    ap.add_argument("--model", default=".gpu/gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/out/gpu"))
    ap.add_argument("--work", default="/tmp/saescope-gpu-bench")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--allow-cpu", action="store_true", help="Run on the CPU when there is no GPU (a check).")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--width", type=int, default=16_384)
    ap.add_argument("--l0", type=float, default=32)
    ap.add_argument("--archs", default="jump_relu,jump_relu+bf16,batchtopk+bf16",
                    help="Live runs, each ARCH[+bf16][+eager][+2x][+FIELD=VALUE] (bf16 matrix products; no CUDA graphs; twice "
                         "--batch); sparsify right after the first.")
    ap.add_argument("--compact", action="store_true", help="The model from gpu_prepare.py --compact's pieces.")
    ap.add_argument("--batch", type=int, default=4096, help="Training tokens per step.")
    ap.add_argument("--harvest-batch", type=int, default=32, help="Contexts per forward pass.")
    ap.add_argument("--forward-tokens", type=int, default=1_000_000)
    ap.add_argument("--train-tokens", type=int, default=4_000_000)
    ap.add_argument("--cache-tokens", type=int, default=262_144)
    ap.add_argument("--sparsify-python", default=None, help="python of sparsify's venv (bench/gpu_sparsify.py).")
    ap.add_argument("--sparsify-timeout", type=int, default=240)
    ap.add_argument("--sparsify-wheels", default=None, help="Folder of sparsify's wheels (installed offline).")
    ap.add_argument("--sparsify-batch", type=int, default=32, help="sparsify's batch, in contexts (its default).")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="Start no phase after this many seconds.")
    ap.add_argument("--only", default=None, help="Comma-separated phases to run.")
    ap.add_argument("--heldout-extra", default=None,
                    help="Comma-separated token files (.npz, as gpu_prepare.py writes) of further held-out samples: "
                         "each live run's SAEs are measured on them too (heldout_NAME).")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("bench/gpu.py: skipped: torch sees no CUDA GPU on this machine (run it on one; --allow-cpu checks "
              "the script on the CPU with small sizes)")
        return
    if not torch.cuda.is_available():
        args.device = "cpu"
    run(args)


if __name__ == "__main__":
    main()
