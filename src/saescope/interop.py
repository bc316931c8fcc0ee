"""Bring SAEs made by other tools into a run; take a run's SAEs out to SAELens and Neuronpedia.

    import_sae("path/to/sae", "runs/x")                 SAELens, sparsify, Gemma Scope 1/2 folders
    export_run("runs/x", "saelens", "out/")             out/<site>/<sae>/{cfg.json, sae_weights.safetensors}
    export_run("runs/x", "neuronpedia", "out/")         Neuronpedia dataset export (see formats/neuronpedia.py)

An imported SAE must read the run's model at a site saescope knows: its input width must equal the
width of that site, and a Hugging Face hook name must name the very module saescope hooks there.
It is saved in our layout (weights folded to model units) with ``extra["imported_from"]``.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import NamedTuple

from .errors import SaescopeError
from .formats import KNOWN, detect_format, read_sae_folder
from .formats.common import hook_ref
from .formats.hooks import parse_hook_name
from .fsio import write_json
from .runs import Run
from .sae import SAEConfig, read_config

log = logging.getLogger(__name__)
EXPORT_FORMATS = ("saelens", "neuronpedia")


class ImportResult(NamedTuple):
    sae_id: str  # e.g. "resid_post/layer_3_width_4096_l0_32"
    folder: Path
    notes: list[str]


def import_sae(path: str | Path, run_dir: str | Path, *, model=None, name: str | None = None,
               overwrite: bool = False) -> ImportResult:
    """Read an SAE folder of any known format, check it fits the run's model, and save it into the run.

    `model` is the run's `LoadedModel` when the caller already has it (tests pass a tiny one);
    otherwise it is loaded from the run manifest.
    """
    path = Path(path)
    run = Run.open(run_dir)
    with run.exclusive("import"):  # (its SAE folder, and the analysis and eval it clears)
        fmt = detect_format(path) if path.is_dir() else None
        sae = read_sae_folder(path)
        cfg = sae.cfg
        if cfg.site not in ("resid_post", "attn_out", "mlp_out", "mlp_in") or cfg.layer < 0:
            hook = cfg.hf_hook_point_in or cfg.extra.get("hook_name") or "(none recorded)"
            raise SaescopeError(f"{path}: cannot tell which saescope site this SAE reads (hook {hook}); saescope "
                                "imports SAEs on resid_post, attn_out, mlp_out or mlp_in of one layer")
        lm = model if model is not None else run.model
        site = lm.site(cfg.site, cfg.layer)
        notes = _check_fits(path, cfg, site, run.manifest["model"])
        theirs = cfg.model_name

        imported = {"path": str(path.resolve()), "format": fmt, "hook_name": cfg.extra.get("hook_name") or
                    cfg.hf_hook_point_in, "model_name": theirs, "time": time.time()}
        new = SAEConfig.from_json({**cfg.to_json(), "hf_hook_point_in": site.hook_name,
                                   "model_name": run.manifest["model"], "imported_from": imported})
        sae.cfg = new
        sae_id, folder, replaced = _target_folder(run, cfg.site, new.folder_name if name is None else name, overwrite)
        notes += replaced
        sae.save(folder)
        for n in notes:
            log.warning("%s", n)
        return ImportResult(sae_id, folder, notes)


def _check_fits(path: Path, cfg: SAEConfig, site, run_model: str) -> list[str]:
    """Refuse an SAE that does not read `site` of the run's model; return notes on what was assumed."""
    notes: list[str] = []
    if cfg.d_in != site.width:
        raise SaescopeError(f"{path}: the SAE reads {cfg.d_in}-wide activations but {cfg.site} of layer {cfg.layer} "
                            f"in the run's model ({run_model}) is {site.width} wide: it was made for "
                            "another model or site")
    ref = hook_ref(cfg)
    ours = parse_hook_name(site.hook_name)
    if ref is not None and ref.style == "hf" and ours is not None and \
            (ref.path_in_layer, ref.io) != (ours.path_in_layer, ours.io):
        raise SaescopeError(f"{path}: the SAE reads {ref.hf_name}, but saescope's {cfg.site} for this model is "
                            f"{site.hook_name}: they are different activations")
    if ref is not None and ref.style == "tl":
        notes.append(f"hook {ref.name} (TransformerLens) mapped to {site.hook_name}; if the SAE was trained on a "
                     "TransformerLens model with processed weights, its activations may be centred differently")
    if cfg.model_name and _model_key(cfg.model_name) != _model_key(run_model):
        notes.append(f"the SAE names model '{cfg.model_name}', the run uses '{run_model}' (widths match)")
    if cfg.extra.get("l0_nominal"):
        notes.append("the files do not give a target L0; the folder name uses a nominal one")
    return notes


def _target_folder(run: Run, site: str, folder_name: str, overwrite: bool) -> tuple[str, Path, list[str]]:
    """(sae_id, folder, notes) for the imported SAE; with `overwrite`, everything computed from the SAE
    it replaces is marked not done first (a failure in between can only cause work to be redone)."""
    if not isinstance(folder_name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", folder_name):
        shown = repr(folder_name)[:60] + ("..." if len(repr(folder_name)) > 60 else "")
        raise SaescopeError(f"invalid SAE folder name {shown}: use up to 100 letters, digits, '_', '-' "
                            "or '.', not starting with '.' or '-'")
    folder = run.saes_dir / site / folder_name
    sae_id = f"{site}/{folder_name}"
    if not folder.exists():
        return sae_id, folder, []
    if not overwrite:
        raise SaescopeError(f"SAE {sae_id} already exists in {run.root}: give another name (--name), or "
                            "--overwrite to replace it (its analysis, eval and automatic labels are then redone)")
    marked = _weights_replaced(run, sae_id)
    return sae_id, folder, [f"replaced the weights of {sae_id}; marked not done (re-run them): "
                            + ("; ".join(marked) if marked else "nothing had been computed from the old weights")]


def _weights_replaced(run: Run, sae_id: str) -> list[str]:
    """An SAE's weights are about to be replaced: mark everything computed from the old weights as not
    done, so the next eval / analyze / label (and `saescope run`) redo it. Returns what was marked.

    - features.sqlite: the SAE's statistics and examples are cleared (status 'pending'); its labels and
      their scores are kept, flagged `stale` (written for the old weights);
    - eval.json: the SAE's metrics are removed (listed under "replaced"), eval.png redrawn without them;
    - manifest: the eval, analyze and label stages go back to pending.
    """
    from .evaluate import drop_from_eval

    marked = []
    if run.db_path.is_file():  # never create a database just to mark it
        with run.db() as db:
            if db.weights_replaced(sae_id) is not None:
                marked.append("its analysis (cleared; labels kept, flagged as written for the old weights)")
    if drop_from_eval(run.root, sae_id):
        marked.append("its eval metrics (removed from eval.json)")
    for stage in ("eval", "analyze", "label"):
        if run.reopen_stage(stage, reason=f"weights of {sae_id} replaced"):
            marked.append(f"stage {stage} (pending)")
    return marked


def _model_key(name: str) -> str:
    """Comparable model name: 'google/gemma-3-270m-pt', '~/.cache/saescope/models/gemma-3-270m-4018d93daa'
    and 'gemma-3-270m' all give 'gemma-3-270m'."""
    key = Path(str(name).rstrip("/")).name.lower().removesuffix(".gguf")
    return re.sub(r"-[0-9a-f]{10}$", "", key).removesuffix("-pt")


# ---------------------------------------------------------------------------- export


def export_run(run_dir: str | Path, format: str, out_dir: str | Path, *, sae_ids: list[str] | None = None,
               **options) -> dict:
    """Write the run's SAEs (all, or `sae_ids`) in another tool's format under `out_dir`.

    Returns a report (also written as ``out_dir/saescope-export.json``): what was written, the
    format version targeted, and notes (e.g. SAEs exported without dashboards).
    Neuronpedia options: model_id, release, creator_id, creator_name, max_examples.
    """
    if format not in EXPORT_FORMATS:
        raise SaescopeError(f"unknown export format '{format}': choose {' or '.join(EXPORT_FORMATS)} "
                            f"(imports read {KNOWN})")
    run = Run.open(run_dir)
    ids = sae_ids or run.sae_ids()
    if not ids:
        raise SaescopeError(f"run {run.root} has no SAEs to export: train some with `saescope train`")
    ids = [run.resolve_sae(i) for i in ids]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SaescopeError(f"{out} is a file, not a folder: give the export a new folder name")
    if format == "saelens":
        if options:
            raise SaescopeError(f"export to saelens takes no options ({', '.join(sorted(options))} given)")
        report = _export_saelens(run, ids, out)
    else:
        report = _export_neuronpedia(run, ids, out, **options)
    write_json(out / "saescope-export.json", report)
    return report


def _load(run: Run, sae_id: str):
    sae = run.load_sae(sae_id)
    if not sae.cfg.model_name:
        sae.cfg.model_name = str(run.manifest["model"])
    return sae


def _export_saelens(run: Run, ids: list[str], out: Path) -> dict:
    from .formats.saelens import SAELENS_VERSION, write_saelens

    written = []
    for sae_id in ids:
        folder = write_saelens(_load(run, sae_id), out / sae_id)
        written.append({"sae_id": sae_id, "folder": str(folder.relative_to(out))})
    return {"format": "saelens", "version": f"sae-lens {SAELENS_VERSION} (SAE.load_from_disk)",
            "run": str(run.root), "saes": written, "notes": []}


def _export_neuronpedia(run: Run, ids: list[str], out: Path, *, model_id: str | None = None,
                        release: str | None = None, creator_id: str = "saescope", creator_name: str = "saescope",
                        max_examples: int = 40) -> dict:
    from .formats import neuronpedia as np_
    from .formats.saelens import CFG, write_saelens

    model_id = np_.slug(model_id or _model_key(run.manifest["model"]))
    release = np_.slug(release or f"saescope-{run.root.resolve().name}")
    created = time.time()
    notes: list[str] = []
    db = None
    if run.db_path.is_file():
        db = run.db(readonly=True)
    else:
        notes.append(f"no {run.db_path.name} in the run: exported weights and metadata only (no dashboards, "
                     "activations or explanations); run `saescope analyze` first to include them")
    try:
        analysed = {s["id"]: s for s in db.saes()} if db is not None else {}
        saes = {i: _load(run, i) for i in ids}
        n_layers = max(s.cfg.layer for s in saes.values()) + 1
        d_model = max((s.cfg.d_in for s in saes.values() if s.cfg.site == "resid_post"), default=0)
        corpus = run.manifest.get("corpus") or {}
        names = {i: np_.source_names(s.cfg.site, s.cfg.layer, s.cfg.width, s.cfg.l0) for i, s in saes.items()}
        taken = [n[1] for n in names.values()]
        for sae_id, (set_name, source_id, desc) in list(names.items()):
            if taken.count(source_id) > 1:  # same site/layer/width/L0 twice: tell them apart by folder name
                names[sae_id] = (set_name, f"{source_id.partition('__')[0]}__{np_.slug(sae_id.split('/')[-1])}", desc)
        written = []
        for sae_id, sae in saes.items():
            c = sae.cfg
            set_name, source_id, desc = names[sae_id]
            weights = out / "saelens" / source_id
            write_saelens(sae, weights)
            src = out / model_id / source_id
            info = analysed.get(sae_id)
            n_tokens = (info or {}).get("n_tokens")
            np_.write_metadata(src, np_.metadata_rows(
                model_id=model_id, source_id=source_id, set_name=set_name, set_description=desc, release=release,
                creator_id=creator_id, creator_name=creator_name, created=created, n_layers=n_layers,
                d_model=d_model, sae_cfg=read_config(weights / CFG), weights_folder=f"saelens/{source_id}",
                dataset=str(corpus.get("name") or corpus.get("path") or corpus or ""),
                notes=f"saescope SAE {sae_id}", n_prompts=None, n_tokens_in_prompt=None))
            entry = {"sae_id": sae_id, "source_id": source_id, "folder": str(src.relative_to(out)),
                     "weights": str(weights.relative_to(out)), "features": 0, "activations": 0, "explanations": 0}
            if info is None or info.get("status") != "done":
                if db is not None:
                    notes.append(f"{sae_id}: not analysed (status {info and info.get('status')}): weights only")
            else:
                rows = np_.feature_rows(db, sae_id, model_id=model_id, source_id=source_id, creator_id=creator_id,
                                        created=created, width=c.width, max_examples=max_examples)
                entry.update(np_.write_source(src, rows))
                entry["n_tokens_analysed"] = n_tokens
            written.append(entry)
    finally:
        if db is not None:
            db.close()
    return {"format": "neuronpedia", "version": np_.FORMAT_VERSION, "run": str(run.root), "model_id": model_id,
            "release": release, "saes": written, "notes": notes}
