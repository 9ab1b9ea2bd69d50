"""Upstream tiers: a tier served by another OpenAI-compatible server (vLLM serving a
compressed-tensors export, another secateur gateway, any ``/v1`` endpoint).

A request routed to such a tier is forwarded over HTTP (httpx) to the upstream's
``/v1/completions``, ``/v1/chat/completions`` or ``/v1/embeddings`` with its own body, ``model``
replaced by the upstream's name for it; the answer comes back with this gateway's headers
(``x-secateur-variant: upstream:<url>#<model>``), its ``model`` set back to the name the client
asked for, in the access log and metrics like any other. Streamed answers are relayed event by
event.

Failures: the upstream's own 4xx (a bad request for it: too many tokens, an unknown parameter) is
relayed with its status and error object, and no other tier is tried; a connection error, a
timeout, a 429 or a 5xx counts as a failure of the tier, so a ``fallback`` policy moves to the
next tier, and otherwise the client gets a 502 (504 for a timeout) with an OpenAI error object.
For a non-streamed completion or chat the gateway asks the upstream for the tokens'
log-probabilities (and removes them again unless the client asked), so a confidence cascade can
read them whichever tier answered.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator, Optional

from .config import Upstream
from .protocol import APIError

PATHS = {"completion": "/completions", "chat": "/chat/completions", "embedding": "/embeddings"}


class Failed(Exception):
    """A tier's failure the policy may answer (``kind``: error or timeout), with the error the
    client gets when no other tier does."""

    def __init__(self, kind: str, error: APIError):
        super().__init__(error.message)
        self.kind, self.error = kind, error


class Answer:
    """What an upstream answered: a JSON ``body``, or an open streamed ``response``."""

    def __init__(self, upstream: Upstream, body: Optional[dict[str, Any]] = None, response: Any = None,
                 strip_logprobs: bool = False):
        self.upstream, self.body, self.response = upstream, body, response
        self.strip_logprobs = strip_logprobs
        self.logprobs_flat = _logprobs(body) if body is not None else []

    def client_body(self, model: str) -> dict[str, Any]:
        body = dict(self.body or {})
        body["model"] = model
        if self.strip_logprobs:
            body["choices"] = [{**c, "logprobs": None} if isinstance(c, dict) else c for c in body.get("choices") or []]
        return body

    async def relay(self, model: str) -> AsyncIterator[bytes]:
        """The upstream's server-sent events, each ``data:`` chunk's ``model`` set to ``model``; an
        upstream that fails or stalls mid-stream ends it with an error event and ``[DONE]``."""
        import httpx

        try:
            async for line in self.response.aiter_lines():
                if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                    try:
                        chunk = json.loads(line[5:])
                    except ValueError:
                        yield (line + "\n").encode()
                        continue
                    if isinstance(chunk, dict) and "model" in chunk:
                        chunk["model"] = model
                    yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n".encode()
                else:
                    yield (line + "\n").encode()
        except httpx.HTTPError as exc:
            code = "timeout" if isinstance(exc, httpx.TimeoutException) else "upstream_error"
            error = {"message": f"upstream {self.upstream.url} ({self.upstream.model}) failed mid-stream: "
                                f"{type(exc).__name__}", "type": "server_error", "param": None, "code": code}
            yield f"\ndata: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()
        finally:
            await self.response.aclose()

    async def close(self) -> None:
        if self.response is not None:
            await self.response.aclose()


def _logprobs(body: dict[str, Any]) -> list[float]:
    """Every answered token's log-probability in a completions or chat body (what a cascade reads)."""
    out: list[float] = []
    for choice in body.get("choices") or []:
        lp = choice.get("logprobs") if isinstance(choice, dict) else None
        if not isinstance(lp, dict):
            continue
        if isinstance(lp.get("token_logprobs"), list):
            out += [float(v) for v in lp["token_logprobs"] if isinstance(v, (int, float))]
        elif isinstance(lp.get("content"), list):
            out += [float(c["logprob"]) for c in lp["content"] if isinstance(c, dict)
                    and isinstance(c.get("logprob"), (int, float))]
    return out


def _upstream_error(upstream: Upstream, status: int, raw: bytes, retry_after: Optional[str]) -> Exception:
    """The upstream's error answer as what the gateway does with it (see the module text)."""
    try:
        err = json.loads(raw).get("error") or {}
        err = err if isinstance(err, dict) else {"message": str(err)}
    except (ValueError, AttributeError):
        err = {}
    message = str(err.get("message") or raw[:300].decode("utf-8", "replace") or f"HTTP {status}")
    where = f"upstream {upstream.url} ({upstream.model})"
    if status == 429:
        return Failed("error", APIError(429, f"{where} is busy: {message}", "server_error", None, "upstream_busy",
                                        {"Retry-After": retry_after} if retry_after else None))
    if status >= 500 or status < 400:
        return Failed("error", APIError(502, f"{where} failed with HTTP {status}: {message}", "server_error", None,
                                        "upstream_error"))
    return APIError(status, message, str(err.get("type") or "invalid_request_error"),
                    err.get("param") if isinstance(err.get("param"), str) else None,
                    err.get("code") if isinstance(err.get("code"), str) else None)


class Forwarder:
    """One pooled HTTP client for every upstream tier of a gateway."""

    def __init__(self) -> None:
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(timeout=None, follow_redirects=False)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def call(self, upstream: Upstream, kind: str, payload: dict[str, Any], stream: bool,
                   deadline: float) -> Answer:
        """Forward one request (``deadline`` on the monotonic clock) and return the upstream's answer."""
        import httpx

        payload = dict(payload)
        payload["model"] = upstream.model
        strip = False
        if not stream and kind == "completion" and payload.get("logprobs") is None:
            payload["logprobs"], strip = 0, True
        elif not stream and kind == "chat" and not payload.get("logprobs"):
            payload["logprobs"], strip = True, True
        headers = {"content-type": "application/json", "accept": "text/event-stream" if stream else "application/json"}
        try:
            key = upstream.key()
        except Exception as exc:  # noqa: BLE001 - a missing key is this tier's failure, not the client's
            raise Failed("error", APIError(502, str(exc), "server_error", None, "upstream_misconfigured")) from None
        if key:
            headers["authorization"] = f"Bearer {key}"
        left = deadline - time.monotonic()
        if upstream.timeout_s is not None:
            left = min(left, upstream.timeout_s)
        if left <= 0:
            raise Failed("timeout", APIError(504, "the request timed out before the upstream was asked", "server_error",
                                             None, "timeout"))
        url = upstream.url.rstrip("/") + PATHS[kind]
        where = f"upstream {upstream.url} ({upstream.model})"
        client = self.client()
        try:
            request = client.build_request("POST", url, json=payload, headers=headers, timeout=httpx.Timeout(left))
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise Failed("timeout", APIError(504, f"{where} did not answer within {left:.1f} s", "server_error", None,
                                             "timeout")) from None
        except httpx.HTTPError as exc:
            raise Failed("error", APIError(502, f"{where} could not be reached: {type(exc).__name__}: {exc}",
                                           "server_error", None, "upstream_unavailable")) from None
        if response.status_code != 200:
            try:
                raw = await response.aread()
            except httpx.HTTPError:
                raw = b""
            finally:
                await response.aclose()
            raise _upstream_error(upstream, response.status_code, raw, response.headers.get("retry-after"))
        if stream:
            return Answer(upstream, response=response)
        try:
            raw = await response.aread()
            body = json.loads(raw)
        except httpx.TimeoutException:
            raise Failed("timeout", APIError(504, f"{where} did not finish its answer within {left:.1f} s",
                                             "server_error", None, "timeout")) from None
        except (httpx.HTTPError, ValueError) as exc:
            raise Failed("error", APIError(502, f"{where} sent an unreadable answer: {exc}", "server_error", None,
                                           "upstream_error")) from None
        finally:
            await response.aclose()
        if not isinstance(body, dict):
            raise Failed("error", APIError(502, f"{where} answered {type(body).__name__}, not a JSON object",
                                           "server_error", None, "upstream_error"))
        return Answer(upstream, body=body, strip_logprobs=strip)


__all__ = ["Answer", "Failed", "Forwarder", "PATHS"]
