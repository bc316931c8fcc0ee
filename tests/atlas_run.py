"""A tiny complete run (trained, evaluated, analysed, labelled) for the web app's tests.

Shared by test_server_api.py and test_browser.py; built once per pytest session
(cached by folder), from the tiny random Gemma of conftest.py and a small corpus of
sentences in its word-level vocabulary.
"""

from __future__ import annotations

import random
from pathlib import Path

from conftest import _tiny_tokenizer

_BUILT: dict[str, Path] = {}


def write_corpus(folder: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Documents of short sentences using only the tiny tokenizer's words (no <unk>)."""
    vocab = set(_tiny_tokenizer().get_vocab())
    subjects = ["the king", "the queen", "paris", "france", "the city", "the river", "the tower", "music",
                "art", "science", "water", "fire", "the earth", "he", "she", "they"]
    verbs = ["is", "was"]
    objects = ["a city", "the city of paris", "in france", "at war", "at peace", "on the river", "by the tower",
               "with music", "for art and science", "one", "two", "three", "water and fire", "of the earth"]
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        sentences = []
        for _ in range(rng.randint(8, 14)):
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice('.!?,')}"
            sentences.append(s)
        text = " ".join(sentences)
        assert all(w in vocab for w in text.split()), text
        (folder / f"doc{d:03d}.txt").write_text(text + "\n")
    return folder


def build_run(base: Path, model_dir) -> Path:
    """Train 3 SAEs (layers 0-2, width 32), evaluate, analyse and label them offline."""
    key = str(base)
    if key in _BUILT:
        return _BUILT[key]
    from saescope.analyze import analyze
    from saescope.evaluate import evaluate
    from saescope.label.offline import label_offline
    from saescope.pipeline import train_run
    from saescope.train import TrainConfig

    corpus = write_corpus(base / "corpus")
    run = train_run(base / "run", model=str(model_dir), corpus=str(corpus), layers="0,1,2", widths=(32,),
                    l0s=(4,), train=TrainConfig(tokens=2000, batch_size=128), ctx_len=32, progress=False)
    with run.stage("eval"):
        evaluate(run, eval_tokens=500, ce_tokens=128, other="pydoc", progress=False)
    analyze(run, n_tokens=3000, progress=False)
    label_offline(run, progress=False)
    _BUILT[key] = run.root
    return run.root
