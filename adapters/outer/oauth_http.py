"""The outer gate's OAuth2 endpoints, outside the FHIR API, as HTTP (adapters/outer/oauth.py decides):
``POST /oauth/token`` (client credentials with a signed JWT assertion, a form body; answered as OAuth2 says,
``no-store``) and ``GET [base]/.well-known/smart-configuration`` (the document from adapters/outer/capability.py;
no platform data, so no platform authentication beyond the TLS handshake).  Both are served only when bearer
tokens are (the Gatekeeper has a TokenService), and both are reached before any FHIR routing or
authentication: the token endpoint is limited per source address, then by the global limit; the SMART
configuration by the global limit.  Their log events name the endpoint, never what followed it.
"""

from __future__ import annotations

import json
import time
from urllib.parse import parse_qs

import structlog
from twisted.internet import defer
from twisted.web import server

from adapters.outer.access import Gatekeeper, source
from adapters.outer.capability import SMART_CONFIGURATION, smart_configuration
from adapters.outer.http import BoundedContent
from adapters.outer.oauth import TOKEN_PATH, OAuthError
from gateway.chamber.errors import ChamberError

log = structlog.get_logger("gateway.outer")


class OAuthEndpoints:
    """The token endpoint and the SMART configuration of the gate whose FHIR base is ``base_parts`` (path
    segments), with the Gatekeeper's TokenService and rate limits."""

    def __init__(self, gatekeeper: Gatekeeper, base_parts: list[bytes]):
        self.gatekeeper = gatekeeper
        self.base_parts = base_parts

    def renderer(self, request):
        """The renderer of ``request`` when it is for one of these endpoints, else None (also when no platform
        can get a token: the endpoints are not served, and not advertised)."""
        if self.gatekeeper.oauth is None or not self.gatekeeper.oauth.clients:
            return None
        if request.path == TOKEN_PATH.encode():
            return self.render_token
        if request.path == b"/".join([b"", *self.base_parts, *SMART_CONFIGURATION]):
            return self.render_smart_configuration
        return None

    def render_token(self, request):
        started, gone = time.monotonic(), []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._token(request))
        d.addErrback(self._token_failed)
        d.addCallback(self._json_respond, request, started, gone, TOKEN_PATH)
        return server.NOT_DONE_YET

    def render_smart_configuration(self, request):
        """``GET [base]/.well-known/smart-configuration``: the global rate limit applies."""
        throttled = self.gatekeeper.throttled_global()
        if throttled is not None:
            result = 429, {"error": "too many requests"}, {"Retry-After": str(throttled.retry_after)}
        elif request.method not in (b"GET", b"HEAD"):
            result = 405, {"error": "the SMART configuration is read with GET"}, {"Allow": "GET"}
        else:
            result = 200, smart_configuration(self.gatekeeper.oauth.token_url), {}
        path = "/" + "/".join(p.decode() for p in (*self.base_parts, *SMART_CONFIGURATION))
        self._json_respond(result, request, time.monotonic(), [], path, no_store=False)
        return server.NOT_DONE_YET

    async def _token(self, request):
        def refused(status, text, headers=None):
            return status, {"error": "invalid_request", "error_description": text}, headers or {}

        throttled = self.gatekeeper.throttled_source(source(request))  # this address's limit first
        if throttled is not None:
            return 429, {"error": "temporarily_unavailable", "error_description": "too many requests"}, \
                {"Retry-After": str(throttled.retry_after)}
        if request.method != b"POST":
            return refused(405, "the token endpoint takes POST", {"Allow": "POST"})
        content = request.content
        if isinstance(content, BoundedContent) and content.overflow:
            return refused(413, f"the request body is larger than {content.limit} bytes")
        if (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower() != \
                b"application/x-www-form-urlencoded":
            return refused(400, "send the parameters as application/x-www-form-urlencoded")
        content.seek(0)
        try:
            form = parse_qs(content.read().decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                            max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return refused(400, "the form cannot be read")
        try:
            return 200, await self.gatekeeper.oauth.token_request(form, source(request)), {}
        except OAuthError as e:
            return e.status, e.body(), {}

    @staticmethod
    def _token_failed(failure):
        if failure.check(ChamberError):
            log.error("outer.chamber_unavailable", error=failure.getErrorMessage())
            return 503, {"error": "temporarily_unavailable", "error_description": "try again later"}, \
                {"Retry-After": "30"}
        log.error("outer.internal_error", error=failure.getErrorMessage(), error_type=failure.type.__name__)
        return 500, {"error": "server_error", "error_description": "internal error"}, {}

    @staticmethod
    def _json_respond(result, request, started, gone, path: str, no_store: bool = True):
        """A plain JSON answer (OAuth2 and SMART endpoints are not FHIR): status, body, headers."""
        status, body, headers = result
        log.info("outer.request", method=request.method.decode("ascii", "replace"), path=path,
                 status=status, ms=round((time.monotonic() - started) * 1000, 1))
        if gone:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        if no_store:
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"pragma", b"no-cache")
        for k, v in headers.items():
            request.setHeader(k.encode(), v.encode())
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()
