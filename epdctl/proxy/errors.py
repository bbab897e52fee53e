"""How the proxy answers an error: OpenAI-style JSON bodies, aiohttp's own refusals in the same
shape, and the short descriptions of a backend's failure that go into them (docs/proxy.md)."""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any, Optional

from aiohttp import web
from aiohttp.http import HttpProcessingError

log = logging.getLogger("epdctl.proxy")


class StageError(Exception):
    """A request that must end with an error status. `body` passes a backend's own answer on."""

    def __init__(self, status: int, message: str, body: Optional[bytes] = None, content_type: str = "application/json"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body
        self.content_type = content_type

    def response(self, request_id: str) -> web.Response:
        headers = {"X-Request-Id": request_id}
        if self.body is not None:
            return web.Response(status=self.status, body=self.body, content_type=self.content_type, headers=headers)
        return error_response(self.message, self.status, headers)


ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge",
               417: "ExpectationFailed",
               502: "BadGatewayError", 503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}


def error_body(message: str, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": None, "code": status}}


def error_response(message: str, status: int, headers: Optional[dict] = None) -> web.Response:
    return web.json_response(error_body(message, status), status=status, headers=headers)


class JsonErrors(web.RequestHandler):
    """aiohttp's own error answers as the OpenAI-style JSON of every other error: a request its HTTP
    parser refused (two Content-Lengths, Content-Length with Transfer-Encoding, an obs-fold, a
    header line over 8 KiB, a bad method), and a handler's exception. aiohttp still frames the
    answer, and closes the connection after it."""

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: Optional[BaseException] = None,
                     message: Optional[str] = None) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            # A client's malformed bytes: one line in the log, not aiohttp's ERROR with a traceback.
            reason = (message or str(exc)).strip().split("\n", 1)[0].rstrip(":")[:120]
            log.info("refused a malformed HTTP request from %s: %s", request.remote, reason)
            text = f"malformed HTTP request: {reason}"
        else:
            super().handle_error(request, status, exc, message)  # logs it, and refuses once bytes are out
            text = HTTPStatus(status).phrase
        response = error_response(text, status)
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """web.Server whose connections answer aiohttp's own errors in JSON (JsonErrors)."""

    def __call__(self) -> web.RequestHandler:
        # As web.Server makes its RequestHandler, with the subclass instead.
        return JsonErrors(self, loop=self._loop, **self._kwargs)


def too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (raise the proxy's max_body_mb)"


def snippet(data: bytes, limit: int = 300) -> str:
    text = data.decode(errors="replace").strip()
    try:
        parsed = json.loads(text)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            text = str(parsed["error"].get("message", text))
        elif isinstance(parsed, dict) and "detail" in parsed:
            text = str(parsed["detail"])
    except ValueError:
        pass
    return text[:limit] or "(empty body)"


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text
