"""LLM labels: any OpenAI-compatible chat server writes a short label from a feature's evidence.

    label_llm(run, base_url="http://localhost:8000/v1", model="qwen3-8b")

- The prompt shows the labelling contexts (evidence.py) with firing tokens marked
  <<like this>>, the tokens the feature fires on most and its logit effects.
- Answers are cleaned (`clean_label`): leaked reasoning, "Label:" prefixes, quotes
  and markdown are stripped, length is bounded, empty or garbage answers are
  rejected (nothing stored, counted as failed). Labels are stored as plain text.
- Requests go through `LLMClient`: a thread pool (`concurrency`), a per-request
  timeout, our own retries with exponential backoff and jitter on 429 / 5xx /
  timeouts / connection errors (honouring Retry-After), and a SQLite cache
  (run/llm_cache.sqlite, keyed by a hash of model + messages) holding only
  accepted answers, so a re-run costs nothing.
- An answer that echoes the prompt ("Feature 1803 of SAE resid_post/layer_12…")
  or says nothing about the evidence (no word of the contexts or promoted tokens,
  and no closer to the feature's windows or promoted tokens than to chance, by the
  concept explainer's vectors) is stored as "unclear (...)" and not scored.
- Scores: detection-llm (the LLM judges held-out contexts from the label) and,
  with the local embedding model, the offline explainer's two scores of the same
  label (concepts.py): detection-offline and output-offline.
- Resumable: features whose current "llm" label came from the same model are
  skipped (and only scored if their detection-llm score is missing).
- The API key is read from the environment variable `api_key_env` and never
  written anywhere.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import hashlib
import json
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import SaescopeError
from ..runs import Run, holds_run
from .evidence import (
    Context,
    Evidence,
    LabelReport,
    TokenTable,
    alive_features,
    as_run,
    display_token,
    gather,
    resolve_saes,
)
from .scoring import METHOD_LLM, RejectedAnswer, score_llm

CACHE_FILE = "llm_cache.sqlite"
MAX_LABEL_CHARS = 120
MAX_LABEL_WORDS = 30  # a longer answer is prose, not a label
MAX_RETRY_WAIT_S = 60.0
SHOWN_CONTEXTS = 10  # per kind (top, quantile)
WINDOW_BEFORE, WINDOW_AFTER = 32, 16  # tokens kept around a context's maximum

LABEL_SYSTEM = (
    "You explain features of a sparse autoencoder trained on the activations of a language model. "
    "A feature fires on some tokens of a text. From example texts where the feature fires, with the "
    "firing tokens marked <<like this>>, you write a short, specific label saying what the feature "
    "responds to (a token, a word class, a concept, a syntactic position, ...).")


# --------------------------------------------------------------------------- prompt and answer


def label_prompt(evidence: Evidence, n_shown: int = SHOWN_CONTEXTS) -> str:
    top = [c for c in evidence.labelling if c.kind == "top"][:n_shown]
    quantile = [c for c in evidence.labelling if c.kind == "quantile"][:n_shown]
    lines = [f"Feature {evidence.idx} of SAE {evidence.sae_id}.", "",
             "Texts where it fires most strongly (firing tokens marked <<like this>>, ↵ marks a line break):"]
    lines += [f"{i}. (max activation {c.max_act:.3g}) {_window(c).marked()}" for i, c in enumerate(top, 1)]
    if quantile:
        lines += ["", "Texts where it fires more weakly:"]
        lines += [f"{i}. (max activation {c.max_act:.3g}) {_window(c).marked()}" for i, c in enumerate(quantile, 1)]
    tokens = _top_tokens(top + quantile)
    if tokens:
        lines += ["", "Tokens it fires on most (total activation): "
                  + ", ".join(f"{json.dumps(t, ensure_ascii=False)} ({a:.3g})" for t, a in tokens)]
    if evidence.logits_pos:
        lines += ["Next tokens it promotes: " + _logit_list(evidence.logits_pos)]
    if evidence.logits_neg:
        lines += ["Next tokens it suppresses: " + _logit_list(evidence.logits_neg)]
    lines += ["", "What does this feature respond to? Reply with only the label, at most 10 words."]
    return "\n".join(lines)


_ECHO = re.compile(r"\bfeature\s+#?\d+\b|\bof\s+sae\b|\b(resid_post|resid_pre|mlp_out|attn_out)/", re.IGNORECASE)
MIN_RELEVANCE = 0.7  # AUC an answer's meaning must reach (windows or promoted words) when it shares no word
# Words that say nothing about a feature's evidence even when they occur in it.
_EMPTY_WORDS = frozenset("the and for with that this from are was were its his her their has have had not but all "
                         "any into than then which who what when where word words token tokens text texts "
                         "feature features fires firing after before following preceding next previous "
                         "starts start end ends".split())


def _frame_words(prompt: str) -> list[str]:
    """The words of the prompt's own wording: system text, headers and instructions, not the evidence."""
    return _words(" ".join(ln for ln in (LABEL_SYSTEM + "\n" + prompt).splitlines()
                           if ln and not re.match(r"^\d+\. \(max activation", ln)))


def echoes_prompt(label: str, prompt: str) -> bool:
    """Does `label` repeat the prompt's own wording ("Feature 1803 of SAE ...", its headers
    or instructions) instead of describing the evidence?"""
    words = _words(label)
    if not words or _ECHO.search(label):
        return True
    return len(words) >= 3 and " ".join(words) in " ".join(_frame_words(prompt))


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def evidence_words(evidence: Evidence) -> tuple[set[str], set[str]]:
    """(stems of the content words in the labelling contexts and the promoted tokens,
    words of the offline token rule's label when it is certain)."""
    from .rules import explain, normalise, stem

    out = {stem(normalise(t)) for c in evidence.labelling for t in c.tokens}
    out |= {stem(normalise(str(p[0]))) for p in evidence.logits_pos}
    rule = explain(evidence)
    return {w for w in out if _is_content(w)}, set(_words(rule.label)) if rule.certain else set()


def _is_content(word: str) -> bool:
    return len(word) >= 3 and word.isalpha() and word not in _EMPTY_WORDS


def unclear_reason(label: str, prompt: str, evidence: Evidence, space=None) -> str | None:
    """Why an answer must be stored as unclear, or None when it is a label of the evidence:
    its content words occur in the evidence, or (without content words) it names the token
    rule's words, or its meaning fits the evidence (`MIN_RELEVANCE`, with `space`)."""
    from .rules import stem

    if echoes_prompt(label, prompt):
        return "the LLM's answer echoed the prompt"
    content = [w for w in _words(label) if _is_content(w)]
    words, rule_words = evidence_words(evidence)
    if {stem(w) for w in content} & (words | {stem(w) for w in rule_words}) or (
            not content and set(_words(label)) & rule_words):
        return None
    if content and all(w in set(_frame_words(prompt)) for w in content):
        return "the LLM's answer echoed the prompt"
    if space is not None and content:
        from ..embed import encode
        from .concepts import input_auc, output_auc

        vector = space.text_vector(encode([label])[0])
        output = output_auc(space, evidence, vector)
        if input_auc(space, evidence, vector) >= MIN_RELEVANCE or (output and output[0] >= MIN_RELEVANCE):
            return None
    return "the LLM's answer says nothing about the evidence"


def _window(ctx: Context) -> Context:
    """The part of a long context around its maximum."""
    if len(ctx.tokens) <= WINDOW_BEFORE + WINDOW_AFTER:
        return ctx
    peak = max(range(len(ctx.acts)), key=ctx.acts.__getitem__)
    lo = max(0, min(peak - WINDOW_BEFORE, len(ctx.tokens) - WINDOW_BEFORE - WINDOW_AFTER))
    hi = lo + WINDOW_BEFORE + WINDOW_AFTER
    return Context(ctx.kind, ctx.rank, ctx.quantile, ctx.max_act, ctx.ids[lo:hi], ctx.tokens[lo:hi], ctx.acts[lo:hi])


def _top_tokens(contexts: list[Context], n: int = 8) -> list[tuple[str, float]]:
    mass: dict[str, float] = {}
    for c in contexts:
        for tok, act in c.firing_tokens():
            mass[tok] = mass.get(tok, 0.0) + act
    return sorted(mass.items(), key=lambda kv: -kv[1])[:n]


def _logit_list(pairs: list, n: int = 8) -> str:
    return ", ".join(json.dumps(display_token(str(p[0])), ensure_ascii=False) for p in pairs[:n])


_THINK = re.compile(r"<(think|thinking|reasoning)>.*?(</\1>|$)", re.DOTALL | re.IGNORECASE)
_PREFIX = re.compile(r"^\W*(?:final\s+)?(?:label|explanation|answer|feature)\W*?[:：]\s*", re.IGNORECASE)
_REFUSAL = re.compile(r"^(i'?m sorry|i am sorry|sorry|i cannot|i can'?t|as an ai|unfortunately)\b", re.IGNORECASE)
_LIST_MARK = re.compile(r"^\s*(?:[-*•#>]+|\d+[.)])\s+")
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "`", "“": "”", "‘": "’", "«": "»"}


def clean_label(answer: str | None) -> str:
    """The label in an LLM answer, or RejectedAnswer when there is none."""
    text = _THINK.sub("", answer or "").replace("\r", "")
    lines = [ln.strip() for ln in text.split("\n") if ln.strip() and not ln.strip().startswith("```")]
    if not lines:
        raise RejectedAnswer("empty answer")
    labelled = [i for i, ln in enumerate(lines) if _PREFIX.match(_strip_markdown(ln))]
    if labelled:
        i = labelled[-1]
        line = _PREFIX.sub("", _strip_markdown(lines[i]))
        if not _unquote(line).strip(" *_") and i + 1 < len(lines):
            line = lines[i + 1]
    else:
        rest = [ln for ln in lines if not ln.endswith(":")]
        line = rest[0] if rest else lines[0]
    line = _unquote(_strip_markdown(line).strip().rstrip(".").strip())
    if not line or not any(c.isalnum() for c in line):
        raise RejectedAnswer(f"no label in the answer {text[:80]!r}")
    if _REFUSAL.match(line):
        raise RejectedAnswer(f"the model declined: {line[:80]!r}")
    if len(line.split()) > MAX_LABEL_WORDS:
        raise RejectedAnswer(f"answer is prose, not a label ({len(line.split())} words)")
    if any(ord(c) < 32 or c == "\ufffd" for c in line):
        raise RejectedAnswer("answer contains control characters")
    if len(line) > MAX_LABEL_CHARS:
        line = line[: MAX_LABEL_CHARS - 1].rsplit(" ", 1)[0].rstrip(" ,;:") + "…"
    return line


def _unquote(line: str) -> str:
    """Remove quotes around the whole label (not quotes inside it)."""
    line = line.strip()
    while len(line) >= 2 and _QUOTE_PAIRS.get(line[0]) == line[-1]:
        line = line[1:-1].strip()
    return line


def _strip_markdown(line: str) -> str:
    line = _LIST_MARK.sub("", line)
    return line.replace("**", "").replace("__", "").strip()


# --------------------------------------------------------------------------- client


class LLMCache:
    """Accepted answers by hash of (model, messages), in a SQLite file beside features.sqlite."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5)
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, answer TEXT, "
                               "prompt_tokens INT, completion_tokens INT, created REAL)")
        except sqlite3.DatabaseError as err:
            raise SaescopeError(f"LLM cache {self.path} is unreadable ({err}): delete it and re-run") from err

    @staticmethod
    def key(model: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([model, messages], sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, model: str, answer: str, usage: tuple[int, int]) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                               (key, model, answer, usage[0], usage[1], time.time()))

    def drop(self, key: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM answers WHERE key = ?", (key,))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass
class Counters:
    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMClient:
    """One model on one OpenAI-compatible server: retries, timeouts, cache, token counters.

    Fatal problems (unreachable server, unknown model, refused key, a server that keeps
    failing) raise SaescopeError; a bad answer for one request raises RejectedAnswer.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 30,
                 max_retries: int = 4, cache: LLMCache | None = None, backoff_s: float = 1.0,
                 max_tokens: int = 512, temperature: float = 0.0):
        try:
            from openai import OpenAI
        except ImportError as err:
            raise SaescopeError("LLM labelling needs the openai client: pip install 'saescope[llm]'") from err
        if not re.match(r"^https?://", base_url or ""):
            raise SaescopeError(f"LLM base URL {base_url!r} must start with http:// or https://, "
                                "e.g. http://localhost:8000/v1")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.timeout, self.max_retries, self.backoff_s = float(timeout), int(max_retries), float(backoff_s)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.cache = cache
        self.counters = Counters()
        self._lock = threading.Lock()
        self._cancelled = threading.Event()
        self._client = OpenAI(base_url=self.base_url, api_key=os.environ.get(api_key_env) or "none",
                              timeout=self.timeout, max_retries=0)

    def ask(self, messages: list[dict], parse: Callable[[str], object]) -> object:
        """parse(answer) for `messages`, from the cache or the server; only answers that
        parse are cached."""
        key = LLMCache.key(self.model, messages)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                try:
                    result = parse(cached)
                except RejectedAnswer:
                    self.cache.drop(key)  # written by an older, laxer parser
                else:
                    self._count(cache_hits=1)
                    return result
        answer, usage = self._request(messages)
        result = parse(answer)
        if self.cache is not None:
            self.cache.put(key, self.model, answer, usage)
        return result

    def cancel(self) -> None:
        """Make requests in other threads stop at their next try (after a fatal error)."""
        self._cancelled.set()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + d)

    def _request(self, messages: list[dict]) -> tuple[str, tuple[int, int]]:
        import openai

        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if self._cancelled.is_set():
                raise SaescopeError("LLM labelling was cancelled after an earlier error")
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages,  # type: ignore[arg-type]  # plain role/content dicts
                    temperature=self.temperature, max_tokens=self.max_tokens)
            except openai.NotFoundError as err:
                raise SaescopeError(f"model {self.model!r} not found at {self.base_url} (HTTP 404: "
                                    f"{_server_message(err)}): check --model, and that the URL ends in /v1") from err
            except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
                raise SaescopeError(f"LLM at {self.base_url} refused the request (HTTP {err.status_code}): "
                                    f"put a valid API key in ${self.api_key_env}") from err
            except openai.APITimeoutError as err:
                last = err
                wait = self._backoff(attempt)
            except openai.APIConnectionError as err:
                last = err
                wait = self._backoff(attempt)
            except openai.APIStatusError as err:
                if err.status_code not in (408, 409, 429) and err.status_code < 500:
                    raise RejectedAnswer(f"HTTP {err.status_code}: {_server_message(err)}") from err
                last = err
                asked = _retry_after(err)
                wait = self._backoff(attempt) if asked is None else asked
            except openai.APIError as err:  # e.g. a 200 whose body is not a completion
                raise RejectedAnswer(f"malformed response: {err}") from err
            else:
                return self._answer(resp)
            if attempt < self.max_retries:
                self._cancelled.wait(wait)
        raise self._fatal(last)

    def _answer(self, resp) -> tuple[str, tuple[int, int]]:
        usage = getattr(resp, "usage", None)
        counts = (int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
        self._count(prompt_tokens=counts[0], completion_tokens=counts[1])
        choices = getattr(resp, "choices", None)
        if not choices:
            raise RejectedAnswer("response has no choices")
        content = getattr(choices[0].message, "content", None)
        return (content if isinstance(content, str) else ""), counts

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** attempt * (0.5 + random.random()), 30.0)

    def _fatal(self, err: Exception | None) -> SaescopeError:
        import openai

        tries = self.max_retries + 1
        if isinstance(err, openai.APITimeoutError):
            return SaescopeError(f"LLM at {self.base_url} did not answer within {self.timeout:g}s ({tries} tries): "
                                 "check the server, or raise --timeout")
        if isinstance(err, openai.APIConnectionError):
            cause = err.__cause__ or err
            return SaescopeError(f"cannot reach LLM at {self.base_url}: {type(cause).__name__}: {cause} "
                                 f"({tries} tries): check --base-url and that the server is running")
        status = getattr(err, "status_code", "?")
        return SaescopeError(f"LLM at {self.base_url} kept failing (HTTP {status}: {_server_message(err)}) after "
                             f"{tries} tries: try again later or lower --concurrency")


def _server_message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error")
        msg = inner.get("message") if isinstance(inner, dict) else body.get("message")
        if msg:
            return str(msg)[:200]
    return str(getattr(err, "message", err))[:200]


def _retry_after(err) -> float | None:
    """Seconds the server asked us to wait (Retry-After / retry-after-ms), capped."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms") is not None:
            return min(float(headers["retry-after-ms"]) / 1000, MAX_RETRY_WAIT_S)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return min(max(float(value), 0.0), MAX_RETRY_WAIT_S)
        except ValueError:
            when = email.utils.parsedate_to_datetime(value).timestamp()
            return min(max(when - time.time(), 0.0), MAX_RETRY_WAIT_S)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- the labelling pass


def _fresh_windows(run: Run, work: list, table: TokenTable):
    """The fresh held-out windows (detection.py) for the offline score of LLM labels, or None."""
    from .detection import detection_set

    fresh = detection_set(run, sorted({sae_id for sae_id, _ in work}))
    if fresh is not None:
        fresh.attach_tokens(table)
    return fresh


@holds_run("label")
def label_llm(run: Run | str | Path, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
              sae_ids=None, concurrency: int = 4, timeout: float = 30, max_retries: int = 4,
              limit: int | None = None, progress: bool = True, score: bool = True, cache: bool = True,
              backoff_s: float = 1.0, concepts: bool = True) -> LabelReport:
    """Label every alive feature with an LLM (source "llm", model `model`) and, with
    `score`, score each label by LLM detection on held-out contexts.

    sae_ids: SAE refs (None = every analysed SAE); limit: per SAE, most frequent first.
    concurrency: requests in flight; timeout: seconds per request; max_retries: extra
    tries on 429 / 5xx / timeouts / connection errors, backing off from `backoff_s`.
    concepts: also judge answers and score labels with the offline explainer's vectors
    (needs the local embedding model; skipped with a warning without it).
    """
    if int(concurrency) < 1:
        raise SaescopeError(f"concurrency must be at least 1, got {concurrency}")
    run = as_run(run)
    report = LabelReport(source="llm", model=model)
    t0 = time.time()
    llm_cache = LLMCache(run.root / CACHE_FILE) if cache else None
    client = LLMClient(base_url, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                       cache=llm_cache, backoff_s=backoff_s)
    try:
        with run.db() as db:
            from .offline import _space

            labeller = _LLMLabeller(db, client, report, model, score, _space(db, None) if concepts else None)
            work = [(sae["id"], row) for sae in resolve_saes(db, sae_ids) for row in alive_features(db, sae, limit)]
            report.features = len(work)
            if score and labeller.space is not None:
                labeller.fresh = _fresh_windows(run, work, labeller.table)
            _label_all(work, labeller, int(concurrency), progress)
    finally:
        if llm_cache is not None:
            llm_cache.close()
        c = client.counters
        report.requests, report.cache_hits, report.retries = c.requests, c.cache_hits, c.retries
        report.prompt_tokens, report.completion_tokens = c.prompt_tokens, c.completion_tokens
        report.seconds = time.time() - t0
    return report


class _LLMLabeller:
    """One `label_llm` call's shared state; `one` labels (and scores) one feature, from any worker thread."""

    def __init__(self, db, client: LLMClient, report: LabelReport, model: str, score: bool, space):
        self.db, self.client, self.report, self.model, self.score, self.space = db, client, report, model, score, space
        self.table = TokenTable(db)
        self.done = {(lab["sae_id"], lab["idx"]): lab["id"] for lab in db.current_labels("llm")
                     if lab["model"] == model and not lab["stale"]}  # stale: written for replaced weights
        self.lock = threading.Lock()
        self.fresh = None  # fresh held-out windows for the offline score (detection.py), when scoring

    def one(self, sae_id: str, row: dict) -> str:
        db, idx = self.db, row["idx"]
        label_id = self.done.get((sae_id, idx))
        if label_id is not None and (not self.score or any(
                s["method"] == METHOD_LLM for s in db.scores(label_id))):
            return "skipped"
        evidence = gather(db, sae_id, idx, self.table, stats=row)
        if evidence is None or not evidence.labelling:
            raise RejectedAnswer(f"{sae_id} #{idx}: no labelling contexts")
        if label_id is None:
            prompt = label_prompt(evidence)
            messages = [{"role": "system", "content": LABEL_SYSTEM}, {"role": "user", "content": prompt}]
            text = str(self.client.ask(messages, clean_label))
            reason = unclear_reason(text, prompt, evidence, self.space)
            text = text if reason is None else f"unclear ({reason})"
            label_id = db.set_label(sae_id, idx, text, source="llm", model=self.model)
            outcome = "labelled"
        else:
            text = next(lab["text"] for lab in db.labels(sae_id, idx) if lab["id"] == label_id)
            outcome = "skipped"
        if text.startswith("unclear ("):
            with self.lock:
                self.report.unclear += 1
            return outcome
        if self.score:
            self._score(sae_id, idx, evidence, text, label_id)
        return outcome

    def _score(self, sae_id: str, idx: int, evidence, text: str, label_id: int) -> None:
        """The offline vectors' scores (with the local embedding model) and the LLM's detection score."""
        report = self.report
        if self.space is not None:
            from .concepts import text_explanation
            from .scoring import score_explanation

            with self.lock:  # one encoder call at a time
                expl = text_explanation(self.space, evidence, text)
            score_explanation(self.space, evidence, expl, db=self.db, label_id=label_id, fresh=self.fresh)
        try:
            result = score_llm(evidence, text, self.client.ask, db=self.db, label_id=label_id)
        except RejectedAnswer as err:  # the label stays; a re-run retries the score
            result = None
            with self.lock:
                report.errors.append(f"{sae_id} #{idx} (scoring): {err}")
        with self.lock:
            if result is None:
                report.unscored += 1
            else:
                report.scored += 1
                report.score_sum += result.value


def _label_all(work: list, labeller: _LLMLabeller, concurrency: int, progress: bool) -> None:
    """`labeller.one` over `work` in a thread pool, with a progress bar; an interrupt cancels the requests."""
    report, client = labeller.report, labeller.client
    bar = tqdm(total=len(work), desc=f"llm labels ({labeller.model})", unit="feat", disable=not progress,
               dynamic_ncols=True)
    pool = cf.ThreadPoolExecutor(max_workers=concurrency)
    try:
        futures = {pool.submit(labeller.one, s, row): (s, row["idx"]) for s, row in work}
        for fut in cf.as_completed(futures):
            sae_id, idx = futures[fut]
            try:
                outcome = fut.result()
            except RejectedAnswer as err:
                report.note_error(f"{sae_id} #{idx}: {err}")
            else:
                setattr(report, outcome, getattr(report, outcome) + 1)
            c = client.counters
            bar.set_postfix(tok=c.prompt_tokens + c.completion_tokens, failed=report.failed, refresh=False)
            bar.update()
    except BaseException:
        client.cancel()  # requests in flight stop at their next try
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
