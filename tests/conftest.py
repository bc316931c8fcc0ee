"""Shared fixtures: tiny randomly initialised HF models (fast, CPU) and isolated folders."""

from __future__ import annotations

import sqlite3

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's real home: saescope writes runs under a temp folder.

    The model cache ($SAESCOPE_CACHE) is left alone on purpose: the converted default
    model is shared between test runs, like a real cache.
    """
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SAESCOPE_HOME", str(home))
    torch.manual_seed(0)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("the a an of to in is was and on for with as by at it he she they paris france tower city river "
             "king queen war peace music art science water fire earth one two three . , ! ?").split()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


TINY_CONFIGS = {
    "gemma3": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=128),
}


def make_tiny_model(family: str, folder):
    """Save a tiny random model of `family` with a small word-level tokenizer into `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = _tiny_tokenizer()
    cfg = dict(TINY_CONFIGS[family])
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=2, eos_token_id=1,
                                  pad_token_id=0, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model_dir(request, tmp_path_factory):
    return make_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    return make_tiny_model("gemma3", tmp_path_factory.mktemp("tiny-gemma3-only"))


class FaultyConnection:
    """A connection whose `fail_on` statement raises SQLite's disk I/O error once; records statements."""

    def __init__(self, conn, fail_on: str):
        self.conn, self.fail_on, self.statements = conn, fail_on, []

    def execute(self, sql, *args):
        self.statements.append(sql.split()[0].upper())
        if self.fail_on and sql.lstrip().startswith(self.fail_on):
            self.fail_on = ""
            err = sqlite3.OperationalError("disk I/O error")
            err.sqlite_errorcode = 10  # SQLITE_IOERR
            raise err
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def sharp_model(folder):
    """A tiny random model loaded with its weight matrices scaled ×8, so that its predictions are far from uniform
    (at the default init every site matters little and zero-ablation barely moves the loss)."""
    import torch

    from saescope.models import load_model

    lm = load_model(str(folder))
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return lm
