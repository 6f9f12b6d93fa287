"""The outer gate's HTTP edge: twisted.web's site, channel and request, holding every request to the gate's limits
before the FHIR API (adapters/outer/site.py) sees it.

A connection's deadlines (``outer.*``; none is reset by a byte that trickles in)::

    until a request's first byte      idle_timeout (after the TLS handshake, and between keep-alive requests)
    first byte -> end of headers      header_timeout                                    408, then closed
    end of headers -> end of body     body_timeout                                      408, then closed
    while the API answers             none here (the API answers within outer.answer_within)
    once the gateway closes it        CLOSE_GRACE to read the answer and go (what it still sends is dropped),
                                      then the connection is cut

When a request's headers are in, before a byte of its body is read, the API decides everything that needs no
body (``FhirApi.admit``: rate limits, identity, route, method, scope) and the declared size is checked against
``outer.max_request_bytes``.  A request refused there is answered at once — not with ``100 Continue`` — and its
connection is closed after the answer: its body is never read.  A chunked body is cut off with 413 as soon as
it passes the limit.  Each such request is logged once as ``outer.body_cut`` with the body bytes taken.

What twisted.web answered by itself (a bare 400; nothing at all, a closed connection, for a line past 16 KiB)
is answered here with an OperationOutcome: 400 a malformed request line, header or chunked encoding (or two
lengths), 408 too slow, 413 too large, 414 a request line past MAX_HEADER_BYTES, 417 an ``Expect`` other than
100-continue, 431 more than MAX_HEADERS headers or MAX_HEADER_BYTES of them, 501 a Transfer-Encoding other
than chunked, 500 whatever escaped the API.  No answer names the server software (no ``Server`` header).
"""

from __future__ import annotations

import io
import json
from urllib.parse import unquote_to_bytes

import structlog
from twisted.protocols import basic
from twisted.web import http, server

from adapters.outer.errors import FHIR_JSON, operation_outcome

log = structlog.get_logger("gateway.outer")

#: most header lines in one request
MAX_HEADERS = 100
#: most bytes of a request line and its headers together (and of any one line)
MAX_HEADER_BYTES = 16384
#: seconds a connection the gateway closes has to read its answer and go before it is cut
CLOSE_GRACE = 5.0


class BoundedContent(io.BytesIO):
    """Request body sink that keeps at most ``limit`` bytes and remembers that more came."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.overflow = False

    def write(self, data) -> int:
        if self.overflow or self.tell() + len(data) > self.limit:
            if not self.overflow:
                self.overflow = True
                self.seek(0)
                self.truncate()
            return len(data)
        return super().write(data)


class GatewayRequest(server.Request):
    """A request of the outer gate: its body kept in a BoundedContent, the API asked to admit it before the body
    is read, none of twisted.web's own HTML or bare answers."""

    def gotLength(self, length):
        limit = self.channel.site.max_request_bytes
        self.content = BoundedContent(limit)
        if length is not None and length > limit:
            self.content.overflow = True

    def headersReceived(self, command: bytes, uri: bytes, version: bytes) -> bool:
        """The headers are in, the body is not read yet: note the request line (as requestReceived and process
        will again) and let the API decide what needs no body.  True when the request is to be answered without
        its body: refused, or declaring a body over the limit."""
        self.method, self.uri, self.clientproto = command, uri, version
        self.path = uri.split(b"?", 1)[0]
        self.prepath, self.postpath = [], list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        refused = self.channel.site.resource.admit(self)
        return refused or self.content.overflow

    def _handleStar(self):
        """``OPTIONS *`` and other requests for ``*``: answered by the API like any path it does not serve
        (twisted.web would answer them itself, bare)."""
        self.render(self.site.resource)

    def processingFailed(self, reason):
        """An exception that escaped the API (it lets none escape): 500 with an OperationOutcome, not
        twisted.web's HTML page."""
        log.error("outer.internal_error", error=reason.getErrorMessage(), error_type=reason.type.__name__)
        body = json.dumps(operation_outcome([("exception", "internal error; the request was not completed",
                                              None)])).encode()
        self.setResponseCode(http.INTERNAL_SERVER_ERROR)
        self.setHeader(b"content-type", FHIR_JSON)
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()
        return reason


class GatewayChannel(http.HTTPChannel):
    """HTTP/1.1 for the outer gate: deadlines that data cannot reset, the API's decision before the body, the
    body limit applied as the body comes, and every answer of its own an OperationOutcome (module docstring)."""

    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES
    MAX_LENGTH = MAX_HEADER_BYTES
    abortTimeout = CLOSE_GRACE

    _deadline = "idle"  # the deadline running: idle, header, body; handling (none) while the API answers
    _closing = False  # the gateway is closing the connection: what the client still sends is dropped
    _lines = 0  # lines of the current request read so far (the first is the request line)
    _body_bytes = 0  # bytes of the current request's body read so far

    # -- deadlines ---------------------------------------------------------------------------------------------
    def _start(self, deadline: str, seconds: float) -> None:
        self._deadline = deadline
        self.setTimeout(seconds)  # (TimeoutMixin: replaces the running timer; dataReceived never resets it)

    def dataReceived(self, data):
        if self._closing:
            return
        if self._deadline == "idle":  # a request's first byte
            self._lines = self._body_bytes = 0
            self._start("header", self.site.header_timeout)
        basic.LineReceiver.dataReceived(self, data)  # (HTTPChannel's would reset the deadline on every byte)

    def allContentReceived(self):
        if self._closing:  # the channel answered an error of its own before the request was whole
            return
        self._deadline = "handling"
        super().allContentReceived()  # (stops the timer while the API answers)

    def requestDone(self, request):
        self._deadline = "idle"
        self._savedTimeOut = self.site.idle_timeout  # restarted by HTTPChannel if the connection stays open
        super().requestDone(request)

    def timeoutConnection(self):
        deadline = self._deadline
        self.site.timed_out(deadline)
        if deadline in ("header", "body"):
            seconds = self.site.header_timeout if deadline == "header" else self.site.body_timeout
            what = "the request's headers" if deadline == "header" else "the request's body"
            self._answer(408, "timeout", f"{what} did not arrive within {seconds:g} s")
        else:
            self.loseConnection()

    def loseConnection(self):
        """Close after what is written; cut the connection if the client has not gone within CLOSE_GRACE (TLS
        waits for the client's close_notify, which a hostile client never sends)."""
        self._closing = True
        self.setTimeout(None)
        if self._abortingCall is None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        return super().loseConnection()

    def forceAbortClient(self):
        self._abortingCall = None
        self.transport.abortConnection()

    # -- before the body ---------------------------------------------------------------------------------------
    def allHeadersReceived(self):
        """HTTPChannel's, with the API's decision and the size check before anything of the body is read or a
        ``100 Continue`` is sent."""
        request = self.requests[-1]
        self.persistent = self.checkPersistence(request, self._version)
        request.gotLength(self.length)
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect and expect[0].lower() != b"100-continue":
            self._answer(417, "not-supported", "the only expectation supported is Expect: 100-continue")
            return
        refused = request.headersReceived(self._command, self._path, self._version)
        if self.length == 0:  # no body: HTTPChannel.lineReceived hands the request on at once
            return
        if refused:
            self._without_body(request)
            return
        self._start("body", self.site.body_timeout)  # a body to read: a Content-Length, or chunked
        if expect and self._version == b"HTTP/1.1":
            self._send100Continue()

    def rawDataReceived(self, data):
        if self._closing or (self._deadline == "handling" and not self.persistent):
            return  # the answer does not depend on it, and the connection closes after it
        if self._deadline != "body":  # the next request's, while the API answers: HTTPChannel keeps it
            return super().rawDataReceived(data)
        self._body_bytes += len(data)
        super().rawDataReceived(data)
        if self._deadline == "body" and not self._closing and self.requests[-1].content.overflow:
            self._transferDecoder = None  # a chunked body past the limit: answered now
            self._without_body(self.requests[-1])
            self.allContentReceived()

    def _without_body(self, request):
        """Answer ``request`` now, reading no more of its body (the API refuses it: it is refused or too large),
        and close the connection after the answer: the unread body leaves it unusable for another request."""
        log.info("outer.body_cut", received=self._body_bytes, declared=self.length)
        self.length = 0  # (from the headers, HTTPChannel.lineReceived then takes the request as complete)
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])

    # -- twisted.web's own answers, as OperationOutcomes -------------------------------------------------------
    def lineReceived(self, line):
        self._lines += 1
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._answer(431, "too-long", f"the request line and headers are larger than {self.totalHeadersSize} "
                                          f"bytes")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        if self._lines == 0:
            self._answer(414, "too-long", f"the request line is longer than {self.MAX_LENGTH} bytes")
        else:
            self._answer(431, "too-long", f"a header line is longer than {self.MAX_LENGTH} bytes")

    def headerReceived(self, line):
        if self._receivedHeaderCount >= self.maxHeaders:
            self._answer(431, "too-costly", f"the request has more than {self.maxHeaders} headers")
            return False
        name, _, value = line.partition(b":")
        coding = value.strip(b" \t").lower()
        if name.strip().lower() == b"transfer-encoding" and coding not in (b"chunked", b"identity"):
            self._answer(501, "not-supported", "the only Transfer-Encoding supported is chunked")
            return False
        return super().headerReceived(line)

    def _respondToBadRequestAndDisconnect(self):
        where = "the chunked encoding of the body" if self._deadline == "body" else "the request line or a header"
        self._answer(400, "structure", f"{where} is malformed (or the body's length is given twice)")

    def writeHeaders(self, version, code, reason, headers):
        headers.removeHeader(b"server")  # (twisted.web's Request names itself and its version)
        super().writeHeaders(version, code, reason, headers)

    def _answer(self, status: int, code: str, diagnostics: str) -> None:
        """Answer with an OperationOutcome from the channel itself (no request got as far as the API), then
        close."""
        if self._closing:
            return
        body = json.dumps(operation_outcome([(code, diagnostics, None)])).encode()
        head = [b"HTTP/1.1 %d %s" % (status, http.RESPONSES.get(status, b"Error")), b"Content-Type: " + FHIR_JSON,
                b"Content-Length: %d" % len(body), b"Date: " + http.datetimeToString(self.site.reactor.seconds()),
                b"Connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.site.answered(status)
        self.persistent = False
        self.loseConnection()


class GatewaySite(server.Site):
    """twisted.web's Site for the outer gate: its connections are GatewayChannels, its requests GatewayRequests,
    and the limits they keep are here.  ``resource`` must have ``admit(request) -> bool`` (FhirApi).
    ``answered(status)`` is called for every answer (the HTTP metrics), ``timed_out(deadline)`` for every
    connection cut at a deadline (``header``, ``body``, ``idle``)."""

    protocol = GatewayChannel
    requestFactory = GatewayRequest
    displayTracebacks = False

    def __init__(self, resource, *, reactor, max_request_bytes: int, header_timeout: float, body_timeout: float,
                 idle_timeout: float, answered=lambda status: None, timed_out=lambda deadline: None):
        super().__init__(resource, reactor=reactor, timeout=idle_timeout, parsePOSTFormSubmission=False)
        self.max_request_bytes = max_request_bytes
        self.header_timeout, self.body_timeout, self.idle_timeout = header_timeout, body_timeout, idle_timeout
        self.answered, self.timed_out = answered, timed_out

    def log(self, request):
        """Requests are logged by the API as structured events; here they are only counted."""
        self.answered(request.code)

    def acceptableProtocols(self):
        """HTTP/1.1 only, whatever twisted.web could negotiate (GatewayChannel is the gate's only channel)."""
        return [b"http/1.1"]
