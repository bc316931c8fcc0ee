"""Loading a model's tokenizer straight from its tokenizer.json gives the tokenizer `AutoTokenizer` gives."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer
from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

from saescope.models import _tokenizer_from_file

TEXTS = ["the and the", " the  and ", "théâtre 東京 🙂\u00a0x", "<bos>and<eos>", "", "a" * 300, "zz\n\tthe"]


def _tiny_gemma_tokenizer(folder):
    """A GemmaTokenizer (the default model's class) with a small BPE and byte fallback, saved as the hub does."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for c in "abcdefghijklmnopqrstuvwxyz▁":
        vocab[c] = len(vocab)
    merges = [("t", "h"), ("th", "e"), ("▁", "the"), ("a", "n"), ("an", "d"), ("▁", "and")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    return folder


def test_a_gemma_tokenizer_from_its_file_encodes_pads_and_decodes_as_auto_does(tmp_path):
    folder = _tiny_gemma_tokenizer(tmp_path)
    auto, fast = AutoTokenizer.from_pretrained(str(folder)), _tokenizer_from_file(folder)
    assert fast is not None and type(fast) is not type(auto)  # the fast path was taken
    assert (fast.padding_side, fast.pad_token_id, fast.bos_token_id, fast.eos_token_id) == (
        "left", auto.pad_token_id, auto.bos_token_id, auto.eos_token_id)
    for text in TEXTS:
        for special in (True, False):
            assert fast(text, add_special_tokens=special).input_ids == auto(text, add_special_tokens=special).input_ids
        ids = auto(text).input_ids
        assert fast.decode(ids) == auto.decode(ids) and fast.convert_ids_to_tokens(ids) == auto.convert_ids_to_tokens(ids)
    a, f = auto(TEXTS, padding=True, return_tensors="pt"), fast(TEXTS, padding=True, return_tensors="pt")
    assert set(a) == set(f) and all((a[k] == f[k]).all() for k in a)


@pytest.mark.parametrize("extra", [{"add_bos_token": False}, {"chat_template": "{{ x }}"}, {"auto_map": {}}])
def test_a_tokenizer_config_with_more_than_plain_keys_loads_the_usual_way(tmp_path, extra):
    folder = _tiny_gemma_tokenizer(tmp_path)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **extra}))
    assert _tokenizer_from_file(folder) is None


def test_an_unknown_tokenizer_class_or_a_broken_config_loads_the_usual_way(tmp_path):
    folder = _tiny_gemma_tokenizer(tmp_path)
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tokenizer_class": "LlamaTokenizer"}))
    assert _tokenizer_from_file(folder) is None
    config.write_text("{not json")
    assert _tokenizer_from_file(folder) is None
    (folder / "tokenizer.json").unlink()
    assert _tokenizer_from_file(folder) is None
