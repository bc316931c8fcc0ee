"""A run folder on disk and its manifest (DESIGN.md §3).

    runs/NAME/manifest.json   model, corpus, config, versions, seed, stage status
    runs/NAME/saes/<site>/layer_<L>_width_<W>_l0_<T>/{config.json, params.safetensors}
    runs/NAME/eval.json, eval.png, features.sqlite, cache/, checkpoints/

Stages are marked running → done (or failed) in the manifest, written atomically,
so a stage that did not finish never looks finished and `saescope run` can skip
what is done. A stage holds the run for writing (`Run.exclusive`, an OS file lock on
RUN/.lock, `fsio.exclusive`): a second process that would write the same run is refused
in one line instead of interleaving its rows with the first one's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from functools import cached_property
from pathlib import Path

from .errors import SaescopeError
from .fsio import exclusive, read_json, write_json

MANIFEST = "manifest.json"
STAGES = ("train", "eval", "analyze", "label")


def _versions() -> dict:
    import torch
    import transformers

    from .version import __version__

    return {"saescope": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


class Run:
    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.manifest = manifest

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, root: str | Path, *, model: str, corpus: dict, config: dict) -> Run:
        """Create a run folder, or reopen it when it was made with the same model, corpus and config."""
        root = Path(root)
        if (root / MANIFEST).is_file():
            run = cls.open(root)
            mine = {"model": model, "corpus": corpus, "config": config}
            theirs = {k: run.manifest.get(k) for k in mine}
            theirs["model"] = run.model_spec  # older runs stored local paths relative to where they were made
            if isinstance(theirs["corpus"], dict) and "source" in theirs["corpus"]:
                theirs["corpus"] = {**theirs["corpus"], "order": run._order(),  # none: made before the shuffle
                                    "source": run._local(theirs["corpus"]["source"])}
            if _jsonable(mine) != _jsonable(theirs):
                diff = [k for k in mine if _jsonable(mine[k]) != _jsonable(theirs[k])]
                verb = "differs" if len(diff) == 1 else "differ"
                raise SaescopeError(f"{root} holds another run (its {', '.join(diff)} {verb}): choose a new --out "
                                    "or delete the folder")
            return run
        if root.exists() and not root.is_dir():
            raise SaescopeError(f"{root} is a file, not a run folder: choose another --out")
        if root.exists() and any(root.iterdir()):
            raise SaescopeError(f"{root} is not empty and holds no saescope run: choose a new --out")
        manifest = {"format": 1, "created": time.time(), "model": model, "corpus": corpus, "config": config,
                    "versions": _versions(), "stages": {s: {"status": "pending"} for s in STAGES}}
        root.mkdir(parents=True, exist_ok=True)
        write_json(root / MANIFEST, manifest)
        return cls(root, manifest)

    @classmethod
    def corpus_order(cls, root: str | os.PathLike) -> str:
        """The corpus order a run at `root` keeps: the one it was made with ("source" when it was made before
        the shuffle), "shuffled" where there is no run yet."""
        if not (Path(root) / MANIFEST).is_file():
            return "shuffled"
        return cls.open(root)._order()

    def _order(self) -> str:
        """The manifest's corpus order; "source" when it names none (made before the shuffle)."""
        from .corpus import ORDERS

        desc = self.manifest.get("corpus")
        order = desc.get("order", "source") if isinstance(desc, dict) else "source"
        if order not in ORDERS:
            raise SaescopeError(f"{self.root / MANIFEST} names an unknown corpus order {order!r}: set it to "
                                "\"shuffled\" or \"source\" (a run without one reads its corpus in stored order)")
        return order

    @classmethod
    def open(cls, root: str | os.PathLike) -> Run:
        root = Path(root)
        if not root.is_dir():
            raise SaescopeError(f"run not found: {root} (create one with `saescope train` or `saescope run`)")
        if not (root / MANIFEST).is_file():
            raise SaescopeError(f"{root} is not a saescope run (no {MANIFEST})")
        manifest = read_json(root / MANIFEST, what="run manifest")
        for key in ("model", "stages"):
            if key not in manifest:
                raise SaescopeError(f"run manifest {root / MANIFEST} has no '{key}': the file is damaged")
        run = cls(root, manifest)
        run._order()  # an order no stage could read: refused here, before any verb records anything
        return run

    # ------------------------------------------------------------------ stages

    def require_saes(self) -> list[str]:
        """The run's SAE ids; refuses a run without any (checked before a stage is marked running)."""
        ids = self.sae_ids()
        if not ids:
            raise SaescopeError(f"run {self.root} has no SAEs yet: train some with `saescope train`")
        return ids

    def status(self, stage: str) -> str:
        return self.manifest["stages"].get(stage, {}).get("status", "pending")

    def is_done(self, stage: str) -> bool:
        return self.status(stage) == "done"

    @contextlib.contextmanager
    def stage(self, name: str, **info):
        """Mark a stage running; done on success, failed (with the message) on error, holding the run for
        writing meanwhile (`exclusive`). The stage's record names the device it ran on (`--device`)."""
        from . import devices

        with self.exclusive(name):
            info.setdefault("device", devices.describe())
            t0 = time.time()
            self._set_stage(name, status="running", started=t0, **info)
            try:
                yield
            except BaseException as err:
                self._set_stage(name, status="failed", error=str(err)[:500] or type(err).__name__,
                                seconds=round(time.time() - t0, 1))
                raise
            self._set_stage(name, status="done", seconds=round(time.time() - t0, 1), **info)

    @contextlib.contextmanager
    def exclusive(self, what: str):
        """Hold the run for writing (`fsio.exclusive`; `what`: the stage or verb, shown to a process that is
        refused): two analyses of one run deleted and inserted each other's rows (a raw UNIQUE-constraint
        traceback, or examples of both mixed in one atlas), and two processes saving the manifest lost each
        other's stage records. Once held, the manifest is re-read: another process may have changed it since
        this one opened the run."""
        with exclusive(self.root, what, kind="run"):
            self.manifest = read_json(self.root / MANIFEST, what="run manifest")
            yield

    def reopen_stage(self, name: str, reason: str) -> bool:
        """Mark stage `name` pending again because its inputs changed; False when it already was."""
        if self.status(name) == "pending":
            return False
        self._set_stage(name, status="pending", reason=reason)
        return True

    def _set_stage(self, name: str, **fields) -> None:
        self.manifest["stages"][name] = {**self.manifest["stages"].get(name, {}), **fields}
        self.save()

    def update(self, **fields) -> None:
        self.manifest.update(fields)
        self.save()

    def save(self) -> None:
        write_json(self.root / MANIFEST, self.manifest)

    # ------------------------------------------------------------------ contents

    @property
    def saes_dir(self) -> Path:
        return self.root / "saes"

    @property
    def db_path(self) -> Path:
        return self.root / "features.sqlite"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints"

    def sae_ids(self) -> list[str]:
        """Ids like "resid_post/layer_3_width_4096_l0_32", sorted by site, layer, width, L0."""
        if not self.saes_dir.is_dir():
            return []
        ids = [f"{p.parent.name}/{p.name}" for p in self.saes_dir.glob("*/*")
               if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()]
        return sorted(ids, key=_sae_sort_key)

    def sae_path(self, sae_id: str) -> Path:
        return self.saes_dir / self.resolve_sae(sae_id)

    def resolve_sae(self, ref: str | int) -> str:
        """Accept a full id, "site/LAYER", or just "LAYER" (when one SAE matches)."""
        ids = self.sae_ids()
        if not ids:
            raise SaescopeError(f"run {self.root} has no SAEs yet: train some with `saescope train`")
        ref = str(ref)
        if ref in ids:
            return ref
        site, _, layer = ref.rpartition("/")
        if layer.isdigit():
            hits = [i for i in ids if _sae_sort_key(i)[1] == int(layer) and (not site or i.startswith(site + "/"))]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise SaescopeError(f"'{ref}' matches several SAEs ({', '.join(hits)}): give the full id")
        raise SaescopeError(f"no SAE '{ref}' in run {self.root}: known SAEs are {', '.join(ids[:8])}"
                            + (" ..." if len(ids) > 8 else ""))

    def load_sae(self, sae_id: str):
        from .formats import load_sae

        return load_sae(self.sae_path(sae_id))

    def _local(self, spec: str) -> str:
        """A model or corpus path from the manifest. New runs store absolute paths; older ones stored the path
        as typed, relative to a folder we no longer know: try the working folder, then the run folder and
        its parents."""
        from .models import DEFAULT_MODEL

        spec = str(spec)
        if Path(spec).is_absolute() or spec in ("default", DEFAULT_MODEL) or spec.startswith("hf:"):
            return spec  # the default model's name is also the default run's folder name
        if Path(spec).exists():
            return str(Path(spec).resolve())
        root = self.root.resolve()
        for base in (root, *root.parents):
            if (base / spec).exists():
                return str(base / spec)
        return spec

    @property
    def model_spec(self) -> str:
        """The run's model as `load_model` takes it, from any working folder."""
        return self._local(self.manifest["model"])

    def corpus(self):
        """The run's corpus (same source, held-out split and seed as training), from any working folder."""
        from .corpus import Corpus

        desc = self.manifest.get("corpus") or {}
        return Corpus(self._local(desc.get("source", "default")), desc.get("heldout_fraction", 0.05),
                      desc.get("seed", 0), order=self._order())

    @cached_property
    def model(self):
        from .models import load_model

        return load_model(self.model_spec, **self.manifest.get("model_options", {}))

    @property
    def generation_dtype(self):
        """The dtype `generation_model` has, or will have (`models.generation_dtype` on the run's device): what a
        steering calibration is cached under, known without loading the model."""
        from .models import generation_dtype

        if "generation_model" in self.__dict__:
            return self.generation_model.dtype
        loaded = self.__dict__.get("model")
        return generation_dtype(loaded.device if loaded is not None else None)

    @cached_property
    def generation_model(self):
        """The model that generates text (steering and its calibration): the run's model in
        `generation_dtype` (bf16 where the CPU multiplies bf16 fast): loaded in that dtype, or, when
        `model` is loaded already, `model` itself or a copy of it cast to that dtype."""
        from .models import dtype_name, load_model

        dtype, loaded = self.generation_dtype, self.__dict__.get("model")
        if loaded is not None:  # a copy in memory (no second load; the tokenizer is shared)
            return loaded if loaded.dtype == dtype else loaded.cast(dtype)
        options = {**self.manifest.get("model_options", {}), "dtype": dtype_name(dtype)}
        return load_model(self.model_spec, **options)

    def use_model(self, lm) -> None:
        """Reuse a model that is already loaded (the one `model` would load) instead of loading it again."""
        self.__dict__["model"] = lm  # the cached_property's slot

    def db(self, readonly: bool = False):
        from .featuredb import FeatureDB

        return FeatureDB.open(self.db_path, readonly=readonly)

    def reader_db(self):
        """features.sqlite for a reader: writable (pending migrations applied) when this user may
        write the run, read-only otherwise, so a read-only run can still be browsed and searched."""
        from .featuredb import can_write

        return self.db(readonly=not can_write(self.db_path))


def _sae_sort_key(sae_id: str):
    site, _, name = sae_id.partition("/")
    parts = dict(zip(name.split("_")[::2], name.split("_")[1::2]))
    try:
        return (site, int(parts.get("layer", -1)), int(parts.get("width", 0)), float(parts.get("l0", 0)))
    except ValueError:
        return (site, -1, 0, 0.0)


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def as_run(run: Run | str | os.PathLike) -> Run:
    """The one conversion at the API's edge: a Run as it is, a folder opened as a run."""
    return run if isinstance(run, Run) else Run.open(run)


def holds_run(what: str):
    """Decorator of an API function that writes a run given as its first argument (a Run or its folder): the
    run is opened (`as_run`) and held for writing (`Run.exclusive`) while the function runs."""
    def wrap(fn):
        @functools.wraps(fn)
        def held(run, *args, **kwargs):
            run = as_run(run)
            with run.exclusive(what):
                return fn(run, *args, **kwargs)
        return held
    return wrap
