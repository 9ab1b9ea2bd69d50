"""The FastAPI app: OpenAI-compatible routes over a :class:`~secateur.serve.family.Family`.

A request goes: concurrency slot (429 + ``Retry-After`` when ``limits.max_concurrency`` requests
are in flight) → body read with a byte budget (413) → JSON (400) → typed request (400 naming the
field) → ``model`` resolved (404 listing the valid names) → a :class:`Decision` (pinned, or the
policy's) → the variant's engine (loaded on first use) → prompt tokenized and checked against the
context (400) → submitted to the engine's batcher → events collected (or streamed as server-sent
events) until the deadline (504). A failure or timeout of the chosen tier asks the policy's
``on_error`` for another tier; a finished, non-streamed answer asks its ``after`` (escalation).

Errors of every origin — ours, FastAPI's validation, Starlette's 404/405, an unexpected
exception — leave as the OpenAI error object. An ASGI middleware writes one JSON access-log line
per request (logger ``secateur.serve.access``) and the per-request metrics, reading the decision
from the response's ``x-secateur-*`` headers and what the handler noted in ``scope["state"]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, SecateurError, one_of
from ..runtime.batching import Sampling
from .config import ServeConfig
from .engine import EmbedJob, Engine, Event, GenerateJob
from .family import ROUTED, Family
from .metrics import Metrics
from .policy import Decision, Outcome, RouteRequest, build_policy
from .protocol import (APIError, ChatRequest, CompletionRequest, EmbeddingRequest, embedding_value,
                       from_validation, invalid, new_id, now, usage)
from .upstream import Answer, Failed, Forwarder

log = logging.getLogger(__name__)
access = logging.getLogger("secateur.serve.access")

JSON_TYPES = ("application/json",)
PLAIN_CHAT_STOP = "\nuser:"


# a tier's attempt failed in a way another tier may fix (timeout, engine error, an upstream down)
_Failed = Failed


def _timeout() -> _Failed:
    return _Failed("timeout", APIError(504, "the request timed out before the model finished (limits.timeout_s)",
                                       "timeout_error", None, "timeout"))


def _info(request: Request) -> dict[str, Any]:
    return request.scope.setdefault("state", {}).setdefault("secateur", {})


def plain_chat(messages: list[Any]) -> str:
    """The documented prompt for a tokenizer without a chat template: one ``role: text`` line per
    message, then ``assistant:`` (generation stops at a new ``user:`` line)."""
    return "".join(f"{m.role}: {m.text()}\n" for m in messages) + "assistant:"


class Gateway:
    """The app's state: family, policy, metrics, limits and the in-flight count."""

    def __init__(self, family: str, config: ServeConfig, home: Union[str, Path, None] = None,
                 engine_builder: Optional[Callable[[Any], Engine]] = None):
        self.config, self.limits = config, config.limits
        self.metrics = Metrics()
        self.admin_token = config.admin.secret() if config.admin.enabled else None  # refuses to start without
        self.family = Family(family, config, home, observe=self.metrics.observe, build=engine_builder)
        self.policy = build_policy(config.policy, self.family.tiers)
        self.policy_changed = time.time()
        self.in_flight = 0
        self.ready_error: Optional[str] = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.forwarder = Forwarder()

    # --- start-up and background ------------------------------------------------------------
    async def start(self) -> None:
        self.tasks.append(asyncio.create_task(self._warm()))
        if self.config.refresh_s > 0:
            self.tasks.append(asyncio.create_task(self._refresh()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await self.forwarder.close()
        self.family.close()

    async def _warm(self) -> None:
        wanted = [self.family.default_variant] + [self.family.tiers[t] for t in self.config.preload]
        for variant in dict.fromkeys(v for v in wanted if self.family.upstream(v) is None):
            try:
                await self.family.aload(variant)
            except Exception as exc:  # noqa: BLE001 - readiness reports it
                log.error("could not load variant %s: %s", variant, exc)
                if variant == self.family.default_variant:
                    self.ready_error = f"the default variant {variant} failed to load: {exc}"

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_s)
            await self.refresh()

    async def refresh(self, force: bool = False) -> Optional[str]:
        """Re-read the registry (when it changed, or ``force``), load a newly aliased default, and
        unload variants nothing points at any more. The error text when the reading failed (the
        names read before stay in use)."""
        try:
            await asyncio.to_thread(self.family.refresh, force)
        except Exception as exc:  # noqa: BLE001 - keep serving the names last read
            log.warning("registry refresh failed (serving the names read before): %s", exc)
            return str(exc)
        finally:
            self.family.sweep(self.config.unload_idle_s)
        if not self.ready() and not any(
                not t.done() and t.get_name() == "warm" for t in self.tasks):
            self.tasks = [t for t in self.tasks if not t.done()]
            self.tasks.append(asyncio.create_task(self._warm(), name="warm"))
        return None

    def set_policy(self, spec: Any) -> dict[str, Any]:
        """Replace the routing policy for new requests (requests already running keep the one they
        started with); ``spec`` is serve.yaml's ``policy`` mapping. A bad spec is a 400."""
        if not isinstance(spec, dict):
            raise invalid(f"the body must be a policy mapping like serve.yaml's `policy`, got {type(spec).__name__}",
                          code="invalid_policy")
        spec = {"kind": "static", **spec}
        try:
            policy = build_policy(spec, self.family.tiers)
        except ConfigError as exc:
            raise APIError(400, str(exc), "invalid_request_error", exc.path or "policy", "invalid_policy") from None
        except SecateurError as exc:
            raise APIError(400, str(exc), "invalid_request_error", "policy", "invalid_policy") from None
        previous, self.policy, self.policy_changed = self.policy, policy, time.time()
        log.info("policy changed through the admin API: %s -> %s", previous.describe(), policy.describe())
        return {"policy": policy.describe(), "previous": previous.describe()}

    def state(self) -> dict[str, Any]:
        """What ``GET /admin/state`` answers."""
        family = self.family
        engines = {vid: {"loaded": vid in family.engines, "in_flight": family.active.get(vid, 0),
                         "ref": family.variants[vid].ref if vid in family.variants else None}
                   for vid in sorted(set(family.engines) | set(family.active))}
        return {"family": family.name, "policy": self.policy.describe(), "policy_changed": self.policy_changed,
                "default": family.default, "default_variant": family.default_variant, "tiers": family.tiers,
                "aliases": family.aliases, "names_version": family.version, "in_flight": self.in_flight,
                "refreshed_s_ago": round(time.monotonic() - family.refreshed, 3), "variants": engines}

    async def forward(self, request: Request, decision: Decision, kind: str, stream: bool,
                      deadline: float) -> Optional[Answer]:
        """The decided tier's answer when it is an upstream (see :mod:`.upstream`), else None."""
        upstream = self.family.upstream(decision.variant)
        if upstream is None:
            return None
        return await self.forwarder.call(upstream, kind, request.scope.get("secateur_body") or {}, stream, deadline)

    def ready(self) -> bool:
        """The default variant is loaded (an upstream default is ready: it is served elsewhere)."""
        default = self.family.default_variant
        return self.family.upstream(default) is not None or self.family.engine(default) is not None

    # --- request plumbing -------------------------------------------------------------------
    def acquire(self) -> None:
        if self.in_flight >= self.limits.max_concurrency:
            raise APIError(429, f"too many requests in flight (limit {self.limits.max_concurrency}); retry later",
                           "rate_limit_error", None, "rate_limit_exceeded",
                           {"Retry-After": str(self.limits.retry_after_s)})
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)

    def release(self, request: Request) -> None:
        """The request is over: its concurrency slot and the variants it held are given back."""
        self.in_flight -= 1
        self.metrics.in_flight.set(self.in_flight)
        for variant in _info(request).pop("held", []):
            self.family.let_go(variant)

    async def body(self, request: Request, kind: type[BaseModel]) -> Any:
        """The request body as ``kind``, within the byte budget; every failure a 4xx."""
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";")[0].strip().lower()
            if media not in JSON_TYPES and not media.endswith("+json"):
                raise APIError(415, f"unsupported content type '{media[:100]}'; send Content-Type: application/json",
                               "invalid_request_error", None, "unsupported_media_type")
        budget = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise invalid("invalid Content-Length header", code="invalid_request")
            if int(declared) > budget:
                raise _too_large(budget)
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > budget:
                raise _too_large(budget)
        if not data:
            raise invalid("the request body is empty; send a JSON object", code="invalid_json")
        try:
            raw = json.loads(bytes(data), parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:
            raise invalid(f"the request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None
        if not isinstance(raw, dict):
            raise invalid(f"the request body must be a JSON object, got {type(raw).__name__}", code="invalid_json")
        request.scope["secateur_body"] = raw  # what an upstream tier is sent (never logged)
        try:
            return kind.model_validate(raw)
        except ValidationError as exc:
            raise from_validation(exc) from None
        except RecursionError:
            raise invalid("the request body is nested too deeply", code="invalid_json") from None

    def decide(self, route: RouteRequest) -> Decision:
        try:
            tier, variant = self.family.resolve(route.model)
        except KeyError:
            names = [self.family.name, ROUTED] + self.family.names()
            raise APIError(404, f"the model '{route.model[:200]}' does not exist in family '{self.family.name}'; "
                                f"valid: {one_of(names)}", "invalid_request_error", "model", "model_not_found") from None
        if tier == ROUTED:
            return (route.policy or self.policy).decide(route, self.family.view())
        return Decision(tier, variant, "pinned")

    async def engine(self, request: Request, decision: Decision, deadline: float, kind: str) -> Engine:
        """The engine of the decided variant (loaded if needed), held by the request until it ends."""
        self.family.hold(decision.variant)  # before any await: a sweep cannot unload it from here on
        _info(request).setdefault("held", []).append(decision.variant)
        try:
            engine = await asyncio.wait_for(self.family.aload(decision.variant), _left(deadline))
        except asyncio.TimeoutError:
            raise _timeout() from None
        except Exception as exc:  # noqa: BLE001 - a variant that cannot load: another tier may serve
            raise _Failed("error", APIError(503, f"variant {decision.variant} could not be loaded: {exc}",
                                            "server_error", None, "model_unavailable")) from None
        if engine.kind != kind:
            serves = "/v1/embeddings" if engine.kind == "encoder" else "/v1/completions and /v1/chat/completions"
            raise APIError(400, f"the model '{decision.tier}' ({decision.variant}) is a {engine.kind} model and serves "
                                f"{serves} only", "invalid_request_error", "model", "wrong_endpoint")
        return engine

    async def routed(self, request: Request, route: RouteRequest,
                     attempt: Callable[[Decision, float], Any]) -> tuple[Decision, Any]:
        """Run ``attempt`` on the decided tier, asking the policy what to do after a failure
        (``on_error``) or a finished non-streamed answer (``after``)."""
        deadline = time.monotonic() + self.limits.timeout_s
        route.policy = policy = self.policy  # the policy this request started with, to its end
        decision = self.decide(route)
        info = _info(request)
        per_attempt = getattr(policy, "attempt_timeout_s", None)
        while True:
            info.update(tier=decision.tier, variant=decision.variant, decision=decision.label)
            stop = min(deadline, time.monotonic() + per_attempt) if per_attempt else deadline
            started = time.monotonic()
            try:
                result = await attempt(decision, stop)
            except _Failed as failure:
                nxt = policy.on_error(route, decision, Outcome(seconds=time.monotonic() - started,
                                                                    error=failure.kind), self.family.view())
                if nxt is None or time.monotonic() >= deadline:
                    raise failure.error from None
            else:
                if route.stream:
                    return decision, result
                outcome = Outcome(logprobs=getattr(result, "logprobs_flat", []), seconds=time.monotonic() - started)
                nxt = policy.after(route, decision, outcome, self.family.view())
                if nxt is None:
                    return decision, result
            self.metrics.escalations.labels(decision.tier, nxt.tier, nxt.label).inc()
            route.tried.append(decision)
            decision = nxt


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _too_large(budget: int) -> APIError:
    return APIError(413, f"the request body is over {budget} bytes (limits.max_body_bytes)", "invalid_request_error",
                    None, "request_too_large")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _headers(decision: Decision) -> dict[str, str]:
    return {"x-secateur-tier": decision.tier, "x-secateur-variant": decision.variant,
            "x-secateur-decision": decision.label}


class _Generation:
    """What one attempt of a completion or chat produced (or is producing, when streamed)."""

    def __init__(self, job: GenerateJob, engine: Engine, prompts: list[list[int]], started: float):
        self.job, self.engine, self.prompts, self.started = job, engine, prompts, started
        n = len(prompts)
        self.texts = [""] * n
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list[float]] = [[] for _ in range(n)]
        self.top: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
        self.finish: list[Optional[str]] = [None] * n
        self.first: Optional[float] = None
        self.left = n

    @property
    def logprobs_flat(self) -> list[float]:
        return [lp for row in self.logprobs for lp in row]

    def take(self, event: Event) -> None:
        if event.kind == "error":
            raise _Failed("error", APIError(500, f"the model failed while generating: {event.error}", "server_error",
                                            None, "engine_error"))
        i = event.index
        if event.kind == "token":
            if self.first is None:
                self.first = time.perf_counter()
            self.texts[i] += event.text
            if event.token is not None:
                self.tokens[i].append(event.token)
                self.logprobs[i].append(event.logprob)
                self.top[i].append(event.top)
        elif event.kind == "done":
            self.finish[i] = event.finish
            self.left -= 1

    async def next(self, deadline: float) -> Event:
        try:
            event = await asyncio.wait_for(self.job.queue.get(), _left(deadline))
        except asyncio.TimeoutError:
            self.job.cancel()
            raise _timeout() from None
        self.take(event)
        return event

    async def collect(self, deadline: float) -> "_Generation":
        try:
            while self.left:
                await self.next(deadline)
        finally:
            if self.left:
                self.job.cancel()
        return self


def create_app(family: str, config: Optional[ServeConfig] = None, home: Union[str, Path, None] = None,
               engine_builder: Optional[Callable[[Any], Engine]] = None) -> FastAPI:
    """The gateway app for ``family`` (raises :class:`SecateurError` at once for an unknown family
    or a config whose tiers do not resolve). ``engine_builder`` (variant -> engine) replaces loading
    variants in this process (the Ray backend's engines run in their own deployments)."""
    gateway = Gateway(family, config or ServeConfig(), home, engine_builder)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title=f"secateur serve {family}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gateway
    _install_errors(app, gateway)
    app.add_middleware(_AccessLog, gateway=gateway)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Any:
        if gateway.ready():
            return {"status": "ready", "default": gateway.family.default, "variant": gateway.family.default_variant}
        message = gateway.ready_error or f"loading the default variant {gateway.family.default_variant}"
        # answered directly, not raised: polling a loading server is no error to count
        return JSONResponse(APIError(503, message, "server_error", None, "not_ready").body(), status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = gateway.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": _model_list(gateway)}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        for entry in _model_list(gateway):
            if entry["id"] == model:
                return entry
        gateway.decide(RouteRequest(model=model, kind="model"))  # raises the 404 with the valid names
        raise APIError(404, f"the model '{model}' does not exist", "invalid_request_error", "model", "model_not_found")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        gateway.acquire()
        try:
            req: CompletionRequest = await gateway.body(request, CompletionRequest)
            req.check()
            prompts = req.prompts()
            sampling = _sampling(req.temperature, req.top_p, req.seed, req.logprobs or 0)

            def encode(engine: Engine) -> list[list[int]]:
                return [_token_ids(engine, p) for p in prompts]

            return await _generate(gateway, request, req, "completion", encode, sampling, req.stops(), req.max_tokens)
        finally:
            _release_unless_streaming(gateway, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        gateway.acquire()
        try:
            req: ChatRequest = await gateway.body(request, ChatRequest)
            req.check()
            sampling = _sampling(req.temperature, req.top_p, req.seed, req.top_logprobs or 0)
            templated: dict[str, bool] = {}

            def encode(engine: Engine) -> list[list[int]]:
                tokenizer = engine.tokenizer
                if getattr(tokenizer, "chat_template", None):
                    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                    templated[engine.variant] = True
                    return [list(tokenizer(text, add_special_tokens=False)["input_ids"])]
                return [list(tokenizer(plain_chat(req.messages))["input_ids"])]

            stops = req.stops() + ((PLAIN_CHAT_STOP,) if PLAIN_CHAT_STOP not in req.stops() else ())
            return await _generate(gateway, request, req, "chat", encode, sampling, stops,
                                   req.max_completion_tokens or req.max_tokens)
        finally:
            _release_unless_streaming(gateway, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Any:
        gateway.acquire()
        try:
            req: EmbeddingRequest = await gateway.body(request, EmbeddingRequest)
            texts = req.texts(gateway.limits.max_inputs)
            route = RouteRequest(model=req.model, kind="embedding", headers=dict(request.headers), prompt=texts)
            counts: list[int] = []

            async def attempt(decision: Decision, deadline: float) -> Any:
                answer = await gateway.forward(request, decision, "embedding", False, deadline)
                if answer is not None:
                    return answer
                engine = await gateway.engine(request, decision, deadline, "encoder")
                limit = min(engine.context, gateway.limits.max_embedding_length)
                counts[:] = [len(ids) for ids in engine.tokenizer(texts)["input_ids"]]
                for i, n in enumerate(counts):
                    if n > limit:
                        raise APIError(400, f"input[{i}] has {n} tokens; this model embeds at most {limit}",
                                       "invalid_request_error", "input", "context_length_exceeded")
                job = EmbedJob(asyncio.get_running_loop(), texts)
                engine.submit(job)
                try:
                    event = await asyncio.wait_for(job.queue.get(), _left(deadline))
                except asyncio.TimeoutError:
                    job.cancel()
                    raise _timeout() from None
                if event.kind == "error":
                    raise _Failed("error", APIError(500, f"the model failed while embedding: {event.error}",
                                                    "server_error", None, "engine_error"))
                return event.embeddings

            decision, rows = await gateway.routed(request, route, attempt)
            if isinstance(rows, Answer):
                return _upstream_answer(gateway, request, req.model, decision, rows)
            total = sum(counts)
            _info(request).update(prompt_tokens=total)
            gateway.metrics.prompt_tokens.labels(decision.variant).inc(total)
            data = [{"object": "embedding", "index": i, "embedding": embedding_value(row, req.encoding_format)}
                    for i, row in enumerate(rows)]
            return JSONResponse({"object": "list", "data": data, "model": req.model,
                                 "usage": {"prompt_tokens": total, "total_tokens": total}}, headers=_headers(decision))
        finally:
            gateway.release(request)

    _admin_routes(app, gateway)
    return app


LOOPBACK = frozenset(("127.0.0.1", "::1", "localhost"))


def _admin_routes(app: FastAPI, gateway: Gateway) -> None:
    """``/admin/state`` (GET), ``/admin/policy`` (POST: a policy mapping; new requests use it) and
    ``/admin/refresh`` (POST: re-read the registry now). Off unless ``admin.enabled``; each call
    needs the bearer token and, unless ``admin.allow_remote``, must come from the loopback."""
    if gateway.admin_token is None:
        return
    import hmac

    token = gateway.admin_token.encode()

    def check(request: Request) -> None:
        host = request.client.host if request.client is not None else ""
        if not gateway.config.admin.allow_remote and host not in LOOPBACK and not host.startswith("127."):
            raise APIError(403, "the admin API answers the loopback only (admin.allow_remote is off)",
                           "permission_error", None, "forbidden")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise APIError(401, "the admin API needs `Authorization: Bearer <token>` with the server's admin token",
                           "authentication_error", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    @app.get("/admin/state")
    async def admin_state(request: Request) -> dict[str, Any]:
        check(request)
        return gateway.state()

    @app.post("/admin/policy")
    async def admin_policy(request: Request) -> dict[str, Any]:
        check(request)
        body = await gateway.body(request, _AnyJSON)
        return gateway.set_policy(body.model_dump())

    @app.post("/admin/refresh")
    async def admin_refresh(request: Request) -> Any:
        check(request)
        error = await gateway.refresh(force=True)
        if error is not None:
            raise APIError(503, f"the registry could not be read again (the names read before stay): {error}",
                           "server_error", None, "refresh_failed")
        return gateway.state()


class _AnyJSON(BaseModel):
    """A JSON object of any keys (the admin policy body: checked by :func:`build_policy`)."""

    model_config = {"extra": "allow"}


def _release_unless_streaming(gateway: Gateway, request: Request) -> None:
    if not _info(request).get("streaming"):
        gateway.release(request)


def _sampling(temperature: Optional[float], top_p: Optional[float], seed: Optional[int], top: int) -> Sampling:
    return Sampling(temperature=1.0 if temperature is None else temperature, top_p=1.0 if top_p is None else top_p,
                    seed=None if seed is None else seed % (1 << 63), top_logprobs=top)


def _token_ids(engine: Engine, prompt: Union[str, list[int]]) -> list[int]:
    if isinstance(prompt, str):
        return list(engine.tokenizer(prompt)["input_ids"])
    vocab = len(engine.tokenizer)
    bad = next((t for t in prompt if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
    return list(prompt)


async def _generate(gateway: Gateway, request: Request, req: Any, kind: str,
                    encode: Callable[[Engine], list[list[int]]], sampling: Sampling, stops: tuple[str, ...],
                    max_tokens: Optional[int]) -> Any:
    limits = gateway.limits
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise invalid(f"max_tokens {max_tokens} is over this server's limit of {limits.max_tokens} (limits.max_tokens)",
                      "max_tokens", "max_tokens_exceeded")
    stream = bool(req.stream)
    route = RouteRequest(model=req.model, kind=kind, headers=dict(request.headers), stream=stream, seed=req.seed)
    info = _info(request)

    async def attempt(decision: Decision, deadline: float) -> Union[_Generation, Answer]:
        started = time.perf_counter()
        answer = await gateway.forward(request, decision, kind, stream, deadline)
        if answer is not None:
            return answer
        engine = await gateway.engine(request, decision, deadline, "causal")
        prompts = encode(engine)
        route.prompt = prompts
        longest = max(len(p) for p in prompts)
        if longest == 0:
            raise invalid("the prompt is empty after tokenization", "prompt")
        if longest >= engine.context:
            raise APIError(400, f"this model's maximum context length is {engine.context} tokens; the prompt has "
                                f"{longest}", "invalid_request_error", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")
        wanted = max_tokens if max_tokens is not None else min(limits.default_max_tokens, engine.context - longest)
        if longest + wanted > engine.context:
            raise APIError(400, f"this model's maximum context length is {engine.context} tokens; the prompt has "
                                f"{longest} and max_tokens asks for {wanted} more", "invalid_request_error",
                           "max_tokens", "context_length_exceeded")
        job = GenerateJob(asyncio.get_running_loop(), prompts, wanted, sampling, stops, engine.tokenizer, engine.eos)
        engine.submit(job)
        generation = _Generation(job, engine, prompts, started)
        if stream:  # wait for the first token here, so a failure can still fall back or answer with a status
            try:
                await generation.next(deadline)
            except _Failed:
                job.cancel()
                raise
            return generation
        return await generation.collect(deadline)

    decision, gen = await gateway.routed(request, route, attempt)
    if isinstance(gen, Answer):
        return _upstream_answer(gateway, request, req.model, decision, gen)
    prompt_tokens = sum(len(p) for p in gen.prompts)
    if stream:
        info["streaming"] = True
        closed: list[bool] = []

        def close() -> None:  # once, whether the stream ran to its end, broke off or never started
            if not closed:
                closed.append(True)
                gen.job.cancel()
                _account(gateway, info, decision, gen, prompt_tokens)
                gateway.release(request)

        return _Stream(_stream(gateway, request, req, kind, decision, gen, prompt_tokens), close,
                       media_type="text/event-stream", headers={**_headers(decision), "Cache-Control": "no-cache"})
    _account(gateway, info, decision, gen, prompt_tokens)
    rid = new_id("cmpl" if kind == "completion" else "chatcmpl")
    choices = [_choice(kind, gen, i, req) for i in range(len(gen.prompts))]
    body = {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion", "created": now(),
            "model": req.model, "choices": choices,
            "usage": usage(prompt_tokens, sum(len(t) for t in gen.tokens))}
    return JSONResponse(body, headers=_headers(decision))


def _upstream_answer(gateway: Gateway, request: Request, model: str, decision: Decision, answer: Answer) -> Any:
    """An upstream tier's answer to the client: its JSON body (``model`` the client's name), or its
    stream relayed; our headers either way, its usage counted when it gives one."""
    info = _info(request)
    if answer.response is not None:
        info["streaming"] = True
        closed: list[bool] = []

        def close() -> None:  # also when the client left before the relay started
            if not closed:
                closed.append(True)
                asyncio.get_running_loop().create_task(answer.close())
                gateway.release(request)

        return _Stream(answer.relay(model), close, media_type="text/event-stream",
                       headers={**_headers(decision), "Cache-Control": "no-cache"})
    body = answer.client_body(model)
    used = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    prompt, completion = used.get("prompt_tokens"), used.get("completion_tokens")
    if isinstance(prompt, int):
        info["prompt_tokens"] = prompt
        gateway.metrics.prompt_tokens.labels(decision.variant).inc(prompt)
    if isinstance(completion, int):
        info["completion_tokens"] = completion
        gateway.metrics.tokens.labels(decision.variant).inc(completion)
    return JSONResponse(body, headers=_headers(decision))


def _account(gateway: Gateway, info: dict[str, Any], decision: Decision, gen: _Generation, prompt_tokens: int) -> None:
    completion = sum(len(t) for t in gen.tokens)
    info.update(prompt_tokens=prompt_tokens, completion_tokens=completion)
    gateway.metrics.tokens.labels(decision.variant).inc(completion)
    gateway.metrics.prompt_tokens.labels(decision.variant).inc(prompt_tokens)
    if gen.first is not None:
        ttft = gen.first - gen.started
        info["ttft_ms"] = round(ttft * 1000, 3)
        gateway.metrics.ttft.labels(decision.variant, decision.label).observe(ttft)


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token])


def _choice(kind: str, gen: _Generation, i: int, req: Any) -> dict[str, Any]:
    finish = "stop" if gen.finish[i] == "stop" else "length"
    if kind == "completion":
        return {"text": gen.texts[i], "index": i, "logprobs": _completion_logprobs(gen, i, 0, req),
                "finish_reason": finish}
    return {"index": i, "message": {"role": "assistant", "content": gen.texts[i]},
            "logprobs": _chat_logprobs(gen, i, 0, req), "finish_reason": finish}


def _completion_logprobs(gen: _Generation, i: int, start: int, req: Any) -> Optional[dict[str, Any]]:
    if req.logprobs is None:
        return None
    tokens = [_token_text(gen.engine, t) for t in gen.tokens[i][start:]]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = [{_token_text(gen.engine, t): lp for t, lp in top} for top in gen.top[i][start:]] if req.logprobs else None
    return {"tokens": tokens, "token_logprobs": gen.logprobs[i][start:], "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(gen: _Generation, i: int, start: int, req: Any) -> Optional[dict[str, Any]]:
    if not req.logprobs:
        return None

    def entry(token: int, lp: float) -> dict[str, Any]:
        text = _token_text(gen.engine, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for k, (token, lp) in enumerate(zip(gen.tokens[i][start:], gen.logprobs[i][start:])):
        top = gen.top[i][start + k] if start + k < len(gen.top[i]) else []
        content.append({**entry(token, lp), "top_logprobs": [entry(t, v) for t, v in top]})
    return {"content": content}


async def _stream(gateway: Gateway, request: Request, req: Any, kind: str, decision: Decision, gen: _Generation,
                  prompt_tokens: int) -> AsyncIterator[bytes]:
    """Server-sent events: one ``data: {chunk}`` per token event, a last chunk per choice with its
    finish reason, the usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``."""
    info = _info(request)
    rid = new_id("cmpl" if kind == "completion" else "chatcmpl")
    created, obj = now(), ("text_completion" if kind == "completion" else "chat.completion.chunk")
    deadline = time.monotonic() + gateway.limits.timeout_s - (time.perf_counter() - gen.started)
    sent = [0] * len(gen.prompts)  # tokens already described in a chunk's logprobs

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    def choice(i: int, text: str, finish: Optional[str]) -> dict[str, Any]:
        reason = None if finish is None else ("stop" if finish == "stop" else "length")
        if kind == "completion":
            logprobs = _completion_logprobs(gen, i, sent[i], req)
            sent[i] = len(gen.tokens[i])
            return {"text": text, "index": i, "logprobs": logprobs, "finish_reason": reason}
        logprobs = _chat_logprobs(gen, i, sent[i], req)
        sent[i] = len(gen.tokens[i])
        delta = {"content": text} if text or finish is None else {}
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    try:
        if kind == "chat":
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(len(gen.prompts))])
        pending = [(gen.texts[i], None, i) for i in range(len(gen.prompts)) if gen.texts[i] or gen.tokens[i]]
        gen.texts = [""] * len(gen.prompts)
        for text, _, i in pending:
            yield chunk([choice(i, text, None)])
        while gen.left:
            try:
                event = await gen.next(deadline)
            except _Failed as failure:
                gateway.metrics.errors.labels(failure.error.code or failure.kind).inc()
                info["error"] = failure.error.code
                yield f"data: {json.dumps(failure.error.body())}\n\n".encode()
                break
            if event.kind == "token" and (event.text or event.token is not None):
                gen.texts[event.index] = ""
                yield chunk([choice(event.index, event.text, None)])
            elif event.kind == "done":
                yield chunk([choice(event.index, "", event.finish or "length")])
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk([], usage=usage(prompt_tokens, sum(len(t) for t in gen.tokens)))
        yield b"data: [DONE]\n\n"
    finally:
        gen.job.cancel()


class _Stream(StreamingResponse):
    """A streamed answer that runs ``on_close`` when it ends, even when the client left before the
    first byte (an async generator that never started would run no ``finally``)."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _model_list(gateway: Gateway) -> list[dict[str, Any]]:
    family = gateway.family
    out = [{"id": family.name, "object": "model", "created": 0, "owned_by": "secateur",
            "secateur": {"kind": "routed", "policy": gateway.policy.describe(), "default": family.default}}]
    for name in family.names():
        tier, variant = family.resolve(name)
        kind = "tier" if name in family.tiers else "alias" if tier in family.aliases else "variant"
        ref = family.variants[variant].ref if variant in family.variants else variant
        upstream = family.upstream(variant)
        entry = {"kind": kind, "variant": variant, "ref": ref, "loaded": family.engine(variant) is not None}
        if upstream is not None:
            entry.update(kind="upstream", url=upstream.url, upstream_model=upstream.model)
        out.append({"id": name, "object": "model", "created": 0, "owned_by": "secateur", "secateur": entry})
    return out


def _error_response(gateway: Gateway, error: APIError) -> JSONResponse:
    gateway.metrics.errors.labels(error.code or error.type).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _install_errors(app: FastAPI, gateway: Gateway) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        _info(request)["error"] = exc.code
        return _error_response(gateway, exc)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = APIError(404, f"unknown path {request.url.path[:200]}; the gateway serves /v1/completions, "
                                  "/v1/chat/completions, /v1/embeddings, /v1/models, /health, /ready, /metrics",
                             "invalid_request_error", None, "unknown_url")
        elif exc.status_code == 405:
            error = APIError(405, f"method {request.method} is not allowed on {request.url.path[:200]}",
                             "invalid_request_error", None, "method_not_allowed", dict(exc.headers or {}))
        else:
            error = APIError(exc.status_code, str(exc.detail), "invalid_request_error", None, None)
        return await api_error(request, error)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return await api_error(request, APIError(500, f"internal error: {type(exc).__name__}", "server_error", None,
                                                 "internal_error"))


class _AccessLog:
    """Pure ASGI middleware: one JSON line per request and the request metrics (see the module text)."""

    QUIET = frozenset(("/health", "/ready", "/metrics"))

    def __init__(self, app: Any, gateway: Gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        info = scope.setdefault("state", {}).setdefault("secateur", {})
        status = [0]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            seconds = time.perf_counter() - start
            path = scope.get("path", "")
            if path not in self.QUIET:  # probes and scrapes: no access-log line
                self._record(scope, path, status[0] or 500, seconds, info)

    def _record(self, scope: dict[str, Any], path: str, status: int, seconds: float, info: dict[str, Any]) -> None:
        metrics = self.gateway.metrics
        endpoint = path if path.startswith("/v1/") and len(path) < 40 else "other"
        variant, decision = info.get("variant", ""), info.get("decision", "")
        if variant:
            metrics.latency.labels(variant, decision, endpoint).observe(seconds)
        metrics.requests.labels(variant, decision, endpoint, str(status)).inc()
        line = {"ts": round(time.time(), 3), "method": scope.get("method"), "path": path[:200], "status": status,
                "latency_ms": round(seconds * 1000, 3), "tier": info.get("tier"), "variant": variant or None,
                "decision": decision or None, **{k: info[k] for k in ("prompt_tokens", "completion_tokens", "ttft_ms",
                                                                         "error") if k in info}}
        access.info(json.dumps(line, separators=(",", ":")))


__all__ = ["create_app", "Gateway", "plain_chat"]
