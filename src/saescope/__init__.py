"""saescope: sparse autoencoders on every layer of a language model.

The Python API mirrors the command line:

    saescope.load_model(spec)            a causal LM with its hook sites
    saescope.load_sae(folder)            an SAE folder (ours, Gemma Scope 1/2, SAELens, sparsify)
    saescope.train_run(out, ...)         `saescope train`
    saescope.evaluate(run)               `saescope eval`
    saescope.Scope.open(run_dir)         inspect text, read features, labels
"""

from .errors import SaescopeError
from .formats import load_sae
from .models import load_model
from .sae import SAE, SAEConfig
from .version import __version__  # noqa: F401  (saescope.__version__)


def __getattr__(name):  # heavier entry points load on first use
    if name == "train_run":
        from .pipeline import train_run

        return train_run
    if name == "run_all":
        from .pipeline import run_all

        return run_all
    if name == "evaluate":
        from .evaluate import evaluate

        return evaluate
    if name == "Scope":
        from .scope import Scope

        return Scope
    raise AttributeError(f"module 'saescope' has no attribute {name!r}")


__all__ = ["SAE", "SAEConfig", "SaescopeError", "Scope", "evaluate", "load_model", "load_sae", "run_all", "train_run"]
