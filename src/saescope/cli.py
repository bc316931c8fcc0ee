"""`saescope <verb>`: the command line. Each verb is a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import math
import sys
import traceback
from pathlib import Path

import click

from .errors import SaescopeError
from .evaluate import CE_TOKENS, OTHER
from .models import DEFAULT_MODEL, SITE_KINDS
from .train import OPTIMIZERS

DEFAULT_RUN = "runs/gemma-3-270m"


def _csv_numbers(value: str, cast=float) -> list:
    try:
        numbers = [cast(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{value}'") from None
    if not numbers or not all(math.isfinite(v) for v in numbers):
        raise click.BadParameter(f"expected comma-separated finite numbers, got '{value}'")
    return numbers


class Finite(click.FloatRange):
    """A number within the range that is also finite (click's FloatRange lets NaN through)."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


POSITIVE = click.IntRange(min=1)
NON_NEGATIVE = click.IntRange(min=0)
NEGATIVE_ARGS = {"ignore_unknown_options": True}
"""For commands with whole-number arguments: '-1' is read as a (refused) index, not as an unknown option."""


ctx_len_opt = click.option("--ctx-len", default=256, type=click.IntRange(min=2),
                           help="Tokens per packed context (including BOS); at most the model's context.")
model_opt = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                         help="'gemma-3-270m', a local model folder, a .gguf file, or a Hugging Face id.")
corpus_opt = click.option("--corpus", default="default", show_default=True,
                          help="'default' (Wikipedia leads + extras), a file, a folder, .jsonl, .parquet, or hf:NAME.")
sites_opt = click.option("--sites", default="resid_post", show_default=True,
                         help=f"Comma-separated sites: {', '.join(SITE_KINDS)}.")
layers_opt = click.option("--layers", default="all", show_default=True, help="all, 6, 0,6,12 or 0-5.")


def _use_device(ctx, param, value):
    from . import devices

    return devices.use(value)


device_opt = click.option("--device", default="auto", expose_value=False, callback=_use_device,
                          help="auto (a CUDA GPU when there is one), cpu, cuda or cuda:N. On a GPU the model runs in "
                               "bf16; SAEs train in fp32.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="saescope")
@click.pass_context
def cli(ctx, debug):
    """saescope: sparse autoencoders on every layer of a language model.

    Train SAEs, evaluate them, see what each feature fires on, label and search
    features, and steer the model with them — offline on a laptop CPU.
    """
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.WARNING, format="%(message)s")


@cli.command()
@device_opt
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def sites(model, as_json):
    """List every hook site of MODEL with its width."""
    from .models import load_model

    lm = load_model(model)
    rows = [{"site": s.kind, "layer": s.layer, "hook": s.hook_name, "width": s.width} for s in lm.sites()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{model}: {lm.n_layers} layers, d_model {lm.d_model}")
    for r in rows:
        click.echo(f"  {r['site']:<11} layer {r['layer']:>3}  width {r['width']:>6}  {r['hook']}")


@cli.command()
@device_opt
@model_opt
@corpus_opt
@sites_opt
@layers_opt
@click.option("--tokens", default=50_000, type=POSITIVE, help="Tokens to cache (BOS/EOS/pad positions excluded).")
@click.option("--out", default="runs/cache", type=click.Path(), help="Cache folder (an interrupted one resumes).")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32",
              help="Storage type; float16 halves the disk but Gemma's residual stream can exceed its range.")
@ctx_len_opt
@click.option("--batch-size", default=8, type=POSITIVE, help="Contexts per forward pass.")
@click.option("--part", type=click.Choice(["train", "heldout"]), default="train", help="Corpus split to read.")
def harvest(model, corpus, sites, layers, tokens, out, dtype, ctx_len, batch_size, part):
    """Cache activations at every requested site of every requested layer, in one forward pass each."""
    from .pipeline import harvest_to_cache

    info = harvest_to_cache(out, model=model, corpus=corpus, sites=sites, layers=layers, tokens=tokens,
                            ctx_len=ctx_len, batch_size=batch_size, dtype=dtype, part=part)
    click.echo(f"cached {info['tokens']:,} tokens × {len(info['sites'])} sites ({info['dtype']}) in {info['folder']}")


@cli.command()
@device_opt
@model_opt
@corpus_opt
@sites_opt
@layers_opt
@click.option("--widths", default="4096", help="Comma-separated SAE widths.")
@click.option("--l0", "l0s", default="32", help="Comma-separated target L0s (k for topk).")
@click.option("--arch", type=click.Choice(["jump_relu", "topk", "batchtopk", "relu"]), default="jump_relu")
@click.option("--tokens", default=100_000, type=POSITIVE, help="Training tokens (every SAE sees the same tokens).")
@ctx_len_opt
@click.option("--batch-size", default=0, type=NON_NEGATIVE,
              help="Tokens per optimisation step; 0 = auto (256 below 1B tokens, 4,096 from 1B on).")
@click.option("--harvest-batch", default=8, type=POSITIVE,
              help="Contexts per forward pass of the model (their rows are shuffled into optimisation steps). On a "
                   "GPU a larger pass is faster: 128 contexts of 1,024 tokens trained 18 SAEs 13% faster than 32 on "
                   "an H200, at 30 GiB (bench/RESULTS.md).")
@click.option("--lr", default=0.0, type=Finite(min=0), help="Learning rate (0 = automatic for the width and budget).")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="auto",
              help="auto = schedule-free Adam for TopK short runs, Adam otherwise (see README: the training recipe).")
@click.option("--seed", default=0, type=NON_NEGATIVE)
@click.option("--checkpoint-every", default=200, type=POSITIVE, help="Steps between checkpoints.")
@click.option("--e2e", "e2e_fraction", default=0.0, type=Finite(min=0, max=1),
              help="Share of the tokens spent at the end training each SAE spliced into the model, on the KL to the "
                   "clean next-token distribution plus reconstruction (0 = off; not with --cache or torchrun).")
@click.option("--matryoshka", default="", help="Matryoshka prefixes as fractions of the width, e.g. 0.0625,0.25: "
              "each nested prefix of the dictionary is also trained to reconstruct on its own (empty = off).")
@click.option("--sae-matmuls", type=click.Choice(["bf16", "tf32"]), default="bf16",
              help="On a GPU, the SAE step's matrix products: bf16 (fp32 weights, optimiser and thresholds) or TF32. "
                   "Ignored on the CPU (fp32).")
@click.option("--cache", type=click.Path(exists=True), default=None, help="Train from a harvest cache instead of the live model.")
@click.option("--out", default=DEFAULT_RUN, type=click.Path(), help="Run folder.")
@click.option("--resume/--no-resume", default=True, help="Continue from the last checkpoint when there is one.")
@click.option("--parallel", type=click.Choice(["auto", "data", "layers"]), default="auto",
              help="Under torchrun: data (auto) = every process trains every SAE on its shard of the corpus, "
                   "gradients all-reduced; layers = each process trains its layers' SAEs on activations exchanged "
                   "between processes. Ignored in a single process.")
def train(model, corpus, sites, layers, widths, l0s, arch, tokens, ctx_len, batch_size, harvest_batch, lr, optimizer,
          seed, checkpoint_every, e2e_fraction, matryoshka, sae_matmuls, cache, out, resume, parallel):
    """Train an SAE for every layer × site × width × L0, all from one pass over the corpus."""
    from .pipeline import train_run
    from .train import TrainConfig

    tc = TrainConfig(tokens=tokens, batch_size=batch_size, lr=lr, optimizer=optimizer, seed=seed,
                     checkpoint_every=checkpoint_every, e2e_fraction=e2e_fraction, bf16_matmuls=sae_matmuls == "bf16",
                     matryoshka=tuple(_csv_numbers(matryoshka)) if matryoshka.strip() else ())
    run = train_run(out, model=model, corpus=corpus, sites=sites, layers=layers, widths=_csv_numbers(widths, int),
                    l0s=_csv_numbers(l0s), architecture=arch, train=tc, ctx_len=ctx_len, harvest_batch=harvest_batch,
                    cache=cache, resume=resume, parallel=parallel)
    from .distributed import first_process

    if first_process():  # torchrun: one line for the whole run
        click.echo(f"trained {len(run.sae_ids())} SAEs in {run.root}/saes")


@cli.command("eval")
@device_opt
@click.argument("run_dir", default=DEFAULT_RUN, type=click.Path())
@click.option("--tokens", default=8192, type=POSITIVE, help="Held-out tokens for L0/FVU/dead/dense.")
@click.option("--ce-tokens", default=CE_TOKENS, type=NON_NEGATIVE,
              help="Scored target tokens per SAE (and per distribution) for ΔLM loss, KL and CE recovered; "
                   "0 skips them; rounded up to whole contexts of 64 scored targets; the other text gets a third. "
                   "16384 separates recipes that differ by a few hundredths of a nat.")
@click.option("--ce-contexts", hidden=True, type=int, default=None, expose_value=True)
@click.option("--other", default=OTHER, show_default=True,
              help="A second held-out distribution the SAEs never trained on (a corpus source; 'none' skips it).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(run_dir, tokens, ce_tokens, ce_contexts, other, as_json):
    """Evaluate every SAE of a run on held-out tokens (and on text it never trained on); writes eval.json and eval.png."""
    from .evaluate import check_eval_args, evaluate, other_corpus

    if ce_contexts is not None:
        raise SaescopeError("--ce-contexts was replaced by --ce-tokens N (scored target tokens per SAE; 0 skips ΔLM)")
    check_eval_args(tokens, ce_tokens)
    other = None if other.lower() == "none" else other
    run = _open_for_stage(run_dir)
    if other:
        other_corpus(run, other)  # refused before the stage is marked
    with run.stage("eval"):
        result = evaluate(run, eval_tokens=tokens, ce_tokens=ce_tokens, other=other)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    _print_eval(result)
    click.echo(f"held-out tokens: {result['eval_tokens']:,}; plot: {Path(run_dir) / 'eval.png'}")


def _print_eval(result: dict) -> None:
    """One line per SAE: held-out metrics, ΔLM ± its standard error, and FVU / ΔLM on the other text."""
    nan = float("nan")
    click.echo(f"{'SAE':<40} {'L0':>6} {'FVU':>6} {'dead':>5} {'ΔLM ± SE':>13} {'KL':>6} {'CErec':>6} "
               f"{'FVU*':>6} {'ΔLM*':>6}")
    for sae_id, m in result["saes"].items():
        o = m.get("other", {})
        click.echo(f"{sae_id:<40} {m['l0']:>6.1f} {m['fvu']:>6.3f} {m['dead_fraction']:>5.2f} "
                   f"{m.get('delta_lm_loss', nan):>6.3f} ± {m.get('delta_lm_loss_se', nan):<5.3f} "
                   f"{m.get('kl', nan):>6.3f} {m.get('ce_recovered', nan):>6.3f} {o.get('fvu', nan):>6.3f} "
                   f"{o.get('delta_lm_loss', nan):>6.3f}")
    other = result.get("distributions", {}).get("other")
    if other:
        click.echo(f"* on {other['corpus']['source']} (never trained on), {other['tokens']:,} tokens")


@cli.group()
def label():
    """Label features: by hand (set) or automatically (auto: offline, or with any OpenAI-compatible LLM)."""


@label.command("set", context_settings=NEGATIVE_ARGS)
@device_opt
@click.argument("run_dir", type=click.Path())
@click.argument("sae")
@click.argument("index", type=int)
@click.argument("text")
@click.option("--author", default=None, help="Who wrote the label (kept in the history).")
def label_set(run_dir, sae, index, text, author):
    """Give feature INDEX of SAE (id, site/LAYER or LAYER) the label TEXT; earlier labels stay in the history."""
    from .label.manual import set_label

    label_id = set_label(run_dir, sae, index, text, author=author)
    click.echo(f"label {label_id} set on {sae}:{index}")


@label.command("auto")
@device_opt
@click.argument("run_dir", default=DEFAULT_RUN, type=click.Path())
@click.option("--llm", "base_url", default=None, help="Base URL of an OpenAI-compatible server (omit for the offline labeller).")
@click.option("--model", "llm_model", default=None, help="Model name on that server.")
@click.option("--api-key-env", default="OPENAI_API_KEY", help="Environment variable holding the API key (never stored).")
@click.option("--sae", "saes", multiple=True, help="Only these SAEs (repeatable).")
@click.option("--limit", type=POSITIVE, default=None, help="At most this many features per SAE (most frequent first).")
@click.option("--concurrency", default=4, type=click.IntRange(1, 256), help="Parallel LLM requests.")
@click.option("--timeout", default=30.0, type=Finite(min=0, min_open=True), help="Seconds per LLM request.")
def label_auto(run_dir, base_url, llm_model, api_key_env, saes, limit, concurrency, timeout):
    """Label and score every alive feature: offline by default, or with an LLM (--llm URL --model NAME)."""
    if base_url and not llm_model:
        raise SaescopeError("--llm needs --model NAME (the model's name on that server)")
    run = _open_for_stage(run_dir, saes)
    if not run.db_path.is_file():
        raise SaescopeError(f"run {run_dir} has not been analysed yet: run `saescope analyze {run_dir}` first")
    if base_url:
        from .label.llm import label_llm

        report = label_llm(run, base_url, llm_model, api_key_env=api_key_env, sae_ids=list(saes) or None,
                           concurrency=concurrency, timeout=timeout, limit=limit)
    else:
        from .label.offline import label_offline

        with run.stage("label"):
            report = label_offline(run, sae_ids=list(saes) or None, limit=limit)
    from .pipeline import index_labels_quietly

    index_labels_quietly(run)
    click.echo(str(report))


@cli.command()
@device_opt
@click.argument("run_dir", type=click.Path())
@click.argument("query")
@click.option("--limit", default=10, type=click.IntRange(1, 10_000))
@click.option("--mode", type=click.Choice(["concept", "hybrid", "fts", "semantic"]), default="concept",
              help="concept: labels, top contexts and promoted tokens; the others: labels only.")
@click.option("--json", "as_json", is_flag=True)
def search(run_dir, query, limit, mode, as_json):
    """Find features across all layers about QUERY: by their labels, the text they fire on and what they write."""
    from dataclasses import asdict

    from .search import search as do_search

    hits = do_search(run_dir, query, limit=limit, mode=mode)
    if as_json:
        click.echo(json.dumps([asdict(h) for h in hits], indent=1, default=str))
        return
    if not hits:
        click.echo("no matching features")
    for h in hits:
        click.echo(_search_line(h))


def _search_line(h) -> str:
    def num(v, fmt=".2f"):
        return "  -  " if v is None else format(v, fmt)

    steer = "  steers toward it" if h.steer else ""
    stale = "  (written for the SAE's old weights)" if h.stale else ""
    head = (f"layer {h.layer:>2} #{h.idx:<6} detection {num(h.score)} output {num(h.output)} "
            f"freq {num(h.frequency, '.2%')}{steer}  [{h.sae_id}]")
    return f"{head}\n    {h.label}{stale}\n    {h.snippet}"


@cli.command()
@device_opt
@click.argument("run_dir", type=click.Path())
@click.argument("prompt")
@click.option("--feature", "features", multiple=True,
              help="LAYER:INDEX=STRENGTH (add), LAYER:INDEX@clamp=VALUE, LAYER:INDEX@ablate; repeatable.")
@click.option("--concept", default=None,
              help="Steer the features whose output writes this concept, at a calibrated strength (cached in the run).")
@click.option("--strength", default=None, type=Finite(),
              help="Strength for --concept (× max activation), instead of calibrating it.")
@click.option("--max-new-tokens", default=40, type=POSITIVE)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding (same seed for both texts).")
@click.option("--seed", default=0, type=NON_NEGATIVE)
@click.option("--sweep", "sweep_values", default=None, help="Comma-separated strengths to scan for the first --feature.")
@click.option("--png", default=None, type=click.Path(), help="Where --sweep writes its effect-vs-cost plot.")
@click.option("--json", "as_json", is_flag=True)
def steer(run_dir, prompt, features, concept, strength, max_new_tokens, sample, seed, sweep_values, png, as_json):
    """Generate from PROMPT with features turned up, down or clamped, side by side with the unsteered text."""
    from . import steer as st

    if sweep_values:
        if not features:
            raise SaescopeError("--sweep needs a --feature to scan")
        out = Path(png or Path(run_dir) / "steer_sweep.png")
        results = st.sweep(run_dir, prompt, features[0], _csv_numbers(sweep_values), png=out,
                           max_new_tokens=max_new_tokens, greedy=not sample, seed=seed)
        for r in results:
            e = r.effect
            click.echo(f"value {e.value:>8g}  act +{e.act_change:.3f}  prob +{e.prob_change:.4f}  "
                       f"CE cost {r.ppl_cost:.3f}  | {r.steered!r}")
        click.echo(f"plot: {out}")
        return
    kw = {"concept": concept, "concept_strength": strength} if concept else {}
    r = st.steer(run_dir, prompt, list(features), max_new_tokens=max_new_tokens, greedy=not sample, seed=seed, **kw)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({"prompt": r.prompt, "unsteered": r.unsteered, "steered": r.steered,
                               "ce_unsteered": r.ce_unsteered, "ce_steered": r.ce_steered,
                               "effects": [e.__dict__ for e in r.effects],
                               "concept": asdict(r.concept) if r.concept else None}, indent=1, default=str))
        return
    if r.concept:
        click.echo(_concept_lines(r.concept))
    click.echo(click.style("prompt     ", bold=True) + r.prompt)
    click.echo(click.style("unsteered  ", bold=True) + r.unsteered)
    click.echo(click.style("steered    ", bold=True) + r.steered)
    for e in r.effects:
        click.echo(f"{e.sae_id}:{e.idx} {e.mode} {e.value:g}: feature activation {e.act_unsteered:.3f} → "
                   f"{e.act_steered_text:.3f} (during generation {e.act_during:.3f}); promoted-token probability "
                   f"{e.prob_unsteered:.4f} → {e.prob_steered:.4f}")
    click.echo(f"cost: CE of steered text under the unsteered model {r.ce_steered:.3f} vs {r.ce_unsteered:.3f} "
               f"(+{r.ppl_cost:.3f} nats/token)")
    if r.concept:
        c = r.concept
        click.echo(f"concept: {c.words_unsteered} → {c.words_steered} concept words, similarity to "
                   f"'{c.choice.concept}' {c.similarity_unsteered:.2f} → {c.similarity_steered:.2f}")


def _concept_lines(effect) -> str:
    choice = effect.choice
    lines = [f"chose: {choice.reason}" + (" (calibration cached)" if choice.cached else
                                          f" (calibrated in {choice.seconds:.0f} s)")]
    chosen = set(choice.features)
    for c in choice.candidates:
        if set(c.features) == chosen:
            continue
        where = ", ".join(f"{sid}:{idx}" for sid, idx in c.features)
        lines.append(f"  runner-up: {where}  output similarity {c.output_match:.2f}  {c.label}  ({c.why or '-'})")
    return "\n".join(lines)


@cli.command("import")
@device_opt
@click.argument("path", type=click.Path(exists=True))
@click.option("--run", "run_dir", required=True, type=click.Path(), help="Run to add the SAE to.")
@click.option("--name", default=None, help="Folder name of the SAE in the run (default layer_L_width_W_l0_T).")
@click.option("--overwrite", is_flag=True,
              help="Replace an SAE of the same name; its analysis, eval and automatic labels are redone and its "
                   "human labels are kept, flagged as written for the old weights.")
def import_cmd(path, run_dir, name, overwrite):
    """Add an SAE from Gemma Scope 1/2, SAELens or sparsify files to a run (checked against its model)."""
    from .interop import import_sae

    res = import_sae(path, run_dir, name=name, overwrite=overwrite)
    click.echo(f"imported {res[0]} into {run_dir}")
    for note in res[2] if len(res) > 2 else []:
        click.echo(f"note: {note}")


@cli.command("export")
@device_opt
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["saelens", "neuronpedia"]), required=True)
@click.argument("out", type=click.Path())
def export_cmd(run_dir, fmt, out):
    """Write a run's SAEs for SAELens, or its SAEs + feature dashboards for Neuronpedia."""
    from .interop import export_run

    report = export_run(run_dir, fmt, out)
    click.echo(f"exported {len(report.get('saes', report))} SAEs as {fmt} to {out}")
    for note in report.get("notes", []):
        click.echo(f"note: {note}")


@cli.command("run")
@device_opt
@model_opt
@corpus_opt
@sites_opt
@layers_opt
@click.option("--widths", default="2048", help="SAE widths (2048 keeps the default run within ~15 minutes on a 2-core CPU).")
@click.option("--l0", "l0s", default="32")
@click.option("--arch", type=click.Choice(["jump_relu", "topk", "batchtopk", "relu"]), default="jump_relu")
@click.option("--tokens", default=100_000, type=POSITIVE, help="Training tokens.")
@ctx_len_opt
@click.option("--analyze-tokens", default=8192, type=POSITIVE, help="Held-out tokens for the feature atlas.")
@click.option("--out", default=DEFAULT_RUN, type=click.Path())
@click.option("--llm", "base_url", default=None, help="Label with an OpenAI-compatible LLM at this URL (default: offline).")
@click.option("--llm-model", default=None)
@click.option("--serve/--no-serve", default=True, help="Serve the web app at the end.")
@click.option("--host", default="127.0.0.1")
@click.option("--port", default=8000, type=click.IntRange(1, 65535))
def run_cmd(model, corpus, sites, layers, widths, l0s, arch, tokens, ctx_len, analyze_tokens, out, base_url, llm_model,
            serve, host, port):
    """The whole pipeline: train SAEs on every layer → evaluate → analyze → label → serve. Done stages are skipped."""
    from .pipeline import run_all

    run_all(out, model=model, corpus=corpus, sites=sites, layers=layers, widths=_csv_numbers(widths, int),
            l0s=_csv_numbers(l0s), architecture=arch, tokens=tokens, ctx_len=ctx_len, analyze_tokens=analyze_tokens,
            llm_url=base_url, llm_model=llm_model, echo=click.echo)
    if serve:
        from .server.app import local_url
        from .server.app import serve as serve_app

        click.echo(f"saescope atlas of {out}: {local_url(host, port, None)}  (Ctrl+C stops it)")
        serve_app(out, host=host, port=port)



@cli.command()
@device_opt
@click.argument("run_dir", default=DEFAULT_RUN, type=click.Path())
@click.option("--host", default="127.0.0.1", help="Address to listen on; anything but localhost needs --token.")
@click.option("--port", default=8000, type=click.IntRange(1, 65535))
@click.option("--token", envvar="SAESCOPE_TOKEN", default=None,
              help="Access token every request must carry (env SAESCOPE_TOKEN); required off localhost.")
def serve(run_dir, host, port, token):
    """Browse a run in the web app: overview, prompt inspector, features, labels, search, steering."""
    try:
        from .server.app import is_local, local_url
        from .server.app import serve as serve_app
    except ImportError as err:
        raise SaescopeError(f"the web app needs FastAPI and uvicorn ({err.name} is missing): "
                            "pip install 'saescope[web]'") from err
    if not is_local(host) and not token:
        raise SaescopeError(f"serving on {host} exposes the run and the model to the network: give --token SECRET "
                            "(or set SAESCOPE_TOKEN), or use --host 127.0.0.1")
    from .runs import Run

    Run.open(run_dir)  # a missing run fails before the address is announced
    click.echo(f"saescope atlas of {run_dir}: {local_url(host, port, token)}  (Ctrl+C stops it)")
    serve_app(run_dir, host=host, port=port, token=token)


@cli.command()
@device_opt
@click.argument("run_dir", default=DEFAULT_RUN, type=click.Path())
@click.option("--tokens", default=16_384, type=POSITIVE,
              help="Held-out tokens to analyse (one model pass serves every SAE).")
@click.option("--top-k", default=20, type=POSITIVE, help="Top-activating contexts kept per feature.")
@click.option("--logits", "n_logits", default=10, type=NON_NEGATIVE,
              help="Promoted/suppressed tokens per feature (0 skips the unembedding pass, ~15 s per SAE on a laptop).")
@click.option("--sae", "saes", multiple=True, help="Only this SAE (full id, site/LAYER or LAYER); repeatable.")
@click.option("--force", is_flag=True, help="Re-analyse SAEs that are already done.")
def analyze(run_dir, tokens, top_k, n_logits, saes, force):
    """Find what makes every feature fire: top contexts, quantile examples, density, logit effects.

    Writes features.sqlite in the run; an interrupted analysis resumes (SAEs already done are skipped).
    """
    from .analyze import analyze as analyze_run

    run = _open_for_stage(run_dir, saes)
    with run.stage("analyze"):
        report = analyze_run(run, n_tokens=tokens, top_k=top_k, n_logits=n_logits, saes=list(saes) or None,
                             force=force)
    click.echo(str(report))


@cli.command()
@device_opt
@click.argument("run_dir", type=click.Path())
@click.argument("text")
@click.option("--top", default=3, type=click.IntRange(1, 100), help="Features shown per token and SAE.")
@click.option("--sae", "saes", multiple=True, help="Only this SAE (full id, site/LAYER or LAYER); repeatable.")
@click.option("--fast", is_flag=True,
              help="The model's matrix products in bf16 where the CPU has native bf16 (~3× faster products; "
                   "activations within ~0.5%, as the web inspector runs by default).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(run_dir, text, top, saes, fast, as_json):
    """Show, for every token of TEXT, the most active features of each SAE with their labels."""
    from .scope import Scope, inspect_table

    with Scope.open(run_dir) as scope:
        result = scope.inspect(text, top=top, saes=list(saes) or None, fast=fast)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(inspect_table(result, style=click.style))


@cli.command(context_settings=NEGATIVE_ARGS)
@device_opt
@click.argument("run_dir", type=click.Path())
@click.argument("sae")
@click.argument("index", type=int)
@click.option("--examples", "n_examples", default=8, type=NON_NEGATIVE, help="Contexts shown per kind.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def feature(run_dir, sae, index, n_examples, as_json):
    """Show a feature card: where feature INDEX of SAE fires, how often, what it promotes, its labels.

    SAE is a full id, site/LAYER or LAYER.
    """
    from .scope import Scope, feature_card

    with Scope.open(run_dir) as scope:
        card = scope.feature(sae, index)
        if card is not None:
            card["similar"] = scope.similar(card["sae_id"], card["idx"], k=5)
    if card is None:
        raise SaescopeError(f"feature {index} of SAE {sae} has not been analysed: run `saescope analyze {run_dir}`")
    if as_json:
        click.echo(json.dumps(card, indent=1))
        return
    click.echo(feature_card(card, n_examples=n_examples, style=click.style))


def _open_for_stage(run_dir, saes=()):
    """Open a run and check its SAEs (and the --sae choices) before a stage is marked running."""
    from .runs import Run

    run = Run.open(run_dir)
    run.require_saes()
    for ref in saes:
        run.resolve_sae(ref)
    return run


def _one_line(err: click.ClickException) -> str:
    """Click's message as one line; a usage error names the help to read instead of printing the usage."""
    text = " ".join(err.format_message().split()).rstrip(".")
    ctx = getattr(err, "ctx", None)
    if isinstance(err, click.UsageError) and ctx is not None:
        text += f" (see `{ctx.command_path} -h`)"
    return text


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit code 1 (tracebacks with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="saescope", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"error: {_one_line(err)}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except SaescopeError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except MemoryError:
        click.echo("error: out of memory: use fewer layers/sites, a smaller --batch-size or --tokens", err=True)
        sys.exit(1)
    except OSError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err.strerror or err}{': ' + str(err.filename) if err.filename else ''}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
