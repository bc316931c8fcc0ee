"""saescope vs SAELens and EleutherAI sparsify on the same tokens, back to back in one run.

    .venv/bin/python bench/bench_peers.py --part saelens|sparsify|all [--no-append]

Each peer lives in its own virtual environment under /tmp (created on first use: torch==2.13.0 is
installed first so pip keeps the CPU build, then `sae-lens` / `eai-sparsify`, EleutherAI's sparsify
on PyPI). Peer code only ever runs in a subprocess of its own venv; activations and token ids are
exchanged through .safetensors / .json files under --work (default /tmp/peer-bench). Every SAE is
evaluated here, in saescope's venv, on the same held-out activations (our harvest of the corpus'
held-out split, BOS/EOS/pad dropped), after loading the peer's saved folder with
`saescope.formats.read_sae_folder`.

--part saelens (one layer, resid_post layer 6, width 4096):
  our harvest of --sl-tokens train tokens at layer 6 is fed to SAELens' own `SAETrainer` through its
  `DataProvider` seam (an iterator of shuffled batches of `train_batch_size_tokens` rows from the
  in-memory tensor), with every other setting at the defaults of `LanguageModelSAERunnerConfig` and
  `JumpReLUTrainingSAEConfig` (run "default"), and once more with its Gemma-Scope-2 target-L0 mode
  (`jumprelu_sparsity_loss_mode="quadratic", target_l0=L0*`, run "quadratic") — the closest it has
  to "same target L0". Ours: `MultiTrainer` JumpReLU (L0* = --l0) and TopK (k = --l0) on the same
  tensor. Order: ours JumpReLU, SAELens default, ours TopK, SAELens quadratic, ours JumpReLU again
  (timing only). Tokens/s = training tokens / wall time of the trainer's fit (data already in RAM,
  SAE init and saving excluded for both). Held-out L0/FVU/dead/dense on --heldout tokens;
  ΔLM loss with `delta_lm_loss` on the first --delta-contexts held-out contexts.

--part sparsify (all 18 layers, resid_post = decoder-layer outputs = sparsify's default hookpoints):
  end to end, model forward included. Ours: `saescope.pipeline.train_run(..., architecture="topk",
  l0s=(k,), train=TrainConfig(tokens=--sp-tokens))` with the model already loaded. sparsify: its
  Python `Trainer` (the CLI insists on CUDA) on CPU, `SaeConfig(k=k, num_latents=4096)`, its defaults
  otherwise (signum optimizer, lr auto, no aux-k), except: `batch_size` = each of --sp-batch contexts
  (default 1 and 4: 256 tokens per step as ours, and 1,024; its default 32 would give it only ~6 steps
  in 50k tokens; ours is compared with the better of the two on each layer and the faster in speed), `exclude_tokens` =
  BOS/EOS/pad (ours drops them too), `log_to_wandb=False`. It gets exactly the train contexts our
  run consumes (the same `Corpus().contexts(tokenizer, "train", 256)` stream; the model is loaded
  from saescope's converted safetensors folder). Tokens/s = ordinary (trained-on) tokens / wall time
  of Trainer construction + fit (model already loaded, for both). Held-out FVU per layer.
Results are appended to bench/RESULTS.md under "## Peers: ...".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saescope.corpus import Corpus  # noqa: E402
from saescope.evaluate import delta_lm_loss, fidelity  # noqa: E402
from saescope.formats import read_sae_folder  # noqa: E402
from saescope.harvest import harvest  # noqa: E402
from saescope.models import _resolve, load_model  # noqa: E402
from saescope.sae import SAEConfig  # noqa: E402
from saescope.train import Chunk, MultiTrainer, TrainConfig  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"
CTX = 256

PEERS = {
    "saelens": {"venv": "/tmp/peer-saelens", "pip": ["sae-lens==6.54.12"], "dist": "sae-lens"},
    "sparsify": {"venv": "/tmp/peer-sparsify", "pip": ["eai-sparsify==1.3.3"], "dist": "eai-sparsify"},
}

SAELENS_WORKER = textwrap.dedent('''
    import json, sys, time, torch
    from importlib.metadata import version
    from safetensors.torch import load_file
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer
    job = json.load(open(sys.argv[1]))
    x = load_file(job["acts"])["x"]
    sae_cfg = JumpReLUTrainingSAEConfig(d_in=x.shape[1], d_sae=job["width"], **job["sae_kwargs"])
    runner = LanguageModelSAERunnerConfig(sae=sae_cfg, training_tokens=job["tokens"], device="cpu",
                                          logger=LoggingConfig(log_to_wandb=False))
    tcfg = runner.to_sae_trainer_config()
    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(sae_cfg)
    def provider():  # SAELens' DataProvider seam: an iterator of (batch, d_in) activation batches
        g, bs = torch.Generator().manual_seed(0), tcfg.train_batch_size_samples
        while True:
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - bs + 1, bs):
                yield x[perm[i:i + bs]]
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider())
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    sae.save_inference_model(job["out"])
    print("RESULT " + json.dumps({"wall": wall, "tokens": trainer.n_training_samples, "steps": trainer.n_training_steps,
          "batch": tcfg.train_batch_size_samples, "lr": tcfg.lr, "lr_scheduler": tcfg.lr_scheduler_name,
          "adam": [tcfg.adam_beta1, tcfg.adam_beta2], "l0_coefficient": sae_cfg.l0_coefficient,
          "mode": sae_cfg.jumprelu_sparsity_loss_mode, "bandwidth": sae_cfg.jumprelu_bandwidth,
          "init_threshold": sae_cfg.jumprelu_init_threshold, "normalize": sae_cfg.normalize_activations,
          "train_l0": trainer.sae.cfg.metadata.l0, "sae_lens": version("sae-lens"), "torch": torch.__version__,
          "threads": torch.get_num_threads()}))
''')

SPARSIFY_WORKER = textwrap.dedent('''
    import json, sys, time, torch
    from importlib.metadata import version
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from sparsify import SaeConfig, Trainer, TrainConfig
    job = json.load(open(sys.argv[1]))
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    ids = json.load(open(job["contexts"]))
    ds = Dataset.from_dict({"input_ids": ids}).with_format("torch")
    cfg = TrainConfig(SaeConfig(k=job["k"], num_latents=job["width"]), batch_size=job["batch_size"],
                      exclude_tokens=job["exclude"], log_to_wandb=False, save_dir=job["out"], run_name="run")
    t0 = time.perf_counter()
    trainer = Trainer(cfg, ds, model)
    trainer.fit()
    wall = time.perf_counter() - t0
    used = ids[: (len(ids) // job["batch_size"]) * job["batch_size"]]
    excl = set(job["exclude"])
    n_tok = sum(1 for c in used for t in c if t not in excl)
    print("RESULT " + json.dumps({"wall": wall, "tokens": n_tok, "contexts": len(used), "steps": trainer.global_step,
          "hookpoints": cfg.hookpoints, "optimizer": cfg.optimizer, "sparsify": version("eai-sparsify"),
          "torch": torch.__version__, "threads": torch.get_num_threads()}))
''')


def ensure_venv(peer: str) -> Path:
    spec = PEERS[peer]
    py = Path(spec["venv"]) / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", f"import importlib.metadata as m; m.version('{spec['dist']}')"],
                                         capture_output=True).returncode == 0
    if not ok:
        print(f"creating {spec['venv']} (torch==2.13.0 first, then {spec['pip']})", flush=True)
        subprocess.run(["python3", "-m", "venv", spec["venv"]], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)
        subprocess.run(pip + spec["pip"], check=True)
    return py


def run_worker(py: Path, code: str, job: dict, work: Path, name: str) -> dict:
    script, job_file = work / f"{name}_worker.py", work / f"{name}_job.json"
    script.write_text(code)
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([str(py), str(script), str(job_file)], capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"})
    (work / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} worker failed (rc {proc.returncode}); see {work / (name + '.log')}:\n"
                           + proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def harvest_acts(lm, part: str, layers: list[int], tokens: int, cache: Path | None = None) -> dict[str, torch.Tensor]:
    """`tokens` ordinary tokens of resid_post at `layers` from `part` (cached in `cache` when given)."""
    if cache is not None and cache.is_file():
        return load_file(cache)
    sites = lm.sites(kinds=["resid_post"], layers=layers)
    parts: dict[str, list] = {s.key: [] for s in sites}
    stream = Corpus().contexts(lm.tokenizer, part=part, ctx_len=CTX)
    for b in harvest(lm, stream, sites, batch_size=8, max_tokens=tokens, progress=False):
        for k, v in b.acts.items():
            parts[k].append(v)
    out = {k: torch.cat(v)[:tokens].contiguous() for k, v in parts.items()}
    if cache is not None:
        save_file(out, cache)
    return out


def heldout_contexts(lm, n: int) -> list[list[int]]:
    return [c for _, c in zip(range(n), Corpus().contexts(lm.tokenizer, part="heldout", ctx_len=CTX))]


def train_ours(x: torch.Tensor, arch: str, width: int, l0: float, layer: int, batch: int = 1024):
    cfg = SAEConfig(d_in=x.shape[1], width=width, architecture=arch, l0=l0, site="resid_post", layer=layer)
    tcfg = TrainConfig(tokens=x.shape[0], batch_size=batch)
    mt = MultiTrainer([cfg], tcfg)
    per = 8 * batch
    chunks = (Chunk({f"resid_post/{layer}": x[i : i + per]}, 1) for i in range(0, x.shape[0], per))
    t0 = time.perf_counter()
    mt.fit(chunks, progress=False)
    wall = time.perf_counter() - t0
    return mt.trainers[0].export(), {"wall": wall, "tokens": mt.tokens_done, "steps": mt.steps_done,
                                     "tok_s": mt.tokens_done / wall, "train_l0": mt.trainers[0].ema["l0"]}


def header(title: str, cmd: str, versions: dict) -> list[str]:
    return ["", f"## Peers: {title} (bench_peers.py)", "",
            f"{time.strftime('%Y-%m-%d %H:%M')}, `{cmd}` — {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch threads, fp32 CPU, load average {os.getloadavg()[0]:.2f} when the part "
            f"ended (this machine drifts ±30%: ratios from back-to-back runs matter, absolute numbers less). Versions: "
            + ", ".join(f"{k} {v}" for k, v in versions.items()) + ". Model Gemma 3 270M (GGUF Q4_K_M dequantised "
            "to fp32), corpus `Corpus()` default, contexts of 256 tokens, BOS/EOS/pad positions excluded everywhere.", ""]


# ---------------------------------------------------------------------------------------------- SAELens


def part_saelens(args, lm, work: Path) -> list[str]:
    py = ensure_venv("saelens")
    layer, width, l0 = 6, args.width, args.l0
    t0 = time.perf_counter()
    train = harvest_acts(lm, "train", [layer], args.sl_tokens, work / f"l{layer}_train_{args.sl_tokens}.safetensors")
    x = train[f"resid_post/{layer}"]
    ho = harvest_acts(lm, "heldout", [layer], args.heldout, work / f"l{layer}_heldout_{args.heldout}.safetensors")
    xh = ho[f"resid_post/{layer}"]
    print(f"harvested {x.shape[0]:,} train + {xh.shape[0]:,} held-out tokens in {time.perf_counter() - t0:.0f} s", flush=True)
    acts_file = work / "sl_x.safetensors"
    save_file({"x": x}, acts_file)

    saes, timing = {}, {}
    runs = [("ours jump_relu", "jump_relu"), ("SAELens default", {}), ("ours topk", "topk"),
            ("SAELens quadratic", {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": l0}),
            ("ours jump_relu (repeat)", "jump_relu")]
    sl_info = {}
    for name, what in runs:
        if isinstance(what, str):
            sae, info = train_ours(x, what, width, l0, layer)
            if "repeat" not in name:
                saes[name] = sae
        else:
            out = work / ("sl_" + name.split()[-1])
            shutil.rmtree(out, ignore_errors=True)
            info = run_worker(py, SAELENS_WORKER, {"acts": str(acts_file), "width": width, "tokens": x.shape[0],
                                                   "sae_kwargs": what, "out": str(out)}, work, "sl_" + name.split()[-1])
            info["tok_s"] = info["tokens"] / info["wall"]
            sl_info[name] = info
            saes[name] = read_sae_folder(out)
            saes[name].cfg.site, saes[name].cfg.layer = "resid_post", layer
        timing[name] = info
        print(f"{name}: {info['tokens']:,} tokens in {info['wall']:.1f} s = {info['tok_s']:,.0f} tok/s", flush=True)

    fid = {k: fidelity(s, xh) for k, s in saes.items()}
    ctxs = heldout_contexts(lm, args.delta_contexts)
    t0 = time.perf_counter()
    dlm = delta_lm_loss(lm, saes, ctxs, progress=False)
    print(f"ΔLM on {len(ctxs)} contexts in {time.perf_counter() - t0:.0f} s", flush=True)

    sl0 = next(iter(sl_info.values()))
    versions = {"sae-lens": sl0["sae_lens"], "torch (both venvs)": sl0["torch"]}
    lines = header(f"SAELens JumpReLU vs saescope, one layer (resid_post layer {layer}, width {width})",
                   f".venv/bin/python bench/bench_peers.py --part saelens --sl-tokens {args.sl_tokens} --heldout "
                   f"{args.heldout} --delta-contexts {args.delta_contexts}", versions)
    d = sl_info["SAELens default"]
    lines += [f"Same {x.shape[0]:,} harvested train tokens (layer {layer}, in RAM) for every trainer; SAELens through "
              f"its `SAETrainer` + `DataProvider` (iterator of shuffled in-memory batches), `LanguageModelSAERunnerConfig` "
              f"defaults: batch {d['batch']}, lr {d['lr']:g} ({d['lr_scheduler']}), Adam β {tuple(d['adam'])}, "
              f"normalize_activations {d['normalize']}; `JumpReLUTrainingSAEConfig` defaults: mode {d['mode']}, "
              f"l0_coefficient {d['l0_coefficient']:g}, bandwidth {d['bandwidth']:g}, init threshold "
              f"{d['init_threshold']:g}. \"quadratic\" = the same plus `jumprelu_sparsity_loss_mode='quadratic', "
              f"target_l0={l0:g}`. Ours: TrainConfig defaults, batch 1024, L0*/k {l0:g}. Run order = table order "
              f"(back to back). Held-out: {xh.shape[0]:,} tokens of the held-out split; ΔLM on {len(ctxs)} held-out "
              f"contexts × {CTX} ({next(iter(dlm.values()))['n_ce_tokens']:,} target tokens), clean CE "
              f"{next(iter(dlm.values()))['ce_clean']:.3f}.", "",
              "| trainer | train tokens | steps | train wall s | tokens/s | held-out L0 | held-out FVU | dead | dense | ΔLM loss | CE recovered |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _ in runs:
        t = timing[name]
        if name in saes:
            f, m = fid[name], dlm[name]
            lines.append(f"| {name} | {t['tokens']:,} | {t['steps']} | {t['wall']:.1f} | {t['tok_s']:,.0f} | {f['l0']:.1f} | "
                         f"{f['fvu']:.4f} | {f['dead_fraction']:.3f} | {f['dense_fraction']:.3f} | {m['delta_lm_loss']:.4f} | "
                         f"{m['ce_recovered']:.3f} |")
        else:
            lines.append(f"| {name} | {t['tokens']:,} | {t['steps']} | {t['wall']:.1f} | {t['tok_s']:,.0f} | | | | | | |")
    a, b = timing["ours jump_relu"], timing["ours jump_relu (repeat)"]
    ours_jr = (a["tokens"] + b["tokens"]) / (a["wall"] + b["wall"])  # time-weighted: total tokens / total time
    ratio = ours_jr / d["tok_s"]
    ratio_q = ours_jr / sl_info["SAELens quadratic"]["tok_s"]
    l0_ours = fid["ours jump_relu"]["l0"]
    on_target = abs(l0_ours - l0) <= 0.2 * l0
    lines += ["", f"Speed: ours JumpReLU {ours_jr:,.0f} tokens/s (total tokens / total time of the two runs around SAELens) vs SAELens default "
              f"{d['tok_s']:,.0f} → **{ratio:.1f}×** (vs SAELens quadratic: {ratio_q:.1f}×); ours TopK "
              f"{timing['ours topk']['tok_s']:,.0f} tokens/s. Held-out L0 ours JumpReLU {l0_ours:.1f} (target {l0:g}; "
              f"{'within' if on_target else 'NOT within'} ±20%).",
              f"Target ≥ 3× SAELens' tokens/s with L0 on target: **{'met' if ratio >= 3 and on_target else 'NOT met'}**."]
    return lines


# ---------------------------------------------------------------------------------------------- sparsify


def part_sparsify(args, lm, work: Path) -> list[str]:
    py = ensure_venv("sparsify")
    from saescope.pipeline import train_run

    k, width = args.k, args.width
    layers = list(range(lm.n_layers))
    t0 = time.perf_counter()
    ho = harvest_acts(lm, "heldout", layers, args.heldout, work / f"all_heldout_{args.heldout}.safetensors")
    print(f"held-out harvest {time.perf_counter() - t0:.0f} s", flush=True)

    # the train contexts our run consumes: harvest batches of 8 contexts until --sp-tokens ordinary tokens
    special = torch.tensor(sorted(lm.special_ids))
    ctxs, n_ord = [], 0
    for c in Corpus().contexts(lm.tokenizer, part="train", ctx_len=CTX):
        ctxs.append(c)
        n_ord += int((~torch.isin(torch.tensor(c), special)).sum())
        if n_ord >= args.sp_tokens and len(ctxs) % 8 == 0:
            break
    ctx_file = work / "sp_contexts.json"
    ctx_file.write_text(json.dumps(ctxs))

    results = {}
    ours_dir = work / "ours-run"
    shutil.rmtree(ours_dir, ignore_errors=True)
    t0 = time.perf_counter()
    run = train_run(ours_dir, lm=lm, sites="resid_post", layers="all", widths=(width,), l0s=(k,), architecture="topk",
                    train=TrainConfig(tokens=args.sp_tokens), progress=False)
    wall = time.perf_counter() - t0
    results["ours"] = {"wall": wall, "tokens": run.manifest.get("tokens_trained", args.sp_tokens)}
    print(f"ours end to end: {results['ours']['tokens']:,} tokens in {wall:.0f} s", flush=True)

    sp_batches = [int(b) for b in str(args.sp_batch).split(",")]
    sp_runs = {}
    for bs in sp_batches:
        sp_out = work / f"sparsify-out-b{bs}"
        shutil.rmtree(sp_out, ignore_errors=True)
        info = run_worker(py, SPARSIFY_WORKER, {"model": _resolve("gemma-3-270m"), "contexts": str(ctx_file), "k": k,
                                                "width": width, "batch_size": bs, "exclude": sorted(lm.special_ids),
                                                "out": str(sp_out)}, work, "sparsify")
        name = f"sparsify, {bs} context{'s' if bs > 1 else ''}/step"
        results[name], sp_runs[name] = info, (sp_out, info)
        print(f"{name} end to end: {info['tokens']:,} tokens in {info['wall']:.0f} s", flush=True)
    for r in results.values():
        r["tok_s"] = r["tokens"] / r["wall"]

    rows = []
    for layer in layers:
        xh = ho[f"resid_post/{layer}"]
        ours = run.load_sae(f"resid_post/layer_{layer}_width_{width}_l0_{k}")
        theirs = {n: fidelity(read_sae_folder(out / "run" / inf["hookpoints"][layer]), xh)
                  for n, (out, inf) in sp_runs.items()}
        rows.append((layer, fidelity(ours, xh), theirs))

    info = next(iter(sp_runs.values()))[1]
    versions = {"eai-sparsify": info["sparsify"], "torch (both venvs)": info["torch"]}
    lines = header(f"sparsify TopK vs saescope, all 18 layers end to end (k {k}, width {width})",
                   f".venv/bin/python bench/bench_peers.py --part sparsify --sp-tokens {args.sp_tokens} --heldout "
                   f"{args.heldout} --sp-batch {args.sp_batch}", versions)
    tc = TrainConfig(tokens=args.sp_tokens)
    ours_batch, ours_opt = tc.batch_size, tc.optimizer_for("topk")
    ours_lr = tc.lr_for(width, ours_opt)
    lines += [f"Both train 18 TopK SAEs (resid_post = decoder-layer outputs, hookpoints {info['hookpoints'][0]}…"
              f"{info['hookpoints'][-1]}) in one pass over the same {len(ctxs)} train contexts, model forward included; "
              f"model already loaded for both; wall = SAE init + forward + training + saving. Ours: `train_run(..., "
              f"architecture='topk', l0s=({k},), train=TrainConfig(tokens={args.sp_tokens}))` (defaults: "
              f"{ours_batch} tokens/step, optimizer {ours_opt} at lr {ours_lr:g}; harvest stops after the last hooked layer, no LM head). sparsify: Python "
              f"`Trainer`, `SaeConfig(k={k}, num_latents={width})`, optimizer {info['optimizer']} (its default), "
              f"batch_size {args.sp_batch} contexts of {CTX} tokens per step, one run each (its default of 32 would give "
              f"~6 steps), exclude_tokens = BOS/EOS/pad, no wandb; its forward runs the full model incl. the "
              f"262k-vocab LM head (`model(x)`). Run order: ours, then sparsify (back to back). Tokens = ordinary "
              f"trained-on tokens. Held-out FVU on {next(iter(ho.values())).shape[0]:,} held-out tokens per layer.", "",
              "| | tokens | wall s | tokens/s |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens']:,} | {r['wall']:.0f} | {r['tok_s']:,.1f} |")
    names = list(sp_runs)
    lines += ["", "| layer | ours FVU | " + " | ".join(f"{n} FVU" for n in names) + " | ours / best of sparsify | "
              "ours L0 | sparsify L0 | ours dead | " + " | ".join(f"{n} dead" for n in names) + " |",
              "|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|---:|" + "---:|" * len(names)]
    wins = 0
    for layer, fo, th in rows:
        best = min(t["fvu"] for t in th.values())
        wins += fo["fvu"] < best
        lines.append(f"| {layer} | {fo['fvu']:.4f} | " + " | ".join(f"{th[n]['fvu']:.4f}" for n in names)
                     + f" | {fo['fvu'] / best:.2f} | {fo['l0']:.1f} | {th[names[0]]['l0']:.1f} | "
                     f"{fo['dead_fraction']:.3f} | " + " | ".join(f"{th[n]['dead_fraction']:.3f}" for n in names) + " |")
    fastest = max(results[n]["tok_s"] for n in names)
    ratio = results["ours"]["tok_s"] / fastest
    lines += ["", f"Speed: ours {results['ours']['tok_s']:,.1f} tokens/s end to end vs the fastest sparsify run "
              f"{fastest:,.1f} → **{ratio:.2f}×**. Held-out FVU lower than the best sparsify run's on {wins}/{len(rows)} "
              "layers.",
              f"Targets: ≥ 1.5× end-to-end tokens/s: **{'met' if ratio >= 1.5 else 'NOT met'}**; lower held-out FVU on every "
              f"layer: **{'met' if wins == len(rows) else 'NOT met'}**."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["saelens", "sparsify", "all"], default="all")
    ap.add_argument("--sl-tokens", type=int, default=102_400, help="SAELens part: train tokens (layer 6)")
    ap.add_argument("--sp-tokens", type=int, default=50_000, help="sparsify part: train tokens per SAE")
    ap.add_argument("--heldout", type=int, default=8192, help="held-out tokens for L0/FVU")
    ap.add_argument("--delta-contexts", type=int, default=8, help="held-out contexts for ΔLM loss (SAELens part)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--l0", type=float, default=32.0, help="SAELens part: target L0 / TopK k")
    ap.add_argument("--k", type=int, default=50, help="sparsify part: TopK k")
    ap.add_argument("--sp-batch", default="1,4", help="sparsify part: its batch sizes in contexts (one run each)")
    ap.add_argument("--work", default="/tmp/peer-bench")
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model()
    parts = ["saelens", "sparsify"] if args.part == "all" else [args.part]
    for p in parts:
        t0 = time.perf_counter()
        lines = (part_saelens if p == "saelens" else part_sparsify)(args, lm, work)
        lines.append(f"Part took {time.perf_counter() - t0:.0f} s.")
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        if not args.no_append:
            with open(RESULTS, "a") as f:
                f.write(text)


if __name__ == "__main__":
    main()
