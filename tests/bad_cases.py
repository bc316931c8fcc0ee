"""The bad-input table: every verb (and the web API) fed bad values, each expected to answer with
one clear line (CLI: `error: ...`, non-zero exit; API: a 4xx JSON `detail`) and to write nothing.

Shared by tests/test_bad_inputs.py (one test per case) and bench/reliability.py (which writes
bench/RELIABILITY.md from the same table). `build_world` makes the tiny runs, models, corpora and
odd files the cases point at; `run_cli_case` / `run_api_case` feed one case and report what came out.

A case's argv may name these placeholders, filled from the world:
    {run}       a complete tiny run (trained, evaluated, analysed, labelled; tiny Gemma, 3 SAEs, width 32)
    {bare}      the same SAEs without eval or analysis (no features.sqlite)
    {emptyrun}  a run manifest without any SAE            {gpt2run}  a run on tiny GPT-2 (128 positions)
    {model}     the tiny Gemma folder                     {gpt2}     the tiny GPT-2 folder (128 positions)
    {corpus}    a corpus folder                           {empty}    a corpus folder with only blank text
    {binary}    a corpus folder with only non-UTF-8 files {cache}    an activation cache (resid_post layer 0)
    {sae}       one SAE folder of {run}                   {dir}      an empty folder
    {file}      a text file                               {notrun}   a non-empty folder that is not a run
    {damaged}   a run folder whose manifest is not JSON   {missing}  a path that does not exist
    {badsae}    an SAE folder with broken files           {loop}     a symlink to itself
    {dirjsonl}  a folder named like a .jsonl file         {notext}   a .jsonl file without any text record
    {long}      a text longer than tiny GPT-2's context
    {busy}      a copy of {run} that another process is writing (it holds the run's lock all along)
    {busycache} a copy of {cache} that another process is writing
    {badorder}  a copy of {bare} whose manifest names an unknown corpus order ("sideways")
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SAE0 = "resid_post/layer_0_width_32_l0_4"


@dataclass(frozen=True)
class Case:
    """One bad input: `argv` for the CLI, or `api` = (method, path, json body) for the web app."""

    id: str
    expect: str  # regex the one line must match (search)
    argv: tuple[str, ...] = ()
    api: tuple | None = None
    status: int | None = None  # API: the expected 4xx status

    @property
    def command(self) -> str:
        if self.api:
            method, path, body = self.api
            return f"{method} {path}" + (f" {body}" if body is not None else "")
        return "saescope " + " ".join(a if a and " " not in a else repr(a) for a in self.argv)


@dataclass
class Outcome:
    code: int  # CLI exit code, or API status
    lines: list[str]  # every non-empty line shown (stdout, stderr, log records, warnings)
    written: list[str] = field(default_factory=list)  # files created, changed or removed

    @property
    def message(self) -> str:
        return " | ".join(self.lines)


def _c(id: str, expect: str, *argv) -> Case:
    return Case(id, expect, tuple(str(a) for a in argv))


def _api(id: str, status: int, expect: str, method: str, path: str, body=None) -> Case:
    return Case(id, expect, api=(method, path, body), status=status)


# ----------------------------------------------------------------------------------------- the table

BAD_INT = "not a valid integer|is not in the range|not a valid"
TRAIN = ("train", "--model", "{model}", "--corpus", "{corpus}", "--layers", "0", "--widths", "16", "--l0", "2",
         "--tokens", "200", "--out", "{tmpout}")
HARVEST = ("harvest", "--model", "{model}", "--corpus", "{corpus}", "--layers", "0", "--tokens", "100",
           "--ctx-len", "32", "--out", "{tmpout}")
RUN = ("run", "--model", "{model}", "--corpus", "{corpus}", "--layers", "0", "--widths", "16", "--l0", "2",
       "--tokens", "200", "--analyze-tokens", "100", "--no-serve", "--out", "{tmpout}")
STEER = ("steer", "{run}", "the king")


def _numeric(prefix: tuple, verb: str, option: str, values: dict[str, str]) -> list[Case]:
    """One case per bad value of a numeric option."""
    return [_c(f"{verb}-{option.strip('-')}-{name}", expect, *prefix, option, value)
            for name, (value, expect) in values.items()]


WHOLE = {"zero": ("0", r"0 is not in the range"), "negative": ("-5", r"-5 is not in the range"),
         "nan": ("nan", BAD_INT), "text": ("abc", BAD_INT), "empty": ("", BAD_INT), "float": ("2.5", BAD_INT)}
NON_NEG = {"negative": ("-1", r"-1 is not in the range"), "nan": ("nan", BAD_INT), "text": ("x", BAD_INT)}
FLOATS = {"nan": ("nan", "not a finite number"), "inf": ("inf", "not a finite number"),
          "negative": ("-1", r"not in the range|must be"), "text": ("fast", "not a valid float")}


CLI_CASES = [
    # -------------------------------------------------------------------- anywhere
    _c("cli-unknown-verb", r"No such command 'frobnicate'", "frobnicate"),
    _c("cli-unknown-option", r"No such option.*--bogus", "eval", "{run}", "--bogus"),
    _c("cli-missing-argument", r"Missing argument 'TEXT'", "inspect", "{run}"),
    _c("cli-extra-argument", r"unexpected extra argument", "eval", "{run}", "{run}"),
    # -------------------------------------------------------------------- sites
    _c("sites-missing-folder", r"model '.*missing' not found|not found", "sites", "{missing}"),
    _c("sites-missing-gguf", r"GGUF file not found", "sites", "{missing}.gguf"),
    _c("sites-file-as-model", r"is not a model folder", "sites", "{file}"),
    _c("sites-empty-folder", r"is not a model folder", "sites", "{dir}"),
    _c("sites-empty-name", r"no model given", "sites", ""),
    _c("sites-unknown-hub-id", r"cannot load model 'no-such-org/no-such-model'", "sites",
       "no-such-org/no-such-model"),
    _c("sites-damaged-config", r"cannot load model", "sites", "{badmodel}"),
    _c("sites-damaged-tokenizer", r"cannot load model .*its tokenizer cannot be read", "sites", "{badtok}"),
    _c("sites-run-as-model", r"is not a model folder", "sites", "{run}"),
    # -------------------------------------------------------------------- harvest
    _c("harvest-layers-reversed", r"layer range '2-0' is empty", *HARVEST, "--layers", "2-0"),
    _c("harvest-layer-missing", r"layer 7 does not exist", *HARVEST, "--layers", "7"),
    _c("harvest-layer-negative", r"cannot read layers '-1'", *HARVEST, "--layers", "-1"),
    _c("harvest-layers-text", r"cannot read layers 'x'", *HARVEST, "--layers", "x"),
    _c("harvest-layers-empty", r"no layers given", *HARVEST, "--layers", ""),
    _c("harvest-site-unknown", r"unknown site 'resid_mid'", *HARVEST, "--sites", "resid_mid"),
    _c("harvest-sites-empty", r"no sites given", *HARVEST, "--sites", ""),
    _c("harvest-corpus-missing", r"corpus source '.*' not found", *HARVEST, "--corpus", "{missing}"),
    _c("harvest-corpus-empty", r"has no documents", *HARVEST, "--corpus", "{empty}"),
    _c("harvest-corpus-not-utf8", r"has no documents.*skipped", *HARVEST, "--corpus", "{binary}"),
    _c("harvest-corpus-wrong-type", r"unsupported type", *HARVEST, "--corpus", "{model}/model.safetensors"),
    _c("harvest-model-missing", r"not found", *HARVEST, "--model", "{missing}"),
    _c("harvest-ctx-len-past-model", r"--ctx-len 256 is longer than the model's context of 128", *HARVEST,
       "--model", "{gpt2}", "--ctx-len", "256"),
    _c("harvest-ctx-len-one", r"1 is not in the range", *HARVEST, "--ctx-len", "1"),
    _c("harvest-dtype-unknown", r"'bfloat8' is not one of", *HARVEST, "--dtype", "bfloat8"),
    _c("harvest-part-unknown", r"'test' is not one of", *HARVEST, "--part", "test"),
    _c("harvest-out-is-file", r"is a file, not a cache folder", *HARVEST, "--out", "{file}"),
    _c("harvest-out-is-run", r"is not a saescope activation cache manifest", *HARVEST, "--out", "{run}"),
    # -------------------------------------------------------------------- train
    _c("train-layers-reversed", r"layer range '2-0' is empty", *TRAIN, "--layers", "2-0"),
    _c("train-layer-missing", r"layer 5 does not exist", *TRAIN, "--layers", "5"),
    _c("train-layers-empty", r"no layers given", *TRAIN, "--layers", ""),
    _c("train-layers-garbage", r"cannot read layers", *TRAIN, "--layers", "0-"),
    _c("train-widths-zero", r"width must be at least 1", *TRAIN, "--widths", "0"),
    _c("train-widths-negative", r"width must be at least 1", *TRAIN, "--widths", "-4"),
    _c("train-widths-text", r"expected comma-separated numbers", *TRAIN, "--widths", "wide"),
    _c("train-widths-empty", r"expected comma-separated finite numbers", *TRAIN, "--widths", ""),
    _c("train-widths-float", r"expected comma-separated numbers", *TRAIN, "--widths", "1e3"),
    _c("train-l0-zero", r"target L0.* must be (between|above 0)", *TRAIN, "--l0", "0"),
    _c("train-l0-negative", r"target L0.* must be (between|above 0)", *TRAIN, "--l0", "-1"),
    _c("train-l0-nan", r"finite numbers", *TRAIN, "--l0", "nan"),
    _c("train-l0-inf", r"finite numbers", *TRAIN, "--l0", "inf"),
    _c("train-l0-at-width", r"target L0.* must be (between|above 0)", *TRAIN, "--l0", "16"),
    _c("train-l0-empty", r"finite numbers", *TRAIN, "--l0", ","),
    _c("train-batch-size-one", r"--batch-size must be at least 2", *TRAIN, "--batch-size", "1"),
    _c("train-ctx-len-past-model", r"--ctx-len 256 is longer than the model's context of 128", *TRAIN,
       "--model", "{gpt2}"),
    _c("train-ctx-len-huge", r"longer than the model's context", *TRAIN, "--ctx-len", "100000000"),
    _c("train-ctx-len-one", r"1 is not in the range", *TRAIN, "--ctx-len", "1"),
    _c("train-arch-unknown", r"'gated' is not one of", *TRAIN, "--arch", "gated"),
    _c("train-optimizer-unknown", r"'sgd' is not one of", *TRAIN, "--optimizer", "sgd"),
    _c("train-parallel-unknown", r"'ring' is not one of", *TRAIN, "--parallel", "ring"),
    _c("train-checkpoint-every-zero", r"0 is not in the range", *TRAIN, "--checkpoint-every", "0"),
    _c("train-site-unknown", r"unknown site 'attn'", *TRAIN, "--sites", "attn"),
    _c("train-corpus-empty", r"has no documents", *TRAIN, "--corpus", "{empty}"),
    _c("train-corpus-not-utf8", r"has no documents", *TRAIN, "--corpus", "{binary}"),
    _c("train-corpus-missing", r"not found", *TRAIN, "--corpus", "{missing}"),
    _c("train-corpus-hf-bad", r"hf:|dataset|datasets", *TRAIN, "--corpus", "hf:"),
    _c("train-model-missing", r"not found", *TRAIN, "--model", "{missing}"),
    _c("train-model-empty-folder", r"is not a model folder", *TRAIN, "--model", "{dir}"),
    _c("train-cache-missing", r"does not exist", *TRAIN, "--cache", "{missing}"),
    _c("train-cache-not-cache", r"not an activation cache", *TRAIN, "--cache", "{dir}"),
    _c("train-cache-is-file", r"activation cache|not a folder|no activation cache", *TRAIN, "--cache", "{file}"),
    _c("train-cache-lacks-site", r"has no activations for resid_post/1", *TRAIN, "--cache", "{cache}",
       "--layers", "1"),
    _c("train-out-is-file", r"is a file, not a run folder", *TRAIN, "--out", "{file}"),
    _c("train-out-not-run", r"is not empty and holds no saescope run", *TRAIN, "--out", "{notrun}"),
    _c("train-out-other-run", r"holds another run", *TRAIN, "--out", "{run}"),
    _c("train-out-damaged-run", r"manifest|JSON|damaged", *TRAIN, "--out", "{damaged}"),
    # -------------------------------------------------------------------- eval
    _c("eval-run-missing", r"run not found", "eval", "{missing}"),
    _c("eval-run-is-file", r"run not found", "eval", "{file}"),
    _c("eval-not-a-run", r"is not a saescope run", "eval", "{notrun}"),
    _c("eval-damaged-manifest", r"run manifest|JSON|damaged", "eval", "{damaged}"),
    _c("eval-unknown-corpus-order", r"names an unknown corpus order 'sideways': set it to", "eval", "{badorder}"),
    _c("analyze-unknown-corpus-order", r"names an unknown corpus order 'sideways'", "analyze", "{badorder}"),
    _c("run-unknown-corpus-order", r"names an unknown corpus order 'sideways'", "run", "--out", "{badorder}",
       "--model", "{model}", "--no-serve"),
    _c("eval-run-without-saes", r"has no SAEs yet", "eval", "{emptyrun}"),
    # -------------------------------------------------------------------- analyze
    _c("analyze-run-missing", r"run not found", "analyze", "{missing}"),
    _c("analyze-sae-unknown", r"no SAE '9'", "analyze", "{run}", "--sae", "9"),
    _c("analyze-sae-empty", r"no SAE ''", "analyze", "{run}", "--sae", ""),
    _c("analyze-sae-other-site", r"no SAE 'attn_out/0'", "analyze", "{run}", "--sae", "attn_out/0"),
    _c("analyze-run-without-saes", r"has no SAEs yet", "analyze", "{emptyrun}"),
    _c("analyze-not-a-run", r"is not a saescope run", "analyze", "{notrun}"),
    # -------------------------------------------------------------------- inspect
    _c("inspect-run-missing", r"run not found", "inspect", "{missing}", "the king"),
    _c("inspect-text-empty", r"tokenises to nothing", "inspect", "{run}", ""),
    _c("inspect-text-blank", r"tokenises to nothing", "inspect", "{run}", "   "),
    _c("inspect-text-unknown-words", r"tokenises to nothing", "inspect", "{run}", "zzz qqq"),
    _c("inspect-past-context", r"has 2\d\d tokens, more than the model's context of 128", "inspect",
       "{gpt2run}", "{long}"),
    _c("inspect-top-zero", r"0 is not in the range", "inspect", "{run}", "the king", "--top", "0"),
    _c("inspect-top-huge", r"101 is not in the range", "inspect", "{run}", "the king", "--top", "101"),
    _c("inspect-top-text", BAD_INT, "inspect", "{run}", "the king", "--top", "many"),
    _c("inspect-sae-unknown", r"no SAE '9'", "inspect", "{run}", "the king", "--sae", "9"),
    _c("inspect-run-without-saes", r"has no SAEs", "inspect", "{emptyrun}", "the king"),
    # -------------------------------------------------------------------- feature
    _c("feature-index-negative", r"feature -1 is out of range .* use 0\.\.31", "feature", "{run}", "0", "-1"),
    _c("feature-index-past-width", r"feature 32 is out of range", "feature", "{run}", "0", "32"),
    _c("feature-index-huge", r"out of range", "feature", "{run}", "0", str(2**70)),
    _c("feature-index-text", BAD_INT, "feature", "{run}", "0", "abc"),
    _c("feature-index-float", BAD_INT, "feature", "{run}", "0", "1.5"),
    _c("feature-sae-unknown", r"no SAE '9'", "feature", "{run}", "9", "0"),
    _c("feature-sae-empty", r"no SAE ''", "feature", "{run}", "", "0"),
    _c("feature-not-analysed", r"has not been analysed", "feature", "{bare}", "0", "0"),
    _c("feature-run-missing", r"run not found", "feature", "{missing}", "0", "0"),
    _c("feature-examples-negative", r"-1 is not in the range", "feature", "{run}", "0", "0", "--examples", "-1"),
    # -------------------------------------------------------------------- label set / auto
    _c("label-set-sae-unknown", r"no SAE '9' in the run's feature database .*saescope analyze", "label", "set",
       "{run}", "9", "1", "x"),
    _c("label-set-index-negative", r"feature -1 is out of range", "label", "set", "{run}", "0", "-1", "x"),
    _c("label-set-index-past-width", r"feature 32 is out of range", "label", "set", "{run}", "0", "32", "x"),
    _c("label-set-index-text", BAD_INT, "label", "set", "{run}", "0", "one", "x"),
    _c("label-set-text-empty", r"empty label", "label", "set", "{run}", "0", "1", ""),
    _c("label-set-text-blank", r"empty label", "label", "set", "{run}", "0", "1", "   "),
    _c("label-set-not-analysed", r"has not been analysed yet", "label", "set", "{bare}", "0", "1", "x"),
    _c("label-set-run-missing", r"run not found", "label", "set", "{missing}", "0", "1", "x"),
    _c("label-set-missing-text", r"Missing argument 'TEXT'", "label", "set", "{run}", "0", "1"),
    _c("label-auto-run-missing", r"run not found", "label", "auto", "{missing}"),
    _c("label-auto-llm-without-model", r"--llm needs --model", "label", "auto", "{run}", "--llm",
       "http://127.0.0.1:9"),
    _c("label-auto-sae-unknown", r"no SAE '9'", "label", "auto", "{run}", "--sae", "9"),
    _c("label-auto-not-analysed", r"has not been analysed", "label", "auto", "{bare}"),
    _c("label-auto-run-without-saes", r"has no SAEs yet", "label", "auto", "{emptyrun}"),
    _c("label-auto-unknown-verb", r"No such command 'delete'", "label", "delete", "{run}"),
    # -------------------------------------------------------------------- search
    _c("search-query-empty", r"empty search query", "search", "{run}", ""),
    _c("search-query-blank", r"empty search query", "search", "{run}", "   "),
    _c("search-mode-unknown", r"'regex' is not one of", "search", "{run}", "city", "--mode", "regex"),
    _c("search-run-missing", r"run not found", "search", "{missing}", "city"),
    _c("search-not-analysed", r"no feature database", "search", "{bare}", "city"),
    _c("search-not-a-run", r"is not a saescope run", "search", "{notrun}", "city"),
    # -------------------------------------------------------------------- steer
    _c("steer-strength-huge", r"strength 1e\+30, beyond ±1000", *STEER, "--feature", "1:10=1e30"),
    _c("steer-strength-nan", r"finite number", *STEER, "--feature", "1:10=nan"),
    _c("steer-strength-inf", r"finite number", *STEER, "--feature", "1:10=-inf"),
    _c("steer-strength-text", r"'big' in '1:10=big' is not a number", *STEER, "--feature", "1:10=big"),
    _c("steer-clamp-huge", r"beyond ±100000", *STEER, "--feature", "1:10@clamp=1e9"),
    _c("steer-index-negative", r"feature index -1 .* is negative", *STEER, "--feature", "1:-1=2"),
    _c("steer-index-past-width", r"feature index 32 is out of range", *STEER, "--feature", "1:32=2"),
    _c("steer-sae-unknown", r"no SAE '9'", *STEER, "--feature", "9:0=2"),
    _c("steer-spec-garbage", r"cannot read feature 'garbage'", *STEER, "--feature", "garbage"),
    _c("steer-spec-no-value", r"has no strength", *STEER, "--feature", "1:0"),
    _c("steer-spec-mode-unknown", r"unknown mode '@boost'", *STEER, "--feature", "1:0@boost=2"),
    _c("steer-ablate-with-value", r"@ablate takes no value", *STEER, "--feature", "1:0@ablate=2"),
    _c("steer-nothing", r"nothing to steer", *STEER),
    _c("steer-concept-nonsense", r"no feature writes .xylophone quasar.", *STEER, "--concept",
       "xylophone quasar"),
    _c("steer-concept-strength-huge", r"beyond ±1000", *STEER, "--concept", "city", "--strength", "1e30"),
    _c("steer-concept-strength-nan", r"not a finite number", *STEER, "--concept", "city", "--strength", "nan"),
    _c("steer-concept-not-analysed", r"no feature database", "steer", "{bare}", "the king", "--concept",
       "city"),
    _c("steer-prompt-empty", r"the prompt is empty", "steer", "{run}", "", "--feature", "1:0=2"),
    _c("steer-prompt-blank", r"the prompt is empty", "steer", "{run}", "  ", "--feature", "1:0=2"),
    _c("steer-max-new-tokens-past-context", r"passes the model's context of 128", "steer", "{gpt2run}",
       "the king", "--feature", "0:0=2", "--max-new-tokens", "200"),
    _c("steer-prompt-past-context", r"the prompt has 2\d\d tokens", "steer", "{gpt2run}", "{long}",
       "--feature", "0:0=2"),
    _c("steer-sweep-without-feature", r"--sweep needs a --feature", *STEER, "--sweep", "1,2"),
    _c("steer-sweep-text", r"expected comma-separated numbers", *STEER, "--feature", "1:0=1", "--sweep", "a,b"),
    _c("steer-sweep-nan", r"finite numbers", *STEER, "--feature", "1:0=1", "--sweep", "1,nan"),
    _c("steer-sweep-huge", r"beyond ±1000", *STEER, "--feature", "1:0=1", "--sweep", "1,1e6"),
    _c("steer-sweep-ablate", r"is an ablation", *STEER, "--feature", "1:0@ablate", "--sweep", "1,2"),
    _c("steer-run-missing", r"run not found", "steer", "{missing}", "the king", "--feature", "1:0=2"),
    _c("steer-run-without-saes", r"has no SAEs yet", "steer", "{emptyrun}", "the king", "--feature", "0:0=2"),
    # -------------------------------------------------------------------- import / export
    _c("import-path-missing", r"does not exist", "import", "{missing}", "--run", "{run}"),
    _c("import-run-missing", r"run not found", "import", "{sae}", "--run", "{missing}"),
    _c("import-empty-folder", r"SAE|safetensors|config", "import", "{dir}", "--run", "{run}"),
    _c("import-text-file", r"SAE|safetensors|config|format", "import", "{file}", "--run", "{run}"),
    _c("import-run-folder", r"SAE|safetensors|config|format", "import", "{run}", "--run", "{run}"),
    _c("import-name-clash", r"already exists", "import", "{sae}", "--run", "{run}"),
    _c("import-into-non-run", r"is not a saescope run", "import", "{sae}", "--run", "{notrun}"),
    _c("import-without-run", r"Missing option '--run'", "import", "{sae}"),
    _c("export-run-missing", r"run not found", "export", "{missing}", "--format", "saelens", "{tmpout}"),
    _c("export-format-unknown", r"'onnx' is not one of", "export", "{run}", "--format", "onnx", "{tmpout}"),
    _c("export-format-missing", r"Missing option '--format'", "export", "{run}", "{tmpout}"),
    _c("export-out-is-file", r"is a file, not a folder", "export", "{run}", "--format", "saelens", "{file}"),
    _c("export-run-without-saes", r"has no SAEs", "export", "{emptyrun}", "--format", "saelens", "{tmpout}"),
    # -------------------------------------------------------------------- serve
    _c("serve-run-missing", r"run not found", "serve", "{missing}"),
    _c("serve-not-a-run", r"is not a saescope run", "serve", "{notrun}"),
    _c("serve-open-host-without-token", r"exposes the run and the model to the network", "serve", "{run}",
       "--host", "0.0.0.0"),
    _c("serve-port-zero", r"0 is not in the range 1<=x<=65535", "serve", "{run}", "--port", "0"),
    _c("serve-port-huge", r"70000 is not in the range", "serve", "{run}", "--port", "70000"),
    _c("serve-port-text", BAD_INT, "serve", "{run}", "--port", "http"),
    # -------------------------------------------------------------------- run (the whole pipeline)
    _c("run-layers-reversed", r"layer range '2-0' is empty", *RUN, "--layers", "2-0"),
    _c("run-ctx-len-past-model", r"--ctx-len 256 is longer than the model's context of 128", *RUN, "--model",
       "{gpt2}"),
    _c("run-widths-zero", r"width must be at least 1", *RUN, "--widths", "0"),
    _c("run-l0-nan", r"finite numbers", *RUN, "--l0", "nan"),
    _c("run-model-missing", r"not found", *RUN, "--model", "{missing}"),
    _c("run-corpus-empty", r"has no documents", *RUN, "--corpus", "{empty}"),
    _c("run-llm-without-model", r"--llm needs --llm-model", *RUN, "--llm", "http://127.0.0.1:9"),
    _c("run-out-is-file", r"is a file, not a run folder", *RUN, "--out", "{file}"),
    _c("run-out-other-run", r"holds another run", *RUN, "--out", "{run}"),
    _c("run-port-zero", r"0 is not in the range", *RUN, "--port", "0"),
    # -------------------------------------------------------------------- damaged or odd files, any verb
    _c("inspect-damaged-run", r"run manifest|JSON|damaged", "inspect", "{damaged}", "the king"),
    _c("feature-damaged-run", r"run manifest|JSON|damaged", "feature", "{damaged}", "0", "0"),
    _c("search-damaged-run", r"run manifest|JSON|damaged", "search", "{damaged}", "city"),
    _c("steer-damaged-run", r"run manifest|JSON|damaged", "steer", "{damaged}", "the king", "--feature", "0:0=1"),
    _c("label-set-damaged-run", r"run manifest|JSON|damaged", "label", "set", "{damaged}", "0", "0", "x"),
    _c("label-auto-damaged-run", r"run manifest|JSON|damaged", "label", "auto", "{damaged}"),
    _c("analyze-damaged-run", r"run manifest|JSON|damaged", "analyze", "{damaged}"),
    _c("export-damaged-run", r"run manifest|JSON|damaged", "export", "{damaged}", "--format", "saelens",
       "{tmpout}"),
    _c("serve-damaged-run", r"run manifest|JSON|damaged", "serve", "{damaged}"),
    _c("import-into-damaged-run", r"run manifest|JSON|damaged", "import", "{sae}", "--run", "{damaged}"),
    _c("import-damaged-sae", r"config|JSON|safetensors|SAE", "import", "{badsae}", "--run", "{run}"),
    _c("sites-model-symlink-loop", r"not found", "sites", "{loop}"),
    _c("train-corpus-symlink-loop", r"not found", *TRAIN, "--corpus", "{loop}"),
    _c("eval-run-symlink-loop", r"run not found", "eval", "{loop}"),
    _c("train-corpus-folder-named-jsonl", r"has no documents", *TRAIN, "--corpus", "{dirjsonl}"),
    _c("train-corpus-jsonl-without-text", r"has no documents", *TRAIN, "--corpus", "{notext}"),
    _c("steer-sweep-png-is-folder", r"is a folder: give the plot a file name", *STEER, "--feature", "1:0=1",
       "--sweep", "1,2", "--png", "{dir}"),
    _c("steer-clamp-nan", r"finite number", *STEER, "--feature", "1:0@clamp=nan"),
    _c("steer-strength-empty", r"has no strength|cannot read feature", *STEER, "--feature", "1:0="),
    _c("steer-feature-empty", r"cannot read feature ''", *STEER, "--feature", ""),
    # -------------------------------------------------------------------- another process is writing it
    _c("busy-run-analyze", r"run .*busy is busy: saescope label \(pid \d+, since .*\) is writing it; wait for it",
       "analyze", "{busy}", "--force"),
    _c("busy-run-label-auto", r"run .*busy is busy: saescope label \(pid", "label", "auto", "{busy}"),
    _c("busy-run-eval", r"run .*busy is busy: saescope label \(pid", "eval", "{busy}", "--tokens", "64"),
    _c("busy-run-import", r"run .*busy is busy: saescope label \(pid", "import", "{sae}", "--run", "{busy}",
       "--name", "copy"),
    _c("busy-cache-harvest", r"cache .*busycache is busy: saescope harvest \(pid", "harvest", "--model", "{model}",
       "--corpus", "{corpus}", "--layers", "0", "--tokens", "200", "--ctx-len", "32", "--out", "{busycache}"),
]


def numeric_cases() -> list[Case]:
    """Every numeric option of every verb × its bad values."""
    cases = []
    # numeric options × bad values
    cases += _numeric(HARVEST, "harvest", "--tokens", WHOLE)
    cases += _numeric(HARVEST, "harvest", "--batch-size", {k: WHOLE[k] for k in ("zero", "negative", "nan")})
    cases += _numeric(TRAIN, "train", "--tokens", WHOLE)
    cases += _numeric(TRAIN, "train", "--lr", {**FLOATS, "huge-negative": ("-1e308", r"not in the range")})
    cases += _numeric(TRAIN, "train", "--seed", NON_NEG)
    cases += _numeric(TRAIN, "train", "--batch-size", NON_NEG)
    cases += _numeric(TRAIN, "train", "--harvest-batch", {k: WHOLE[k] for k in ("zero", "negative", "nan")})
    cases += _numeric(("eval", "{run}"), "eval", "--tokens", WHOLE)
    cases += _numeric(("eval", "{run}"), "eval", "--ce-tokens", NON_NEG)
    cases += _numeric(("analyze", "{run}"), "analyze", "--tokens", WHOLE)
    cases += _numeric(("analyze", "{run}"), "analyze", "--top-k", {k: WHOLE[k] for k in ("zero", "negative", "nan")})
    cases += _numeric(("analyze", "{run}"), "analyze", "--logits", NON_NEG)
    cases += _numeric(("label", "auto", "{run}"), "label-auto", "--limit", {k: WHOLE[k] for k in ("zero", "negative")})
    cases += _numeric(("label", "auto", "{run}"), "label-auto", "--concurrency", {k: WHOLE[k] for k in ("zero", "nan")})
    cases += _numeric(("label", "auto", "{run}"), "label-auto", "--timeout",
                      {**{k: FLOATS[k] for k in ("nan", "inf", "negative")}, "zero": ("0", "not in the range")})
    cases += _numeric(("search", "{run}", "city"), "search", "--limit", {k: WHOLE[k] for k in ("zero", "negative", "text")})
    cases += _numeric((*STEER, "--feature", "1:0=1"), "steer", "--max-new-tokens",
                      {k: WHOLE[k] for k in ("zero", "negative", "text")})
    cases += _numeric((*STEER, "--feature", "1:0=1"), "steer", "--seed", NON_NEG)
    cases += _numeric(RUN, "run", "--tokens", {k: WHOLE[k] for k in ("zero", "negative", "nan")})
    cases += _numeric(RUN, "run", "--analyze-tokens", {k: WHOLE[k] for k in ("zero", "negative")})
    cases += _numeric(RUN, "run", "--ctx-len", {k: WHOLE[k] for k in ("zero", "negative")})
    return cases


def api_cases() -> list[Case]:
    f0 = f"/api/feature/{SAE0}"
    return [
        _api("api-steer-strength-huge", 400, r"beyond ±1000", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:10=1e30"]}),
        _api("api-steer-strength-nan", 400, r"finite number", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:10=nan"]}),
        _api("api-steer-clamp-huge", 400, r"beyond ±100000", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:10@clamp=1e12"]}),
        _api("api-steer-form-strength-huge", 422, r"strength", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:10"], "strength": 1e30}),
        _api("api-steer-index-past-width", 400, r"out of range", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:99=1"]}),
        _api("api-steer-sae-unknown", 400, r"no SAE '9'", "POST", "/api/steer",
             {"prompt": "the king", "features": ["9:0=1"]}),
        _api("api-steer-spec-garbage", 400, r"cannot read feature", "POST", "/api/steer",
             {"prompt": "the king", "features": ["garbage"]}),
        _api("api-steer-nothing", 400, r"nothing to steer", "POST", "/api/steer", {"prompt": "the king"}),
        _api("api-steer-concept-nonsense", 400, r"no feature writes", "POST", "/api/steer",
             {"prompt": "the king", "concept": "xylophone quasar"}),
        _api("api-steer-prompt-empty", 422, r"prompt", "POST", "/api/steer", {"prompt": "", "features": ["1:0=1"]}),
        _api("api-steer-max-new-tokens-zero", 422, r"max_new_tokens", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:0=1"], "max_new_tokens": 0}),
        _api("api-steer-unknown-field", 422, r"extra|not permitted|forbidden", "POST", "/api/steer",
             {"prompt": "the king", "features": ["1:0=1"], "power": 9}),
        _api("api-inspect-empty", 422, r"text", "POST", "/api/inspect", {"text": ""}),
        _api("api-inspect-blank", 400, r"the text is empty", "POST", "/api/inspect", {"text": "   "}),
        _api("api-inspect-unknown-words", 400, r"tokenises to nothing", "POST", "/api/inspect", {"text": "zzz"}),
        _api("api-inspect-top-zero", 422, r"top", "POST", "/api/inspect", {"text": "the king", "top": 0}),
        _api("api-inspect-not-json", 422, r"valid|JSON|object|dict", "POST", "/api/inspect", "[1, 2]"),
        _api("api-feature-sae-unknown", 404, r"no SAE '9'", "GET", "/api/feature/9/0"),
        _api("api-feature-index-past-width", 404, r"out of range", "GET", f"{f0}/32"),
        _api("api-feature-index-negative", 404, r"out of range", "GET", f"{f0}/-1"),
        _api("api-feature-index-text", 422, r"idx|integer", "GET", f"{f0}/abc"),
        _api("api-label-empty", 422, r"text", "POST", f"{f0}/1/label", {"text": ""}),
        _api("api-label-blank", 400, r"empty label", "POST", f"{f0}/1/label", {"text": "   "}),
        _api("api-label-index-past-width", 404, r"out of range", "POST", f"{f0}/99/label", {"text": "x"}),
        _api("api-label-too-long", 422, r"text", "POST", f"{f0}/1/label", {"text": "x" * 501}),
        _api("api-search-empty", 400, r"empty search query", "GET", "/api/search?q="),
        _api("api-search-limit-zero", 422, r"limit", "GET", "/api/search?q=city&limit=0"),
        _api("api-search-mode-unknown", 422, r"mode", "GET", "/api/search?q=city&mode=regex"),
        _api("api-top-sae-unknown", 404, r"no SAE '9'", "GET", "/api/top/9"),
        _api("api-top-order-unknown", 422, r"order_by", "GET", f"/api/top/{SAE0}?order_by=label"),
        _api("api-top-limit-zero", 422, r"limit", "GET", f"/api/top/{SAE0}?limit=0"),
    ]


CASES = CLI_CASES + numeric_cases() + api_cases()


# ----------------------------------------------------------------------------------------- the world


def build_world(base: Path, model_dir: Path, gpt2_dir: Path) -> dict[str, str]:
    """Every run, model, corpus and odd file the cases name (see the module docstring)."""
    from atlas_run import build_run, write_corpus

    from saescope.pipeline import harvest_to_cache, train_run
    from saescope.runs import Run
    from saescope.train import TrainConfig

    base = Path(base)
    run = build_run(base / "atlas", model_dir)
    corpus = base / "atlas" / "corpus"
    w = {"run": run, "model": Path(model_dir), "gpt2": Path(gpt2_dir), "corpus": corpus,
         "sae": run / "saes" / SAE0, "missing": base / "missing", "dir": base / "emptydir",
         "file": base / "file.txt", "notrun": base / "notrun", "damaged": base / "damaged",
         "empty": base / "blank-corpus", "binary": base / "binary-corpus", "badmodel": base / "badmodel",
         "badtok": base / "badtok",
         "bare": base / "bare", "emptyrun": base / "emptyrun", "gpt2run": base / "gpt2run", "cache": base / "cache",
         "badsae": base / "badsae", "loop": base / "loop", "dirjsonl": base / "docs.jsonl",
         "notext": base / "notext.jsonl"}
    for key in ("dir", "notrun", "damaged", "empty", "binary", "badmodel", "badsae", "dirjsonl"):
        w[key].mkdir()
    (w["badsae"] / "config.json").write_text("{broken")
    (w["badsae"] / "params.safetensors").write_bytes(b"\x00" * 64)
    w["loop"].symlink_to(w["loop"])
    w["notext"].write_text('{"title": "no text field"}\n[1, 2]\n')
    w["file"].write_text("the king of france\n")
    (w["notrun"] / "notes.txt").write_text("mine\n")
    (w["damaged"] / "manifest.json").write_text("{not json")
    (w["empty"] / "a.txt").write_text("   \n\n")
    (w["binary"] / "a.txt").write_bytes(b"\xff\xfe\xfa" * 50)
    (w["badmodel"] / "config.json").write_text("{broken")
    shutil.copytree(model_dir, w["badtok"])
    (w["badtok"] / "tokenizer.json").write_text("{broken")
    w["bare"].mkdir()
    shutil.copy(run / "manifest.json", w["bare"] / "manifest.json")
    shutil.copytree(run / "saes", w["bare"] / "saes")
    Run.create(w["emptyrun"], model=str(model_dir), corpus={"source": str(corpus)}, config={})
    train_run(w["gpt2run"], model=str(gpt2_dir), corpus=str(write_corpus(base / "gpt2-corpus", n_docs=60)),
              layers="0", widths=(16,), l0s=(2,), train=TrainConfig(tokens=300, batch_size=64), ctx_len=32,
              progress=False)
    harvest_to_cache(w["cache"], model=str(model_dir), corpus=str(corpus), layers="0", tokens=200, ctx_len=32,
                     progress=False)
    w["badorder"] = base / "badorder"
    shutil.copytree(w["bare"], w["badorder"])
    manifest = json.loads((w["badorder"] / "manifest.json").read_text())
    manifest["corpus"]["order"] = "sideways"
    (w["badorder"] / "manifest.json").write_text(json.dumps(manifest))
    w["busy"], w["busycache"] = base / "busy", base / "busycache"
    shutil.copytree(run, w["busy"])
    shutil.copytree(w["cache"], w["busycache"])
    _hold(w["busy"], "label", w["busycache"], "harvest")
    out = {k: str(v) for k, v in w.items()}
    out["long"] = " ".join(["the king of france"] * 55)
    return out


TRANSIENT = ("-wal", "-shm", "-journal", "label_embeddings.npz", "concept_index.npz", ".lock")  # side files, caches
"""Not counted as written: SQLite's own side files (made and removed by any connection), the cache of label
embeddings that any search may build, and the run's lock file (`Run.exclusive`: made by any verb that would write,
empty of data); a folder's mtime changes with them, so folders count only by name."""


def _hold(*folders_and_verbs) -> None:
    """Another process holding each folder (a run, a cache) for writing as `saescope VERB` would, until this
    process ends (it waits on its stdin, which closes then)."""
    pairs = list(zip(folders_and_verbs[::2], folders_and_verbs[1::2]))
    code = ("import sys, contextlib\nfrom saescope.fsio import exclusive\nwith contextlib.ExitStack() as s:\n"
            + "".join(f"    s.enter_context(exclusive({str(f)!r}, {v!r}))\n" for f, v in pairs)
            + "    print('held', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "held":
        raise RuntimeError("the process that should hold the busy run did not start")
    _HOLDERS.append(holder)  # (kept referenced: its stdin must stay open)


_HOLDERS: list = []


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """path → (size, mtime_ns) of every file under `folders` ((0, 0) for a folder)."""
    seen = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            seen.update((os.path.join(dirpath, d), (0, 0)) for d in dirnames)
            for name in filenames:
                if not name.endswith(TRANSIENT):
                    st = os.lstat(os.path.join(dirpath, name))
                    seen[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return seen


def changes(before: dict, after: dict) -> list[str]:
    out = [f"+{p}" for p in after.keys() - before.keys()] + [f"-{p}" for p in before.keys() - after.keys()]
    out += [f"~{p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(out)


def fill(argv: tuple[str, ...], world: dict[str, str], tmpout: Path) -> list[str]:
    return [a.format(**world, tmpout=tmpout) for a in argv]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_cli_case(case: Case, world: dict[str, str], workdir: Path) -> Outcome:
    """Run the case's argv in-process (saescope.cli.main) in `workdir`; collect every line shown."""
    from saescope.cli import main

    workdir.mkdir(parents=True, exist_ok=True)
    argv = fill(case.argv, world, workdir / "out")
    out, err = io.StringIO(), io.StringIO()
    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    before = snapshot(Path(world["run"]).parent.parent, workdir)
    cwd = os.getcwd()
    code = 0
    try:
        os.chdir(workdir)
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(cwd)
        root.removeHandler(records)
    shown = out.getvalue().splitlines() + err.getvalue().replace("\r", "\n").splitlines()
    shown = [s for s in shown if s.strip()] + records.lines + [str(w.message) for w in caught]
    return Outcome(code, shown, changes(before, snapshot(Path(world["run"]).parent.parent, workdir)))


def run_api_case(case: Case, client, world: dict[str, str]) -> Outcome:
    """Send the case's request through a TestClient of the app over {run}."""
    method, path, body = case.api
    before = snapshot(Path(world["run"]))
    if isinstance(body, str):
        resp = client.request(method, path, content=body.encode(), headers={"Content-Type": "application/json"})
    else:
        resp = client.request(method, path, json=body)
    detail = resp.json().get("detail") if resp.headers.get("content-type", "").startswith("application/json") else ""
    lines = [" ".join(str(detail).split())] if detail else []
    return Outcome(resp.status_code, lines, changes(before, snapshot(Path(world["run"]))))


def problems(case: Case, got: Outcome) -> list[str]:
    """What is wrong with how the case was answered (empty: answered well)."""
    bad = []
    if case.api:
        if got.code != case.status:
            bad.append(f"status {got.code}, expected {case.status}")
    elif got.code == 0:
        bad.append("exit code 0")
    if len(got.lines) != 1:
        bad.append(f"{len(got.lines)} lines shown")
    text = "\n".join(got.lines)
    if "Traceback" in text:
        bad.append("a traceback")
    if not case.api and got.lines and not got.lines[0].startswith("error: "):
        bad.append("the line does not start with 'error: '")
    if not re.search(case.expect, text):
        bad.append(f"message does not match /{case.expect}/")
    if got.written:
        bad.append(f"wrote {', '.join(got.written[:3])}")
    return bad
