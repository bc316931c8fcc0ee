"""Cross-check saescope's SAELens reader and writer against SAELens itself.

    .venv/bin/python bench/saelens_crosscheck.py [--run runs/NAME] [--venv /tmp/saelens-venv] [--no-append]

1. Creates a separate virtual environment with sae-lens (torch==2.13.0 installed first, so pip keeps
   the CPU build instead of pulling a CUDA one). SAELens is never imported into saescope's environment.
2. saescope → SAELens: random SAEs (d_in 640, width 4096: jump_relu, relu, topk, batchtopk), plus every
   SAE of `--run` when given, are exported with `export_run`/`write_saelens`; SAELens loads them with
   `SAE.load_from_disk` in a subprocess and runs them on the same inputs.
3. SAELens → saescope: SAELens builds random SAEs of each architecture it has (standard, jumprelu,
   topk, gated, and a BatchTopK training SAE saved in inference form), with apply_b_dec_to_input on,
   saves them with `save_model` / `save_inference_model`; saescope reads them with `read_sae_folder`.

Both sides run fp32 on CPU; pass = max |x̂_saescope − x̂_SAELens| ≤ 1e-5. The table is printed and
written to bench/RESULTS.md under "## SAELens cross-check".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saescope.formats import read_sae_folder  # noqa: E402
from saescope.formats.saelens import write_saelens  # noqa: E402
from saescope.fsio import write_text  # noqa: E402
from saescope.sae import SAE, SAEConfig  # noqa: E402

D_IN, WIDTH, TOKENS, TOL = 640, 4096, 512, 1e-5
HEADING = "## SAELens cross-check"

WORKER = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    from safetensors.torch import load_file, save_file
    import sae_lens
    from sae_lens import SAE
    from sae_lens.saes.sae import SAEMetadata
    job = json.loads(Path(sys.argv[1]).read_text())
    xs = load_file(job["x"])
    x = xs["x_%d" % job.get("d_in", 0)] if job["mode"] == "save" else None  # load mode: per folder
    out = {}
    torch.set_grad_enabled(False)
    if job["mode"] == "load":
        for name, (folder, key) in job["folders"].items():
            sae = SAE.load_from_disk(folder)
            x = xs[key]
            out[name + "/x_hat"], out[name + "/f"] = sae(x), sae.encode(x)
    else:
        from sae_lens import (GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE,
                              StandardSAEConfig, TopKSAE, TopKSAEConfig)
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        d, w = job["d_in"], job["width"]
        meta = lambda: SAEMetadata(model_name="gemma-3-270m", hook_name="blocks.5.hook_resid_post")
        kinds = {"standard": (StandardSAE, StandardSAEConfig, {}), "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {}),
                 "topk": (TopKSAE, TopKSAEConfig, {"k": 64}), "gated": (GatedSAE, GatedSAEConfig, {}),
                 "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": 64})}
        for i, (name, folder) in enumerate(job["folders"].items()):
            cls, cfg_cls, kw = kinds[name]
            sae = cls(cfg_cls(d_in=d, d_sae=w, apply_b_dec_to_input=True, metadata=meta(), **kw))
            g = torch.Generator().manual_seed(100 + i)
            sd = (x @ sae.W_enc).std().item()  # pre-activation scale: make every SAE fire on ~2-4% of features
            for pname, p in sae.named_parameters():
                if pname == "threshold":
                    p.data = (torch.rand(p.shape, generator=g) + 1.5) * sd
                elif pname in ("b_enc", "b_gate") and name in ("standard", "gated"):
                    p.data = torch.randn(p.shape, generator=g) * 0.1 * sd - 2 * sd
                elif pname in ("b_enc", "b_mag", "b_dec", "r_mag"):
                    p.data = torch.randn(p.shape, generator=g) * 0.1
            if name == "batchtopk":
                if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):  # threshold in units of z·‖W_dec‖
                    sd = (x @ sae.W_enc * sae.W_dec.norm(dim=-1)).std().item()
                sae.topk_threshold = torch.tensor(2 * sd, dtype=torch.double)
                sae.save_inference_model(folder)
                sae = SAE.load_from_disk(folder)  # what a user of the saved file gets
            else:
                sae.save_model(folder)
            out[name + "/x_hat"], out[name + "/f"] = sae(x), sae.encode(x)
    save_file({k: v.detach().float().contiguous() for k, v in out.items()}, job["out"])
    print(sae_lens.__version__)
''')


def ensure_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # CPU build first, so sae-lens keeps it
        subprocess.run([*pip, "sae-lens"], check=True)
    torch_v = subprocess.run([str(py), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if "None" not in torch_v.split()[-1:]:
        print(f"warning: SAELens venv has a CUDA torch ({torch_v})")
    return py


def run_worker(py: Path, job: dict, tmp: Path) -> tuple[dict, str]:
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "worker.py").write_text(WORKER)
    r = subprocess.run([str(py), str(tmp / "worker.py"), str(tmp / "job.json")], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"SAELens worker failed:\n{r.stderr[-3000:]}")
    return load_file(job["out"]), r.stdout.strip().splitlines()[-1]


def random_sae(arch: str, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    sae = SAE.init(SAEConfig(d_in=D_IN, width=WIDTH, architecture=arch, l0=64, site="resid_post", layer=5,
                             hf_hook_point_in="model.layers.5.output", model_name="gemma-3-270m"), g)
    with torch.no_grad():  # unit-norm rows and N(0,1) inputs: z ~ N(0,1); fire on ~2-4% of features
        sae.b_enc.normal_(-2.0 if arch == "relu" else 0.0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
        sae.threshold.uniform_(1.5, 2.5, generator=g)
    return sae


def compare(name: str, direction: str, sae: SAE, theirs: dict, x: torch.Tensor) -> dict:
    with torch.no_grad():
        out = sae(x)
    x_hat, f = theirs[f"{name}/x_hat"], theirs[f"{name}/f"]
    same = ((out.f > 0) == (f > 0)).all(dim=1).float().mean().item()
    dx = (out.x_hat - x_hat).abs().max().item()
    return {"direction": direction, "sae": name, "arch": sae.cfg.architecture, "shape": f"{sae.cfg.d_in}×{sae.cfg.width}",
            "l0": (f > 0).float().sum(1).mean().item(), "dx": dx, "df": (out.f - f).abs().max().item(),
            "rel": dx / x_hat.abs().max().item(), "same": same, "ok": dx <= TOL}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", default="/tmp/saelens-venv")
    ap.add_argument("--run", help="also export and check every SAE of this run folder")
    ap.add_argument("--acts", help="safetensors file with real activations 'x' (tokens, d_in) for the run's SAEs")
    ap.add_argument("--note", default="", help="a sentence about the run, added to the results")
    ap.add_argument("--no-append", action="store_true", help="do not write bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    py = ensure_venv(Path(args.venv))
    tmp = Path(tempfile.mkdtemp(prefix="saelens-xcheck-"))
    rows = []
    # saescope → SAELens
    ours = {f"random-{a}": random_sae(a, i) for i, a in enumerate(["jump_relu", "relu", "topk", "batchtopk"])}
    if args.run:
        from saescope.runs import Run

        run = Run.open(args.run)
        for sae_id in run.sae_ids():
            ours[f"run:{sae_id}"] = run.load_sae(sae_id)
    xs = {f"x_{d}": torch.randn(TOKENS, d, generator=torch.Generator().manual_seed(7))
          for d in {D_IN, *(sae.cfg.d_in for sae in ours.values())}}
    x = xs[f"x_{D_IN}"]
    keys = {name: f"x_{sae.cfg.d_in}" for name, sae in ours.items()}
    if args.acts:  # real activations for the run's SAEs of that width
        acts = load_file(args.acts)["x"].float()[:TOKENS].contiguous()
        xs["acts"] = acts
        keys.update({n: "acts" for n, sae in ours.items() if n.startswith("run:") and sae.cfg.d_in == acts.shape[1]})
    save_file(xs, str(tmp / "x.safetensors"))
    folders = {name: [str(write_saelens(sae, tmp / "ours" / name.replace("/", "_").replace(":", "_"))), keys[name]]
               for name, sae in ours.items()}
    theirs, version = run_worker(py, {"mode": "load", "x": str(tmp / "x.safetensors"), "folders": folders,
                                      "out": str(tmp / "load.safetensors")}, tmp)
    rows += [compare(name, "saescope → SAELens", sae, theirs, xs[keys[name]]) for name, sae in ours.items()]

    # SAELens → saescope
    names = ["standard", "jumprelu", "topk", "gated", "batchtopk"]
    folders = {n: str(tmp / "theirs" / n) for n in names}
    theirs, version = run_worker(py, {"mode": "save", "x": str(tmp / "x.safetensors"), "folders": folders,
                                      "out": str(tmp / "save.safetensors"), "d_in": D_IN, "width": WIDTH}, tmp)
    rows += [compare(n, "SAELens → saescope", read_sae_folder(Path(folders[n])), theirs, x) for n in names]

    table = ["| direction | SAE → saescope architecture | d_in×width | mean L0 | max abs Δx̂ | max abs Δf | Δx̂ / max x̂ "
             "| tokens with same active set | ≤ 1e-5 |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        table.append(f"| {r['direction']} | {r['sae']} → {r['arch']} | {r['shape']} | {r['l0']:.0f} | {r['dx']:.2e} "
                     f"| {r['df']:.2e} | {r['rel']:.1e} | {100 * r['same']:.1f}% | {'yes' if r['ok'] else 'NO'} |")
    section = "\n".join([
        HEADING, "",
        f"sae-lens {version} (own venv, torch {torch.__version__} CPU), saescope fp32 CPU, {TOKENS} random "
        f"N(0,1) tokens, {time.strftime('%Y-%m-%d')}. `bench/saelens_crosscheck.py`"
        + (f" with --run {args.run}" if args.run else " (no trained run given)")
        + (" on real activations from --acts for the run's SAEs" if args.acts else "") + ". "
        "saescope → SAELens: `write_saelens` files loaded by `SAE.load_from_disk`; SAELens → saescope: "
        "`save_model` / `save_inference_model` files (apply_b_dec_to_input on) read by `read_sae_folder`."
        + (f" {args.note}" if args.note else ""), "",
        *table, "", f"{sum(r['ok'] for r in rows)}/{len(rows)} within 1e-5; took {time.time() - t0:.0f} s.", ""])
    print(section)
    if not args.no_append:
        path = ROOT / "bench" / "RESULTS.md"
        text = path.read_text() if path.exists() else "# Benchmark results\n\n"
        if HEADING in text:  # replace our previous section, keep everything else
            head, _, rest = text.partition(HEADING)
            nxt = rest.find("\n## ")
            text = head + section + (rest[nxt + 1:] if nxt >= 0 else "")
        else:
            text = text.rstrip("\n") + "\n\n" + section
        write_text(path, text)
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
