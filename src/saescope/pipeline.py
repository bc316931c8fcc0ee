"""The Python API behind the CLI verbs: each function runs one stage end to end.

    harvest_to_cache(...)  model + corpus → activation cache on disk
    train_run(...)         model + corpus (or a cache) → trained SAEs in a run folder
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import asdict
from pathlib import Path

from . import devices
from .corpus import Corpus
from .distributed import World, exchanged, launched, one_process, owner_of, shard, synced
from .endtoend import end_to_end
from .errors import SaescopeError
from .fsio import exclusive
from .harvest import harvest
from .models import DEFAULT_MODEL, SITE_KINDS, LoadedModel, load_model, local_ref
from .runs import Run
from .sae import Architecture, SAEConfig
from .train import Chunk, MultiTrainer, TrainConfig

log = logging.getLogger(__name__)


def parse_layers(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """"all", "3", "0,6,12", "0-5" (inclusive) → sorted layer list, checked against the model."""
    if spec is None or spec == "all":
        return list(range(n_layers))
    if isinstance(spec, list | tuple):
        layers = [int(x) for x in spec]
    else:
        layers = []
        for part in str(spec).split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = part.split("-")
                    if int(a) > int(b):
                        raise SaescopeError(f"layer range '{part}' is empty: write the lower layer first "
                                            f"({b}-{a})")
                    layers.extend(range(int(a), int(b) + 1))
                elif part:
                    layers.append(int(part))
            except ValueError:
                raise SaescopeError(f"cannot read layers '{spec}': use all, 3, 0,6,12 or 0-5") from None
    if not layers:
        raise SaescopeError(f"no layers given in '{spec}': use all, 3, 0,6,12 or 0-5")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise SaescopeError(f"layer {bad[0]} does not exist: the model has layers 0..{n_layers - 1}")
    return sorted(set(layers))


def parse_sites(spec: str | list[str]) -> list[str]:
    kinds = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for k in kinds:
        if k not in SITE_KINDS:
            raise SaescopeError(f"unknown site '{k}': choose from {', '.join(SITE_KINDS)}")
    if not kinds:
        raise SaescopeError("no sites given: use e.g. --sites resid_post")
    return kinds


def harvest_to_cache(out: str | Path, *, model: str = DEFAULT_MODEL, corpus: str = "default", sites="resid_post",
                     layers="all", tokens: int = 50_000, ctx_len: int = 256, batch_size: int = 8,
                     dtype: str = "float32", part: str = "train", lm: LoadedModel | None = None,
                     progress: bool = True) -> dict:
    """Cache activations at every requested site; resumes an interrupted cache in `out`."""
    from .store import ActivationCache, CacheWriter

    one_process("harvest")
    if tokens < 1:
        raise SaescopeError("--tokens must be positive")
    lm = lm or load_model(model)
    lm.check_ctx_len(ctx_len)
    if batch_size < 1:
        raise SaescopeError(f"--batch-size must be at least 1, got {batch_size}")
    site_objs = lm.sites(kinds=parse_sites(sites), layers=parse_layers(layers, lm.n_layers))
    corp = Corpus(corpus)
    corp.check(part)
    identity = {"model": model, "corpus": corp.describe()["source"], "order": corp.order, "part": part,
                "ctx_len": ctx_len, "batch_size": batch_size, "tokens": tokens}
    with exclusive(out, "harvest", kind="cache"):  # (two harvests into one folder would number shards alike)
        writer = CacheWriter(out, {s.key: s.width for s in site_objs}, dtype=dtype, meta={"identity": identity})
        if writer.complete:
            log.info("cache %s is already complete", out)
        else:
            with writer:
                remaining = tokens - writer.tokens_done
                if remaining > 0:
                    stream = corp.contexts(lm.tokenizer, part=part, ctx_len=ctx_len)
                    n = 0
                    for batch in harvest(lm, stream, site_objs, batch_size=batch_size, max_tokens=remaining,
                                         skip_contexts=writer.contexts_done, progress=progress):
                        writer.add(batch)
                        n += len(batch.token_ids)
                    if n < remaining:
                        raise SaescopeError(
                            f"the corpus has only {writer.tokens_done + n:,} {part} tokens (asked for {tokens:,}): "
                            "use --tokens with a smaller number or a larger corpus"
                        )
    cache = ActivationCache.open(out)
    return {"folder": str(out), "tokens": cache.n_tokens, "sites": cache.sites, "dtype": cache.dtype}


def sae_configs(lm: LoadedModel, model: str, sites: list[str], layers: list[int], widths: list[int],
                l0s: list[float], architecture: Architecture) -> list[SAEConfig]:
    out = []
    for layer in layers:
        for kind in sites:
            site = lm.site(kind, layer)
            for w in widths:
                for l0 in l0s:
                    out.append(SAEConfig(d_in=site.width, width=int(w), architecture=architecture, l0=float(l0),
                                         hf_hook_point_in=site.hook_name, hf_hook_point_out=site.hook_name,
                                         model_name=model, site=kind, layer=layer))
    return out


def train_run(out: str | Path, *, model: str = DEFAULT_MODEL, corpus: str = "default", sites="resid_post",
              layers="all", widths=(4096,), l0s=(32.0,), architecture: Architecture = "jump_relu",
              train: TrainConfig | None = None, ctx_len: int = 256, harvest_batch: int = 8,
              cache: str | Path | None = None, heldout_fraction: float = 0.05, resume: bool = True,
              lm: LoadedModel | None = None, progress: bool = True, parallel: str = "auto") -> Run:
    """Train every SAE (layers × sites × widths × L0s) from one activation stream into run folder `out`.

    Under torchrun (WORLD_SIZE > 1) every process runs this same call: `parallel` = data (auto) or layers,
    see distributed.py. In a single process `parallel` changes nothing."""
    train = train or TrainConfig()
    with launched(parallel, device=str(devices.current())) as world:  # nccl on CUDA, gloo on the CPU
        lm = lm or load_model(model)
        lm.check_ctx_len(ctx_len)
        kinds = parse_sites(sites)
        layer_list = parse_layers(layers, lm.n_layers)
        _check_world(world, train, layer_list, cache)
        model = local_ref(model)  # a run made with a relative path works from any folder
        cfgs = sae_configs(lm, model, kinds, layer_list, list(widths), list(l0s), architecture)
        if not cfgs:
            raise SaescopeError("no SAEs to train: give at least one layer, site, width and L0")
        corp = Corpus(corpus, heldout_fraction=heldout_fraction, seed=train.seed, order=Run.corpus_order(out))
        if cache:
            _check_cache(cache, cfgs)
        else:
            corp.check("train")  # an empty corpus fails here, before the run folder is made
        config = {"sites": kinds, "layers": layer_list, "widths": [int(w) for w in widths],
                  "l0s": [float(x) for x in l0s], "architecture": architecture, "ctx_len": int(ctx_len),
                  "train": asdict(train), "cache": local_ref(cache) if cache else None}
        if not world.trivial:
            config["parallel"] = world.describe
        corpus_desc = {"source": local_ref(corp.source), "heldout_fraction": heldout_fraction, "seed": train.seed,
                       "order": corp.order}
        run = _create_run(out, world, model=model, corpus=corpus_desc, config=config)
        run.use_model(lm)
        if run.is_done("train"):
            log.info("run %s: training already done", out)
            return run
        n_saes = len(cfgs)
        if world.mode == "layers":
            cfgs = [c for c in cfgs if owner_of(c.layer, layer_list, world) == world.rank]
        trainer = MultiTrainer(cfgs, train, checkpoint_dir=run.checkpoint_dir, world=world, device=lm.device)
        if resume and trainer.resume():
            log.warning("resuming training from %s tokens", f"{trainer.tokens_done:,}")
        stage = run.stage("train", n_saes=n_saes) if world.rank == 0 else contextlib.nullcontext()
        with stage:
            if cache:
                chunks = _cache_chunks(cache, trainer, train)
            else:
                chunks = _harvest_chunks(lm, corp, kinds, layer_list, ctx_len, harvest_batch, trainer)
            trainer.fit(chunks, progress=progress)
            if train.e2e_fraction > 0:  # the last tokens end to end, on the stream after the main phase's contexts
                contexts = corp.contexts(lm.tokenizer, part="train", ctx_len=ctx_len)
                end_to_end(lm, trainer, itertools.islice(contexts, trainer.contexts_done, None), progress=progress)
            _finish(run, trainer)
    for msg in trainer.failures:
        log.error(msg)
    return run


def _check_world(world: World, train: TrainConfig, layers: list[int], cache: object = None) -> None:
    if train.e2e_fraction > 0 and (cache or not world.trivial):
        raise SaescopeError("the end-to-end phase (--e2e) runs the model on the corpus in a single process: train "
                            "without --cache and torchrun, or with --e2e 0")
    if world.mode == "layers" and world.size > len(layers):
        raise SaescopeError(f"--parallel layers with {world.size} processes needs at least {world.size} layers "
                            f"(got {len(layers)}): use fewer processes or --parallel data")
    if world.mode == "data" and train.batch_size < 2 * world.size:
        raise SaescopeError(f"--batch-size {train.batch_size} is too small for {world.size} processes: "
                            f"use at least {2 * world.size}")


def _create_run(out, world: World, **identity) -> Run:
    """Rank 0 creates (or reopens) the run folder; the other ranks reopen it once it is there."""
    if world.rank == 0:
        run = Run.create(out, **identity)
    world.barrier()
    return run if world.rank == 0 else Run.create(out, **identity)


def _harvest_chunks(lm, corp: Corpus, kinds, layer_list, ctx_len: int, harvest_batch: int, trainer: MultiTrainer):
    """Chunks harvested live: with several ranks, each harvests its shard of the contexts (and, layer
    parallel, every layer's sites, to exchange them)."""
    world = trainer.world
    site_objs = lm.sites(kinds=kinds, layers=layer_list)
    stream = shard(corp.contexts(lm.tokenizer, part="train", ctx_len=ctx_len), world)
    batches = harvest(lm, stream, site_objs, batch_size=harvest_batch, skip_contexts=trainer.contexts_done,
                      progress=False)
    chunks = (Chunk(b.acts, b.n_contexts) for b in batches)
    if world.mode == "data":
        return synced(chunks, world)
    if world.mode == "layers":
        return exchanged(chunks, world, {s.key: owner_of(s.layer, layer_list, world) for s in site_objs})
    return chunks


def _finish(run: Run, trainer: MultiTrainer) -> None:
    """Save the SAEs (data parallel: rank 0; layers: each rank its own) and the last checkpoint; rank 0
    updates the manifest once every rank has saved."""
    world = trainer.world
    saved = trainer.save(run.saes_dir)
    trainer.checkpoint()
    failures = [f for fs in world.gather_objects(trainer.failures) for f in fs]
    world.barrier()
    if world.rank == 0:
        run.update(failures=failures if world.mode == "layers" else trainer.failures,
                   tokens_trained=trainer.tokens_done)
    if not saved and (world.mode != "data" or world.rank == 0):
        raise SaescopeError("no SAE finished training: " + "; ".join(trainer.failures[:3]))


def _check_cache(cache_dir, cfgs: list[SAEConfig]) -> None:
    """Refuse a cache that is not one, or lacks a site the SAEs read (before the run folder is made)."""
    from .store import ActivationCache

    cache = ActivationCache.open(cache_dir)
    missing = sorted({f"{c.site}/{c.layer}" for c in cfgs} - set(cache.sites))
    if missing:
        raise SaescopeError(f"cache {cache_dir} has no activations for {', '.join(missing)}: harvest those sites first")


def _cache_chunks(cache_dir, trainer: MultiTrainer, train: TrainConfig):
    """Chunks from an activation cache, in a seeded shuffled order; skips chunks already trained on."""
    from .store import ActivationCache

    cache = ActivationCache.open(cache_dir)
    per_chunk = train.batch_size * 4
    batches = cache.batches(per_chunk, sites=trainer.sites, shuffle=True, seed=train.seed, as_dtype=None)
    todo = ({k: v for k, v in batch.items() if k != "token_ids"}
            for i, batch in enumerate(batches) if i >= trainer.contexts_done)
    for acts in devices.prefetch(todo, trainer.device):  # pinned, overlapped host → GPU copies
        yield Chunk(acts, 1)


def run_all(out: str | Path, *, model: str = DEFAULT_MODEL, corpus: str = "default", sites="resid_post",
            layers="all", widths=(2048,), l0s=(32.0,), architecture: Architecture = "jump_relu", tokens: int = 100_000,
            ctx_len: int = 256, eval_tokens: int = 8192, ce_tokens: int | None = None, analyze_tokens: int = 8192,
            llm_url: str | None = None, llm_model: str | None = None, echo=log.warning) -> Run:
    """train → eval → analyze → label: every stage that the manifest marks done is skipped."""
    import time

    from .evaluate import CE_TOKENS, OTHER, evaluate

    if llm_url and not llm_model:
        raise SaescopeError("--llm needs --llm-model NAME (the model's name on that server)")
    one_process("run")
    t0 = time.time()
    lm = load_model(model)
    loaded = f"{model}: {lm.n_layers} layers, d_model {lm.d_model}, loaded in {time.time() - t0:.0f} s"

    def stage(name, fn):
        if run.is_done(name):
            echo(f"[{name}] already done")
            return
        t = time.time()
        with run.stage(name):
            fn()
        echo(f"[{name}] done in {time.time() - t:.0f} s")

    t = time.time()
    run = train_run(out, model=model, corpus=corpus, sites=sites, layers=layers, widths=widths, l0s=l0s,
                    architecture=architecture, train=TrainConfig(tokens=tokens), ctx_len=ctx_len, lm=lm)
    echo(f"[train] {len(run.sae_ids())} SAEs ({time.time() - t:.0f} s; model {loaded})")
    ce = CE_TOKENS if ce_tokens is None else ce_tokens
    stage("eval", lambda: evaluate(run, eval_tokens=eval_tokens, ce_tokens=ce, other=None if corpus == OTHER else OTHER))

    def do_analyze():
        from .analyze import analyze

        analyze(run, n_tokens=analyze_tokens, lm=lm)

    stage("analyze", do_analyze)

    def do_label():
        if llm_url:
            from .label.llm import label_llm

            if not llm_model:
                raise SaescopeError("--llm needs --llm-model NAME")
            echo(str(label_llm(run, llm_url, llm_model)))
        else:
            from .label.offline import label_offline

            echo(str(label_offline(run)))
        index_labels_quietly(run)

    stage("label", do_label)
    echo(f"[run] {run.root} ready ({time.time() - t0:.0f} s in this call)")
    return run


def index_labels_quietly(run: Run) -> None:
    """Embed new labels for semantic search now, so the first search is fast (skipped without the model)."""
    try:
        from .search import index_labels

        index_labels(run)
    except SaescopeError as err:
        log.warning("semantic index not built: %s", err)
