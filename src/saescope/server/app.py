"""FastAPI app over one run: JSON API + a static single-page app (vanilla JS, no build step).

    create_app("runs/gemma-3-270m")            # ASGI app (tests: fastapi.testclient.TestClient)
    serve("runs/gemma-3-270m", port=8000)      # uvicorn; a token is required off localhost

API (every response is JSON; errors are {"detail": "..."} with a 4xx status):

    GET  /api/run                               manifest facts, SAE count, what the run has
    GET  /api/saes                              every SAE with its analysis status and eval metrics
    GET  /api/eval                              eval.json (404 before `saescope eval`)
    POST /api/inspect   {text, top, fast}       per token, per SAE: L0, the top features (parallel arrays),
                                                the top one's activation ÷ its analysed max; labels once;
                                                "precision": what the model ran in (see InspectIn.fast)
    GET  /api/feature/{sae_id}/{idx}            stats, examples, logit effects, labels + history
    GET  /api/feature/{sae_id}/{idx}/similar?k=&span=   decoder-cosine neighbours, this and adjacent layers
    POST /api/feature/{sae_id}/{idx}/activations {text}  this feature's activation on every token of text
    POST /api/feature/{sae_id}/{idx}/label      {text, author} → new human label
    GET  /api/top/{sae_id}?order_by=&limit=     the SAE's features, largest first
    GET  /api/features/{sae_id}?order_by=&desc=&offset=&limit=&state=&min_freq=&max_freq=&min_score=&max_score=
                                                one page of the SAE's features, sorted and filtered, + total
    GET  /api/search?q=&limit=&mode=            labels → features
    GET  /api/concept?q=                        the features steering by concept chooses from
    POST /api/steer     {prompt, features, concept, concept_strength, strength, max_new_tokens, greedy,
                         temperature, seed, n}  → one result, or {"samples": [...]} when n > 1
    POST /api/steer/stream  (same body)         NDJSON: tokens as generated, then each result (see _stream)
    POST /api/steer/cancel                      stop the running steering job

Security: all data reaches the page through textContent (see static/app.js) and every
response carries a strict Content-Security-Policy. Model calls run in a worker thread,
one at a time (one lock), so the event loop keeps serving pages meanwhile. Without a
token the app answers only requests addressed to localhost (DNS-rebinding guard); with
one, every request needs `Authorization: Bearer TOKEN`, the cookie set by `?token=TOKEN`.
POSTs must be JSON and same-origin, so another web page cannot post to the app.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast
from urllib.parse import urlencode

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import SaescopeError
from ..steer import MAX_STRENGTH

if TYPE_CHECKING:
    from ..search import Mode as SearchMode

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_PROMPT_CHARS = 2000
MAX_TOP = 20
MAX_NEW_TOKENS = 200
MAX_FEATURES = 16
MAX_SAMPLES = 4
PAGE_ORDERS = "^(frequency|max_act|mean_act|n_fired|idx|score)$"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
COOKIE = "saescope_token"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                    "Cross-Origin-Opener-Policy": "same-origin"}


# --------------------------------------------------------------------------- JSON


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf → None (JSON has no NaN), tuples → lists, numpy → Python."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _finite(obj.tolist())
    return obj


class SafeJSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InspectIn(_Body):
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    top: int = Field(5, ge=1, le=MAX_TOP)
    fast: bool = False
    """The model's matrix products in bf16 where the CPU has native bf16 (`LoadedModel.fast_matmuls`: on Gemma 3
    270M ~3× faster products, 99% of each token's top-5 features the same); the page asks for it unless its
    "exact" box is ticked."""


class LabelIn(_Body):
    text: str = Field(min_length=1, max_length=500)
    author: str | None = Field(None, max_length=100)


class SteerIn(_Body):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    features: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list,
                                                                                 max_length=MAX_FEATURES)
    concept: str | None = Field(None, max_length=200)
    concept_strength: float | None = Field(None, ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    """Strength for the concept's features; None: calibrated (and cached) by the library."""
    strength: float = Field(2.0, ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
    max_new_tokens: int = Field(24, ge=1, le=MAX_NEW_TOKENS)
    greedy: bool = True
    temperature: float = Field(1.0, gt=0, le=10, allow_inf_nan=False)
    """Sampling temperature (ignored when greedy)."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    n: int = Field(1, ge=1, le=MAX_SAMPLES)
    """Samples to draw (seeds seed, seed+1, ...); more than one needs sampling (greedy false)."""


class ActivationsIn(_Body):
    text: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)


class FeaturePageQuery(BaseModel):
    """Query of GET /api/features/{sae}: one page of an SAE's features, sorted and filtered."""

    model_config = ConfigDict(extra="ignore")
    order_by: str = Field("frequency", pattern=PAGE_ORDERS)
    desc: bool = True
    offset: int = Field(0, ge=0, le=10**7)
    limit: int = Field(50, ge=1, le=500)
    state: str = Field("all", pattern="^(all|alive|dead|dense|sparse)$")
    min_freq: float | None = Field(None, ge=0, le=1)
    max_freq: float | None = Field(None, ge=0, le=1)
    min_score: float | None = Field(None, ge=0, le=1)
    max_score: float | None = Field(None, ge=0, le=1)


# --------------------------------------------------------------------------- state


class Atlas:
    """What the app serves: one opened Scope, and the lock that serialises model use."""

    def __init__(self, run_dir: str | Path):
        from ..scope import Scope

        self.scope = Scope.open(run_dir)
        self.run = self.scope.run
        self.compute = threading.Lock()
        self.steer_job: _SteerJob | None = None  # the steering job running now (cancellable), set under `compute`
        self._max_acts: dict[str, dict[int, float]] = {}

    # ---------------------------------------------------------------- lookups

    def sae_info(self, ref: str) -> dict:
        """{id, site, layer, width} of an SAE given by full id, "site/LAYER" or "LAYER"; 404 if unknown."""
        try:
            sae_id = self.run.resolve_sae(ref)
        except SaescopeError as err:
            raise HTTPException(404, str(err)) from err
        cfg = _read_json(self.run.sae_path(sae_id) / "config.json")
        return {"id": sae_id, "site": cfg.get("site") or sae_id.split("/")[0], "layer": cfg.get("layer"),
                "width": int(cfg.get("width") or 0), "l0_target": cfg.get("l0"),
                "architecture": cfg.get("architecture")}

    def check_idx(self, sae: dict, idx: int) -> None:
        if not 0 <= idx < sae["width"]:
            raise HTTPException(404, f"feature {idx} is out of range for SAE {sae['id']} "
                                     f"(width {sae['width']}): use 0..{sae['width'] - 1}")

    def require_db(self) -> None:
        if not self.run.db_path.is_file():
            raise HTTPException(404, "this run has no feature database yet: run the analysis and label features")

    def max_acts(self, sae_id: str) -> dict[int, float]:
        """idx → max activation over the analysed tokens (read once per SAE; empty before analysis)."""
        if sae_id not in self._max_acts:
            self._max_acts[sae_id] = self.scope.db.max_acts(sae_id) if self.run.db_path.is_file() else {}
        return self._max_acts[sae_id]

    def warm_up(self) -> None:
        """Load the model and every SAE and run them once: the first calls after loading are
        several times slower (weights are paged in on first touch)."""
        text = _warm_up_text(self.scope.model)
        with self.compute:
            for _ in range(2):
                for fast in (True, False):
                    self.scope.inspect(text, top=1, fast=fast)

    def check_prompt(self, text: str, extra: int = 0) -> None:
        """400 when the prompt has no text or its tokens (+ `extra` new ones) pass the model's context."""
        if not text.strip():
            raise HTTPException(400, "the text is empty: type something to run through the model")
        lm = self.scope.model
        lm.check_fits(len(lm.tokenizer(text)["input_ids"]), extra)  # SaescopeError: answered with 400


def _warm_up_text(lm) -> str:
    """A short text the model's tokenizer knows: "Hello world", or (for a small vocabulary that lacks
    those words) the first few ordinary tokens of the vocabulary."""
    tok = lm.tokenizer
    special = lm.special_ids | {tok.unk_token_id}
    if any(i not in special for i in tok("Hello world", add_special_tokens=False)["input_ids"]):
        return "Hello world"
    ids = [i for i in range(min(len(tok), 1000)) if i not in special][:4]
    return tok.decode(ids)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _eval(run) -> dict | None:
    path = run.root / "eval.json"
    return _read_json(path) if path.is_file() else None


# --------------------------------------------------------------------------- the app


def create_app(run_dir: str | Path, token: str | None = None, *,
               allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The web app over the run in `run_dir` (opened now: a missing run fails here).

    token: when set, every request must carry it (bearer header, or `?token=` once, which
    sets a cookie). allowed_hosts: Host header values answered when there is no token
    (default: localhost names only).
    """
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise SaescopeError("the access token must be at least 8 characters: use e.g. "
                            "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
    atlas = Atlas(run_dir)
    hosts = set(allowed_hosts or LOCAL_HOSTS)
    app = FastAPI(title="saescope", default_response_class=SafeJSON, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.atlas = atlas
    _install_guards(app, token, hosts)
    _install_errors(app)
    _install_routes(app, atlas)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _install_guards(app: FastAPI, token: str | None, hosts: set[str]) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        response = _refuse(request, token, hosts)
        if response is None:
            query_token = request.query_params.get("token")
            if token and query_token is not None and request.method == "GET" \
                    and not request.url.path.startswith("/api/"):
                # A page opened with ?token=: remember it in a cookie and drop it from the address bar.
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                response = RedirectResponse(request.url.path + (f"?{rest}" if rest else ""), status_code=303)
            else:
                response = await call_next(request)
            if token and query_token is not None:
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if request.url.path.startswith("/api/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _refuse(request: Request, token: str | None, hosts: set[str]) -> Response | None:
    """A 4xx response when the request may not be served, else None."""
    if token:
        supplied = [request.cookies.get(COOKIE), request.query_params.get("token")]
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            supplied.append(auth[7:].strip())
        if not any(s and hmac.compare_digest(s.encode(), token.encode()) for s in supplied):
            return SafeJSON({"detail": "this saescope server needs its access token: open the URL printed "
                                       "by `saescope serve` (…?token=…) or send 'Authorization: Bearer TOKEN'"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
    else:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if name not in hosts:
            return SafeJSON({"detail": f"host '{host[:100]}' is not served: open http://127.0.0.1:PORT/ "
                                       "(or start the server with --token to serve other hosts)"},
                            status_code=400)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        origin = request.headers.get("origin")
        if origin and origin != "null" and origin.split("://", 1)[-1] != request.headers.get("host"):
            return SafeJSON({"detail": "cross-origin requests are refused"}, status_code=403)
        if origin == "null":
            return SafeJSON({"detail": "cross-origin requests are refused"}, status_code=403)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and ctype != "application/json":  # other methods: 405 from the router
            return SafeJSON({"detail": "send the request body as JSON (Content-Type: application/json)"},
                            status_code=415)
    return None


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(SaescopeError)
    async def saescope_error(request: Request, err: SaescopeError):
        return SafeJSON({"detail": str(err)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        return SafeJSON({"detail": "; ".join(problems) or "invalid request", "errors": problems}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.exception("unexpected error serving %s", request.url.path)
        return SafeJSON({"detail": _internal(err)}, status_code=500)


def _internal(err: BaseException) -> str:
    """One line for an unexpected error: its type and the first line of its message."""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"internal error ({type(err).__name__}{': ' + first if first else ''}); see the server log"


def _install_routes(app: FastAPI, atlas: Atlas) -> None:
    _page_routes(app, atlas)
    _run_routes(app, atlas)
    _inspect_routes(app, atlas)
    _feature_routes(app, atlas)
    _feature_list_routes(app, atlas)
    _search_routes(app, atlas)
    _steer_routes(app, atlas)


def _page_routes(app: FastAPI, atlas: Atlas) -> None:
    run = atlas.run

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/eval.png", include_in_schema=False)
    async def eval_png():
        path = run.root / "eval.png"
        if not path.is_file():
            raise HTTPException(404, "this run has no eval.png yet: run `saescope eval`")
        return FileResponse(path, media_type="image/png")


def _run_routes(app: FastAPI, atlas: Atlas) -> None:
    run = atlas.run

    @app.get("/api/run")
    def run_info():
        m = run.manifest
        ev = _eval(run)
        return {"name": run.root.name, "path": str(run.root), "model": m.get("model"), "corpus": m.get("corpus"),
                "config": m.get("config"), "stages": m.get("stages"), "versions": m.get("versions"),
                "created": m.get("created"), "n_saes": len(run.sae_ids()), "has_eval": ev is not None,
                "has_eval_png": (run.root / "eval.png").is_file(), "has_features": run.db_path.is_file(),
                "eval_tokens": ev.get("eval_tokens") if ev else None,
                "limits": {"prompt_chars": MAX_PROMPT_CHARS, "top": MAX_TOP, "max_new_tokens": MAX_NEW_TOKENS,
                           "features": MAX_FEATURES, "samples": MAX_SAMPLES}}

    @app.get("/api/saes")
    def saes():
        ev = (_eval(run) or {}).get("saes", {})
        analysed = {}
        if run.db_path.is_file():
            analysed = {s["id"]: s for s in atlas.scope.db.saes()}
        out = []
        for sae_id in run.sae_ids():
            info = atlas.sae_info(sae_id)
            a = analysed.get(sae_id, {})
            out.append({**info, "status": a.get("status", "not analysed"), "n_tokens": a.get("n_tokens"),
                        "eval": ev.get(sae_id)})
        return {"saes": out}

    @app.get("/api/eval")
    def eval_json():
        ev = _eval(run)
        if ev is None:
            raise HTTPException(404, "this run has no eval.json yet: run `saescope eval`")
        return ev


def _inspect_routes(app: FastAPI, atlas: Atlas) -> None:
    @app.post("/api/inspect")
    async def inspect(body: InspectIn):
        def work():
            with atlas.compute:
                atlas.check_prompt(body.text)
                result = atlas.scope.inspect(body.text, top=body.top, fast=body.fast)
            return _compact_inspect(atlas, result)

        return await run_in_threadpool(work)


def _compact_inspect(atlas: Atlas, res: dict) -> dict:
    """`Scope.inspect` as parallel arrays, each label once: per SAE, per token `l0` (active features),
    `idx` / `act` (the top features, strongest first) and `rel` (the top feature's activation ÷ its
    max over the analysed tokens; None without analysis); `labels` maps sae_id → idx → label."""
    labels: dict[str, dict[str, str]] = {}
    layers = []
    for lay in res["layers"]:
        maxes = atlas.max_acts(lay["sae_id"])
        names = labels.setdefault(lay["sae_id"], {})
        idx, act, rel = [], [], []
        for feats in lay["features"]:
            idx.append([f["idx"] for f in feats])
            act.append([float(f"{f['act']:.4g}") for f in feats])
            names.update((str(f["idx"]), f["label"]) for f in feats if f["label"])
            top_max = maxes.get(feats[0]["idx"]) if feats else None
            rel.append(round(feats[0]["act"] / top_max, 3) if top_max else None)
        layers.append({"sae_id": lay["sae_id"], "layer": lay["layer"], "site": lay["site"], "l0": lay["l0"],
                       "idx": idx, "act": act, "rel": rel})
    return {"text": res["text"], "tokens": res["tokens"], "layers": layers, "labels": labels,
            "precision": res["precision"]}


def _feature_routes(app: FastAPI, atlas: Atlas) -> None:
    run = atlas.run

    @app.get("/api/feature/{sae_id:path}/{idx}/similar")  # before /api/feature/{sae_id}/{idx}, which would match
    async def similar(sae_id: str, idx: int, k: Annotated[int, Query(ge=1, le=50)] = 8,
                      span: Annotated[int, Query(ge=0, le=4)] = 1):
        sae = atlas.sae_info(sae_id)
        atlas.check_idx(sae, idx)

        def work():
            with atlas.compute:  # loads SAEs on first use
                return atlas.scope.similar(sae["id"], idx, k=k, span=span)

        return {"sae_id": sae["id"], "idx": idx, "groups": await run_in_threadpool(work)}

    @app.post("/api/feature/{sae_id:path}/{idx}/activations")
    async def activations(sae_id: str, idx: int, body: ActivationsIn):
        sae = atlas.sae_info(sae_id)
        atlas.check_idx(sae, idx)

        def work():
            with atlas.compute:
                atlas.check_prompt(body.text)
                return atlas.scope.activations(body.text, sae["id"], idx)

        return await run_in_threadpool(work)

    @app.get("/api/feature/{sae_id:path}/{idx}")
    def feature(sae_id: str, idx: int):
        sae = atlas.sae_info(sae_id)
        atlas.check_idx(sae, idx)
        data = None
        if run.db_path.is_file():
            data = atlas.scope.feature(sae["id"], idx)
        out = {**(data or {}), "sae": sae, "sae_id": sae["id"], "idx": idx, "analysed": data is not None}
        out["labels"] = _labels(atlas, sae["id"], idx, history=False)
        out["label_history"] = _labels(atlas, sae["id"], idx, history=True)
        return out

    @app.post("/api/feature/{sae_id:path}/{idx}/label")
    def label(sae_id: str, idx: int, body: LabelIn):
        from ..label.manual import set_label

        sae = atlas.sae_info(sae_id)
        atlas.check_idx(sae, idx)
        if not body.text.strip():
            raise HTTPException(400, "empty label: write a few words describing what the feature responds to")
        label_id = set_label(run, sae["id"], idx, body.text, author=(body.author or "").strip() or None)
        return {"id": label_id, "sae_id": sae["id"], "idx": idx,
                "labels": _labels(atlas, sae["id"], idx, history=False),
                "label_history": _labels(atlas, sae["id"], idx, history=True)}


def _feature_list_routes(app: FastAPI, atlas: Atlas) -> None:
    run = atlas.run

    @app.get("/api/top/{sae_id:path}")
    def top_features(sae_id: str, order_by: Annotated[str, Query(pattern="^(frequency|max_act|mean_act|n_fired|idx)$")]
                     = "frequency", limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        sae = atlas.sae_info(sae_id)
        if not run.db_path.is_file():
            return {"sae": sae, "features": []}
        rows = atlas.scope.db.top_features(sae["id"], order_by=order_by, limit=limit)
        for r in rows:
            r.pop("hist", None)
            r["label"] = _best_label(atlas, sae["id"], r["idx"])
            r["dead"] = not r["n_fired"]
        return {"sae": sae, "features": rows}

    @app.get("/api/features/{sae_id:path}")
    def feature_page(sae_id: str, q: Annotated[FeaturePageQuery, Query()]):
        from ..featuredb import DENSE_FREQUENCY

        sae = atlas.sae_info(sae_id)
        if not run.db_path.is_file():
            return {"sae": sae, "features": [], "total": 0, "offset": q.offset, "limit": q.limit}
        rows, total = atlas.scope.db.feature_page(
            sae["id"], order_by=q.order_by, descending=q.desc, offset=q.offset, limit=q.limit, state=q.state,
            min_frequency=q.min_freq, max_frequency=q.max_freq, min_score=q.min_score, max_score=q.max_score)
        for r in rows:
            r["label"] = _best_label(atlas, sae["id"], r["idx"])
            r["dead"] = not r["n_fired"]
            r["dense"] = (r["frequency"] or 0) > DENSE_FREQUENCY
        return {"sae": sae, "features": rows, "total": total, "offset": q.offset, "limit": q.limit}


def _search_routes(app: FastAPI, atlas: Atlas) -> None:
    run = atlas.run

    @app.get("/api/search")
    async def search_labels(q: Annotated[str, Query(max_length=200)] = "",
                            limit: Annotated[int, Query(ge=1, le=200)] = 30,
                            mode: Annotated[str, Query(pattern="^(concept|hybrid|fts|semantic)$")] = "concept"):
        from ..search import search

        if not q.strip():
            raise HTTPException(400, "empty search query: type a word to search the labels for")
        atlas.require_db()

        def work():
            with atlas.compute:  # concept and semantic search run the embedding model
                return search(run, q, limit=limit, mode=cast("SearchMode", mode))  # the Query pattern checked it

        hits = await run_in_threadpool(work)
        return {"query": q, "mode": mode, "hits": [asdict(h) for h in hits]}

    @app.get("/api/concept")
    async def concept_candidates(q: Annotated[str, Query(max_length=200)] = ""):
        """The features steering by concept chooses from (ranked by what they write), uncalibrated."""
        from ..conceptsteer import fixed

        if not q.strip():
            raise HTTPException(400, "empty concept: name a topic, e.g. the sea")
        atlas.require_db()

        def work():
            with atlas.compute:
                return fixed(run, q, 1.0)

        choice = await run_in_threadpool(work)
        return {"concept": choice.concept, "candidates": [
            {"features": c.features, "layer": c.layer, "label": c.label, "output_match": c.output_match,
             "context_match": c.context_match} for c in choice.candidates]}


def _steer_routes(app: FastAPI, atlas: Atlas) -> None:
    @app.post("/api/steer")
    async def steer_api(body: SteerIn):
        job = _steer_job(atlas, body)
        try:
            results = await run_in_threadpool(lambda: job.run(lambda *_: None))
        except _Cancelled:
            raise HTTPException(409, "the steering was cancelled (POST /api/steer/cancel)") from None
        return _steer_json(atlas, results[0]) if body.n == 1 else {"samples": [_steer_json(atlas, r) for r in results]}

    @app.post("/api/steer/stream")
    async def steer_stream(body: SteerIn):
        job = _steer_job(atlas, body)
        return StreamingResponse(_stream(atlas, job), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.post("/api/steer/cancel")
    def steer_cancel():
        """Stop the steering job that is running (its stream ends with a 'cancelled' line)."""
        job = atlas.steer_job
        if job is None:
            return {"cancelled": False}
        job.cancel.set()
        return {"cancelled": True}


class _Cancelled(Exception):
    """Raised from the token callback to stop a steering job."""


@dataclass
class _SteerJob:
    """One steering request, checked: `n` samples (seeds seed, seed+1, ...) of steer(); cancellable."""

    atlas: Atlas
    body: SteerIn
    features: list[str]
    concept: str | None
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, on_token) -> list:
        """The results, one per sample; `on_token(sample, which, id)` sees every new token."""
        from ..steer import steer

        b, atlas = self.body, self.atlas
        results = []
        with atlas.compute:
            atlas.steer_job = self
            try:
                atlas.check_prompt(b.prompt, extra=b.max_new_tokens)
                for i in range(b.n):
                    def tick(which, t, i=i):
                        if self.cancel.is_set():
                            raise _Cancelled()
                        on_token(i, which, t)

                    results.append(steer(atlas.run, b.prompt, self.features, concept=self.concept,
                                         concept_strength=b.concept_strength, max_new_tokens=b.max_new_tokens,
                                         greedy=b.greedy, temperature=b.temperature, seed=b.seed + i,
                                         on_token=tick))
            finally:
                atlas.steer_job = None
        return results


def _steer_job(atlas: Atlas, body: SteerIn) -> _SteerJob:
    """The request checked before anything runs (a bad feature spec is a 400, not a broken stream)."""
    from ..steer import parse_feature_spec

    features = [_with_strength(f.strip(), body.strength) for f in body.features if f.strip()]
    concept = (body.concept or "").strip() or None
    if not features and not concept:
        raise HTTPException(400, "nothing to steer: give a feature (e.g. 6:123=4) or a concept")
    atlas.check_prompt(body.prompt, extra=body.max_new_tokens)
    if body.greedy and body.n > 1:
        raise HTTPException(400, "greedy decoding gives the same text every time: untick greedy to draw "
                                 f"{body.n} samples")
    for spec in features:
        ref, idx, _, _ = parse_feature_spec(spec)  # SaescopeError: answered with 400
        sae_id = atlas.run.resolve_sae(ref)
        width = atlas.sae_info(sae_id)["width"]
        if idx >= width:
            raise HTTPException(400, f"feature {idx} in '{spec}' is out of range for SAE {sae_id} (width {width}): "
                                     f"use 0..{width - 1}")
    return _SteerJob(atlas, body, features, concept)


async def _stream(atlas: Atlas, job: _SteerJob):
    """NDJSON lines: {"type": "token", "sample", "which", "text", "n"} as tokens arrive (the text so far),
    {"type": "result", "sample", "result"} per sample, then {"type": "done"}, {"type": "cancelled"} or
    {"type": "error", "detail"}. A client that disconnects cancels the job."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    tok = atlas.scope.model.tokenizer
    ids: dict[tuple[int, str], list[int]] = {}

    def emit(item: dict | None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def on_token(sample: int, which: str, t: int) -> None:
        got = ids.setdefault((sample, which), [])
        got.append(t)
        emit({"type": "token", "sample": sample, "which": which, "n": len(got),
              "text": tok.decode(got, skip_special_tokens=True)})

    def work() -> None:
        try:
            for i, r in enumerate(job.run(on_token)):
                emit({"type": "result", "sample": i, "result": _steer_json(atlas, r)})
            emit({"type": "done"})
        except _Cancelled:
            emit({"type": "cancelled"})
        except (SaescopeError, HTTPException) as err:
            emit({"type": "error", "detail": str(getattr(err, "detail", err))})
        except Exception as err:  # noqa: BLE001 - reported in the stream, logged here
            log.exception("steering failed")
            emit({"type": "error", "detail": _internal(err)})
        finally:
            emit(None)

    loop.run_in_executor(None, work)  # not awaited: after a cancel it ends on its own at the next token
    try:
        while (item := await queue.get()) is not None:
            yield json.dumps(_finite(item), ensure_ascii=False, allow_nan=False) + "\n"
    finally:
        job.cancel.set()  # a no-op when finished; stops the model at its next token when the client went away


def _with_strength(spec: str, strength: float) -> str:
    """A feature given without a value ("6:123") gets the form's strength ("6:123=2")."""
    return spec if ("=" in spec or "@ablate" in spec) else f"{spec}={strength:g}"


def _labels(atlas: Atlas, sae_id: str, idx: int, history: bool) -> list[dict]:
    if not atlas.run.db_path.is_file():
        return []
    db = atlas.scope.db
    labels = db.labels(sae_id, idx, history=history)
    for lab in labels:
        lab["scores"] = db.scores(lab["id"])
    return labels


def _steer_json(atlas: Atlas, r) -> dict:
    effects = []
    for e in r.effects:
        effects.append({**asdict(e), "act_change": e.act_change, "prob_change": e.prob_change,
                        "label": _best_label(atlas, e.sae_id, e.idx)})
    return {"prompt": r.prompt, "unsteered": r.unsteered, "steered": r.steered,
            "interventions": [{**asdict(iv), "spec": str(iv)} for iv in r.interventions], "effects": effects,
            "ce_unsteered": r.ce_unsteered, "ce_steered": r.ce_steered, "ppl_cost": r.ppl_cost,
            "concept": asdict(r.concept) if r.concept else None}


def _best_label(atlas: Atlas, sae_id: str, idx: int) -> str | None:
    from ..scope import best_label

    return best_label(_labels(atlas, sae_id, idx, history=False))


# --------------------------------------------------------------------------- serve


def is_local(host: str) -> bool:
    return host.strip("[]") in LOCAL_HOSTS


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          log_level: str = "warning") -> None:
    """Serve the app with uvicorn until interrupted. Off localhost a token is required."""
    import uvicorn

    if not is_local(host) and not token:
        raise SaescopeError(f"serving on {host} exposes the run and the model to the network: "
                            "give --token SECRET (every request must then carry it), or use --host 127.0.0.1")
    if not 0 < int(port) < 65536:
        raise SaescopeError(f"port {port} is not a valid TCP port: use 1..65535")
    app = create_app(run_dir, token=token, allowed_hosts=None if token else LOCAL_HOSTS)
    log.warning("loading the model and SAEs of %s ...", run_dir)
    app.state.atlas.warm_up()
    uvicorn.run(app, host=host, port=int(port), log_level=log_level)


def local_url(host: str, port: int, token: str | None = None) -> str:
    """The URL to open in a browser (with the token, which the page turns into a cookie)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
