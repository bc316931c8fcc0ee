"""`saescope <verb>`: the command line. Each verb is a thin layer over the Python API."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click

from .errors import SaescopeError
from .models import DEFAULT_MODEL, SITE_KINDS

DEFAULT_RUN = "runs/gemma-3-270m"


def _csv_numbers(value: str, cast=float) -> list:
    try:
        return [cast(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got '{value}'") from None


model_opt = click.option("--model", default=DEFAULT_MODEL, show_default=True,
                         help="'gemma-3-270m', a local model folder, a .gguf file, or a Hugging Face id.")
corpus_opt = click.option("--corpus", default="default", show_default=True,
                          help="'default' (Wikipedia leads + extras), a file, a folder, .jsonl, .parquet, or hf:NAME.")
sites_opt = click.option("--sites", default="resid_post", show_default=True,
                         help=f"Comma-separated sites: {', '.join(SITE_KINDS)}.")
layers_opt = click.option("--layers", default="all", show_default=True, help="all, 6, 0,6,12 or 0-5.")


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
@model_opt
@corpus_opt
@sites_opt
@layers_opt
@click.option("--tokens", default=50_000, help="Tokens to cache (BOS/EOS/pad positions excluded).")
@click.option("--out", default="runs/cache", type=click.Path(), help="Cache folder (an interrupted one resumes).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16")
@click.option("--ctx-len", default=256, help="Tokens per packed context (including BOS).")
@click.option("--batch-size", default=8, help="Contexts per forward pass.")
@click.option("--part", type=click.Choice(["train", "heldout"]), default="train", help="Corpus split to read.")
def harvest(model, corpus, sites, layers, tokens, out, dtype, ctx_len, batch_size, part):
    """Cache activations at every requested site of every requested layer, in one forward pass each."""
    from .pipeline import harvest_to_cache

    info = harvest_to_cache(out, model=model, corpus=corpus, sites=sites, layers=layers, tokens=tokens,
                            ctx_len=ctx_len, batch_size=batch_size, dtype=dtype, part=part)
    click.echo(f"cached {info['tokens']:,} tokens × {len(info['sites'])} sites ({info['dtype']}) in {info['folder']}")


@cli.command()
@model_opt
@corpus_opt
@sites_opt
@layers_opt
@click.option("--widths", default="4096", help="Comma-separated SAE widths.")
@click.option("--l0", "l0s", default="32", help="Comma-separated target L0s (k for topk).")
@click.option("--arch", type=click.Choice(["jump_relu", "topk", "batchtopk", "relu"]), default="jump_relu")
@click.option("--tokens", default=100_000, help="Training tokens (every SAE sees the same tokens).")
@click.option("--batch-size", default=1024, help="Tokens per optimisation step.")
@click.option("--lr", default=0.0, help="Learning rate (0 = automatic for the width and budget).")
@click.option("--seed", default=0)
@click.option("--cache", type=click.Path(exists=True), default=None, help="Train from a harvest cache instead of the live model.")
@click.option("--out", default=DEFAULT_RUN, type=click.Path(), help="Run folder.")
@click.option("--resume/--no-resume", default=True, help="Continue from the last checkpoint when there is one.")
def train(model, corpus, sites, layers, widths, l0s, arch, tokens, batch_size, lr, seed, cache, out, resume):
    """Train an SAE for every layer × site × width × L0, all from one pass over the corpus."""
    from .pipeline import train_run
    from .train import TrainConfig

    tc = TrainConfig(tokens=tokens, batch_size=batch_size, lr=lr, seed=seed)
    run = train_run(out, model=model, corpus=corpus, sites=sites, layers=layers, widths=_csv_numbers(widths, int),
                    l0s=_csv_numbers(l0s), architecture=arch, train=tc, cache=cache, resume=resume)
    click.echo(f"trained {len(run.sae_ids())} SAEs in {run.root}/saes")


@cli.command("eval")
@click.argument("run_dir", default=DEFAULT_RUN, type=click.Path())
@click.option("--tokens", default=8192, help="Held-out tokens for L0/FVU/dead/dense.")
@click.option("--ce-contexts", default=4, help="Held-out contexts for ΔLM loss (0 skips it).")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_cmd(run_dir, tokens, ce_contexts, as_json):
    """Evaluate every SAE of a run on held-out tokens; writes eval.json and eval.png."""
    from .evaluate import evaluate
    from .runs import Run

    run = Run.open(run_dir)
    with run.stage("eval"):
        result = evaluate(run, eval_tokens=tokens, delta_contexts=ce_contexts)
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(f"{'SAE':<44} {'L0':>7} {'target':>6} {'FVU':>7} {'dead':>6} {'dense':>6} {'ΔLM':>7} {'CErec':>6}")
    for sae_id, m in result["saes"].items():
        click.echo(f"{sae_id:<44} {m['l0']:>7.1f} {m['l0_target']:>6g} {m['fvu']:>7.3f} {m['dead_fraction']:>6.3f} "
                   f"{m['dense_fraction']:>6.3f} {m.get('delta_lm_loss', float('nan')):>7.3f} {m.get('ce_recovered', float('nan')):>6.3f}")
    click.echo(f"held-out tokens: {result['eval_tokens']:,}; plot: {Path(run_dir) / 'eval.png'}")


def main(argv=None):
    """Entry point: user errors become one line on stderr and exit code 1 (tracebacks with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="saescope", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
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
