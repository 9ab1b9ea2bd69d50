"""The serving room: one OpenAI-compatible endpoint for a family of variants.

``secateur serve FAMILY [--config serve.yaml]`` starts :func:`serve`: a FastAPI app
(:func:`create_app`) on uvicorn that answers ``/v1/completions``, ``/v1/chat/completions`` (both
streamed as server-sent events on ``stream: true``), ``/v1/embeddings``, ``/v1/models``,
``/health``, ``/ready`` and ``/metrics``. A request's ``model`` names the family (the routing
policy decides), a tier of serve.yaml, an alias or a variant. docs/serve.md is the user's page.

Files, top to bottom of a request:

- ``config.py``    serve.yaml as frozen dataclasses (tiers, policy, batching, limits);
- ``app.py``       routes, limits, error objects, streaming, access log (FastAPI);
- ``protocol.py``  the OpenAI request types (pydantic) and error object;
- ``policy.py``    the routing policy interface (decide / on_error / after) and its
                   ``static``, ``fallback``, ``sticky``, ``canary`` and ``cascade`` policies;
- ``family.py``    names → variant ids from the registry (polled every ``refresh_s``), the
                   loaded variants, which requests hold them, unloading the unreferenced;
- ``engine.py``    one worker thread per variant: continuous batching of decoding
                   (:class:`secateur.runtime.batching.DecodeBatch`) and batched embeddings;
- ``metrics.py``   the Prometheus metrics, in a registry per app;
- ``routing.py``   offline: the cascade's thresholds calibrated on calibration-split prompts
                   (``secateur route-calibrate``);
- ``bench.py``     ``secateur bench-serve``: a bounded loopback load.

The room imports the registry, artifacts and the runtime (never the pipeline or evaluation); the
web stack (fastapi, uvicorn, prometheus-client: ``pip install secateur[serve]``) is imported only
when a server is made, never by ``import secateur``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import SecateurError

log = logging.getLogger(__name__)


def _need_web_stack() -> None:
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SecateurError(f"serving needs {', '.join(missing)}; install them with `pip install 'secateur[serve]'`")


def create_app(family: str, config: Any = None, home: Union[str, Path, None] = None) -> Any:
    """The gateway's FastAPI app for ``family`` (a :class:`~secateur.serve.config.ServeConfig`, a
    path to serve.yaml, or None for the defaults)."""
    _need_web_stack()
    from .app import create_app as make
    from .config import ServeConfig

    if config is None or isinstance(config, (str, Path)):
        config = ServeConfig.load(config) if config is not None else ServeConfig()
    return make(family, config, home)


def serve(family: str, config: Union[str, Path, None] = None, *, host: str = "127.0.0.1", port: int = 8000,
          home: Union[str, Path, None] = None) -> None:
    """Serve ``family`` on ``host:port`` until interrupted. The family, the config and its tiers are
    checked before the socket opens (one-line errors); the default variant loads in the background
    (``/ready`` answers 200 once it is in)."""
    from .config import ServeConfig

    cfg = ServeConfig.load(config) if config is not None else ServeConfig()
    if not 0 <= port <= 65535:
        raise SecateurError(f"port must be in 0-65535, got {port}")
    app = create_app(family, cfg, home)
    _access_log(cfg.access_log)
    import uvicorn

    log.info("serving family '%s' on http://%s:%d", family, host, port)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=5)


def _access_log(path: Optional[str]) -> None:
    """One JSON line per request: to ``path`` (appended) or standard error."""
    import sys

    logger = logging.getLogger("secateur.serve.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler: logging.Handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)


__all__ = ["serve", "create_app"]
