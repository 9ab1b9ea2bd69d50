"""``secateur serve FAMILY --backend ray``: the same gateway as a Ray Serve application.

The backend runs one **ingress** application and one application per variant of the family:

* the ingress (application ``secateur`` at ``/``, deployment ``gateway``) runs the very app
  :func:`secateur.serve.app.create_app` builds — the OpenAI routes, limits, errors, metrics, the
  registry polling and the routing policies — wrapped with ``serve.ingress``; only its engines
  differ: a :class:`RemoteEngine` keeps the variant's tokenizer (prompts are tokenized and checked
  against the context in the ingress, as locally) and sends the work to the variant's deployment
  through a deployment handle;
* each variant (application and deployment ``variant-<id>``, no HTTP route, :class:`VariantServer`)
  loads its model on first use and runs it in the same batching engine the local gateway uses
  (concurrent requests share forward passes inside the replica); generation is a streaming call
  whose events (text deltas, tokens, log-probabilities, finish reasons) go back to the ingress as
  they are produced, so ``stream: true`` streams through Ray too. A variant that no tier or alias
  references any more is unloaded inside its deployment (its replica stays, with no model in
  memory).

One application per variant (rather than one application holding every deployment) lets a
variant registered while the gateway runs be added without redeploying the others: the command's
driver polls the registry every ``refresh_s`` and deploys an application for each new variant;
the ingress, when an alias moves to it, waits for its handle. Replicas declare ``num_cpus``
(default 0: on one machine they share its cores, and torch's threads do the work);
``--ray-address`` joins an existing cluster instead of starting a local instance. Ray Serve is
imported only here, and only for this backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import SecateurError, did_you_mean, one_of
from .config import ServeConfig
from .engine import EmbedJob, Engine, Event, GenerateJob

log = logging.getLogger(__name__)

APP_NAME = "secateur"


def deployment_name(variant_id: str) -> str:
    return f"variant-{variant_id}"


def _need_ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SecateurError("the Ray backend needs Ray Serve: pip install 'secateur[ray]'") from None
    return ray, serve


class VariantServer:
    """One variant in its own deployment: loaded on first use, run by the local batching engine."""

    def __init__(self, family: str, variant_id: str, config: dict[str, Any], home: Optional[str]):
        self.family, self.variant_id, self.home = family, variant_id, home
        self.config = ServeConfig.from_dict(config)
        self.engine: Optional[Engine] = None
        self.lock = threading.Lock()

    def _engine(self) -> Engine:
        with self.lock:
            if self.engine is None:
                from .engine import EncoderEngine, LMEngine
                from .family import load_model, open_registry

                with open_registry(self.home) as registry:
                    variant = registry.resolve(self.variant_id)
                model, tokenizer, kind = load_model(variant)
                batching = self.config.batching
                common = {"window_ms": batching.window_ms, "max_batch": batching.max_batch}
                self.engine = (EncoderEngine(variant.id, model, tokenizer,
                                             max_length=self.config.limits.max_embedding_length, **common)
                               if kind == "encoder" else LMEngine(variant.id, model, tokenizer, **common))
                log.info("variant %s loaded in its deployment", self.variant_id)
            return self.engine

    async def generate(self, prompts: list[list[int]], max_new: int, sampling: dict[str, Any], stops: list[str]) -> Any:
        """Stream the job's events as plain dicts (see :class:`secateur.serve.engine.Event`)."""
        from ..runtime.batching import Sampling

        engine = await asyncio.to_thread(self._engine)
        job = GenerateJob(asyncio.get_running_loop(), prompts, max_new, Sampling(**sampling), tuple(stops),
                          engine.tokenizer, engine.eos)
        engine.submit(job)
        left = len(prompts)
        try:
            while left:
                event = await job.queue.get()
                yield {"kind": event.kind, "index": event.index, "text": event.text, "token": event.token,
                       "logprob": event.logprob, "top": [list(t) for t in event.top], "finish": event.finish,
                       "error": None if event.error is None else f"{type(event.error).__name__}: {event.error}"}
                if event.kind == "done":
                    left -= 1
                elif event.kind == "error":
                    return
        finally:
            job.cancel()

    async def embed(self, texts: list[str]) -> list[list[float]]:
        engine = await asyncio.to_thread(self._engine)
        job = EmbedJob(asyncio.get_running_loop(), texts)
        engine.submit(job)
        event = await job.queue.get()
        if event.kind == "error":
            raise RuntimeError(f"{type(event.error).__name__}: {event.error}")
        return [row.tolist() for row in event.embeddings]

    def unload(self) -> bool:
        with self.lock:
            if self.engine is None:
                return False
            self.engine.close()
            self.engine = None
            return True


class RemoteEngine:
    """The ingress's engine for a variant served by its own deployment: the local engine's
    interface (``kind``, ``tokenizer``, ``context``, ``eos``, ``submit``, ``close``) over a handle."""

    def __init__(self, variant: Any, handle: Any):
        from .engine import _context_length

        import transformers

        from ..models.arch import arch_for

        config = transformers.AutoConfig.from_pretrained(variant.path)
        try:
            self.kind = arch_for(config.model_type).kind
        except SecateurError:
            self.kind = "causal"
        self.variant, self.handle = variant.id, handle
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(variant.path)
        except (OSError, ValueError):
            raise SecateurError(f"variant {variant.ref} ({variant.id}) has no tokenizer; serving needs one") from None
        holder = type("Config", (), {"config": config})()
        self.context = _context_length(holder, self.tokenizer)
        eos = None
        try:
            eos = transformers.GenerationConfig.from_pretrained(variant.path).eos_token_id
        except OSError:
            pass
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.tasks: set[asyncio.Task[Any]] = set()

    def submit(self, job: Any) -> None:
        task = job.loop.create_task(self._run(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, job: Any) -> None:
        try:
            if isinstance(job, GenerateJob):
                s = job.sampling
                sampling = {"temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                            "top_logprobs": s.top_logprobs}
                stream = self.handle.options(stream=True).generate.remote(job.prompts, job.max_new, sampling,
                                                                          list(job.stops))
                try:
                    async for ev in stream:
                        if job.cancelled:
                            break
                        error = RuntimeError(ev["error"]) if ev.get("error") else None
                        job.queue.put_nowait(Event(ev["kind"], ev["index"], ev["text"], ev["token"], ev["logprob"],
                                                   [tuple(t) for t in ev["top"]], ev["finish"], error))
                finally:
                    stream.cancel()
            elif isinstance(job, EmbedJob):
                import torch

                rows = await self.handle.embed.remote(job.texts)
                job.queue.put_nowait(Event("done", embeddings=[torch.tensor(r) for r in rows]))
        except Exception as exc:  # noqa: BLE001 - the request gets an engine error; another tier may serve
            log.warning("variant %s: the deployment failed: %s", self.variant, exc)
            job.queue.put_nowait(Event("error", error=exc))

    def close(self) -> None:
        """Unloaded by the gateway: the deployment drops its model (its replica stays)."""
        for task in list(self.tasks):
            task.cancel()
        try:
            self.handle.unload.remote()
        except Exception as exc:  # noqa: BLE001 - shutting down
            log.debug("unload of %s not sent: %s", self.variant, exc)


def _handle(variant_id: str, wait_s: float = 120.0) -> Any:
    """The handle of a variant's application; a variant registered after the start is deployed by
    the driver (:func:`serve_on_ray` polls the registry), so wait for it a while."""
    from ray import serve

    end = time.monotonic() + wait_s
    while True:
        name = deployment_name(variant_id)
        try:
            return serve.get_deployment_handle(name, app_name=name)
        except Exception:  # noqa: BLE001 - not deployed yet (Ray raises RayServeException or KeyError)
            if time.monotonic() > end:
                raise SecateurError(f"no Ray Serve application {name} for variant {variant_id} after "
                                    f"{wait_s:.0f} s") from None
            time.sleep(0.5)


def _ingress_app(family: str, config: dict[str, Any], home: Optional[str]) -> Any:
    """Evaluated in the ingress replica: the gateway app whose engines are the variant deployments."""
    from .app import create_app

    def build(variant: Any) -> RemoteEngine:  # runs in a worker thread (Family.aload)
        return RemoteEngine(variant, _handle(variant.id))

    return create_app(family, ServeConfig.from_dict(config), home, engine_builder=build)


def _variants(family: str, home: Optional[str]) -> list[str]:
    from .family import open_registry

    with open_registry(home) as registry:
        families = registry.families()
        if family not in families:
            raise SecateurError(f"unknown family '{family}'{did_you_mean(family, families)}; "
                                f"families in {registry.home}: {one_of(families) if families else 'none'}")
        return [v.id for v in registry.list(family)]


def variant_application(family: str, variant_id: str, config: dict[str, Any], home: Optional[str],
                        num_cpus: float = 0.0) -> Any:
    """One variant's Ray Serve application (``variant-<id>``, no HTTP route): its ``VariantServer``."""
    ray, serve = _need_ray()
    return (serve.deployment(VariantServer, name=deployment_name(variant_id), ray_actor_options={"num_cpus": num_cpus})
            .bind(family, variant_id, config, home))


def application(family: str, config: dict[str, Any], home: Optional[str], num_cpus: float = 0.0) -> Any:
    """The ingress application (``secateur``, at ``/``): the gateway app wrapped by ``serve.ingress``."""
    ray, serve = _need_ray()
    _variants(family, home)  # an unknown family fails here, before anything is deployed

    def build_app() -> Any:  # a plain function: Ray Serve calls it in the replica for the ASGI app
        return _ingress_app(family, config, home)

    @serve.ingress(build_app)
    class Gateway:
        pass

    return serve.deployment(Gateway, name="gateway", ray_actor_options={"num_cpus": num_cpus}).bind()


def _deploy_new(family: str, config: dict[str, Any], home: Optional[str], num_cpus: float, done: set[str]) -> None:
    """Deploy an application for each of the family's variants not deployed yet."""
    from ray import serve

    for vid in _variants(family, home):
        if vid not in done:
            serve.run(variant_application(family, vid, config, home, num_cpus), name=deployment_name(vid),
                      route_prefix=None)
            done.add(vid)
            log.info("variant %s deployed as Ray Serve application %s", vid, deployment_name(vid))


def _check(family: str, config: ServeConfig, home: Optional[str]) -> None:
    """The local backend's start-up checks (the family, its tiers, the policy), before Ray is
    imported: the same one-line errors, not a deployment that fails inside Ray."""
    from .family import Family
    from .policy import build_policy

    names = Family(family, config, home)
    try:
        build_policy(config.policy, names.tiers)
    finally:
        names.close()


def serve_on_ray(family: str, config: Union[str, Path, None] = None, *, host: str = "127.0.0.1", port: int = 8000,
                 home: Union[str, Path, None] = None, address: Optional[str] = None, num_cpus: float = 0.0) -> None:
    """Run the applications until SIGINT or SIGTERM, then shut Serve (and a Ray started here) down.

    Every variant of the family is its own application (``variant-<id>``); the ingress is the
    application ``secateur``. While it runs, the registry is polled every ``refresh_s`` and a
    variant registered since gets its application, so an alias moved to it is served."""
    import yaml

    cfg_raw: dict[str, Any] = {}
    parsed = ServeConfig()
    if config is not None:
        parsed = ServeConfig.load(config)  # one-line errors before anything starts
        cfg_raw = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    cfg_raw.pop("access_log", None)  # the replicas log through Ray's own logging
    home_s = str(Path(home).expanduser()) if home is not None else os.environ.get("SECATEUR_HOME")
    _check(family, parsed, home_s)
    ray, serve = _need_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k.startswith(("SECATEUR_", "HF_")) or k == "PYTHONPATH"}})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which may install its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        deployed: set[str] = set()
        _deploy_new(family, cfg_raw, home_s, num_cpus, deployed)
        serve.run(application(family, cfg_raw, home_s, num_cpus), name=APP_NAME, route_prefix="/")
        log.info("serving family '%s' on Ray Serve at http://%s:%d", family, host, port)
        poll = parsed.refresh_s or None
        while not stop.wait(poll):
            try:
                _deploy_new(family, cfg_raw, home_s, num_cpus, deployed)
            except Exception as exc:  # noqa: BLE001 - keep serving what is deployed
                log.warning("new variants not deployed: %s", exc)
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()


__all__ = ["VariantServer", "RemoteEngine", "application", "variant_application", "serve_on_ray", "deployment_name",
           "APP_NAME"]
