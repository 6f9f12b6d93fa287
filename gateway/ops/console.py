"""The web console for hospital IT, on the admin listener (loopback only), at ``/console/``.

Server-rendered HTML, no script at all; pages that show live state refresh themselves (``<meta refresh>``).

- **Who**: operators named in ``admin.operators`` (name + scrypt hash, `gatewayd console-password`) log in
  with a form; the session is a random token in an ``HttpOnly; SameSite=Strict; Path=/console`` cookie, ended
  by logging out, after ``SESSION_IDLE`` idle or ``SESSION_MAX`` in all. At most ``MAX_SESSIONS`` at once (the
  oldest goes) and ``MAX_FAILED_LOGINS`` failed logins a minute (then 429): what an anonymous peer can hold is
  bounded. Anything but the login page without a session: 303 to it (303, not the page: nothing is shown).
- **Changes** are POSTs carrying the session's CSRF token (a hidden field), from a page of this console
  (an ``Origin`` header, when sent, must be this listener's), and a confirmation (a ticked ``confirm``).
  Anything else is refused with 403 and changes nothing.
- **Audited** (the chamber's audit trail, ``subject`` = ``console:<name>``, ``source`` = the peer's address):
  ``console.login`` (200, or 401 for a failed one), ``console.logout``, ``console.unmask`` (a message's raw
  bytes shown with patient fields), ``console.retry`` (a dead letter resubmitted; its story also says by whom), ``console.purge`` (dead letters
  deleted, in the same transaction).
- **Pages**: ``/console/`` the status (`gateway.ops.status.gather`: the same facts as `gatewayd status`) and
  charts of the last hours' traffic and delivery latency (inline SVG, drawn on the server);
  ``/console/messages`` search by control id, type, state, peer and time; ``/console/messages/ID`` a message's
  whole story, its raw bytes with patient fields masked (PID, PD1, NK1, GT1, IN1-IN3, every field after the
  first; a request for them unmasked is audited); ``/console/dead`` the dead letters, each with a retry, and their purge by age;
  ``/console/audit`` the audit trail, searched by action, subject, platform and resource id.

Not built yet (docs/operations.md): login with client certificates.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import os
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import urlencode

import structlog
from twisted.web import server

from gateway.config.fields import parse_duration
from gateway.domain.audit import AuditEntry, append
from gateway.ops.queue import NotRetryable, retry_unit
from gateway.ops.status import gather, render

log = structlog.get_logger("gateway.ops.console")

SESSION_IDLE = 30 * 60.0
SESSION_MAX = 8 * 3600.0
MAX_SESSIONS = 32
MAX_FAILED_LOGINS = 10  # a minute, all peers together
COOKIE = b"gwconsole"
PATIENT_SEGMENTS = {"PID", "PD1", "NK1", "GT1", "IN1", "IN2", "IN3"}
SCRYPT = (16384, 8, 1)


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) of ``password``, for ``admin.operators[].password_hash``."""
    n, r, p = SCRYPT
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        mine = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt), n=int(n), r=int(r),
                              p=int(p), dklen=len(base64.b64decode(digest)), maxmem=64 << 20)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(mine, base64.b64decode(digest))


def mask_patient_fields(text: str) -> str:
    """ER7 text with every field after the first of the segments that carry a patient's identity replaced by
    ``***`` (an empty field stays empty)."""
    lines = []
    for segment in text.replace("\n", "\r").split("\r"):
        name = segment[:3]
        if name in PATIENT_SEGMENTS and len(segment) > 3:
            sep = segment[3]
            fields = segment.split(sep)
            segment = sep.join(fields[:2] + ["***" if f else "" for f in fields[2:]])
        lines.append(segment)
    return "\r".join(lines)


CHART_HOURS = 6
CHART_BUCKET = 600.0


def _bars(element_id: str, title: str, values: list, colour: str, number=str) -> str:
    """A bar chart of ``values`` (None: no bar) as inline SVG, its largest value written beside it."""
    width, height = 720, 80
    top = max((v for v in values if v is not None), default=0) or 1
    step = width / max(1, len(values))
    bars = "".join(
        f"<rect x={i * step:.1f} y={height - v / top * height:.1f} width={max(1.0, step - 1):.1f} "
        f"height={v / top * height:.1f} fill=\"{colour}\"><title>{number(v)}</title></rect>"
        for i, v in enumerate(values) if v)
    return (f"<figure id={element_id}><figcaption>{html.escape(title)} (highest {number(top) if any(values) else 0})"
            f"</figcaption><svg xmlns=http://www.w3.org/2000/svg width={width} height={height} role=img "
            f"style=\"border-bottom:1px solid #999\">{bars}</svg></figure>")


def _search_form(action: str, query: dict[str, str], note: str = "") -> str:
    """A GET form with one text field per ``query`` key, filled with what was asked."""
    fields = "".join(f"<label>{k} <input name={k} value=\"{html.escape(v)}\"></label> " for k, v in query.items())
    return f"<form method=get action={action}>{fields}<button>search</button> {note}</form>"


class _Session:
    __slots__ = ("csrf", "name", "seen", "started")

    def __init__(self, name: str, now: float):
        self.name, self.started, self.seen = name, now, now
        self.csrf = os.urandom(16).hex()


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Console:
    """The console's pages; :meth:`render` answers a request under ``/console`` (AdminResource calls it)."""

    def __init__(self, chamber, config: Callable[[], object], live: Callable[[], dict], *, clock,
                 reprocess: Callable | None = None):
        self.chamber, self.config, self.live, self.clock = chamber, config, live, clock
        self.reprocess = reprocess or (lambda tx, msg: ("AR", "not reprocessed from the console"))
        self.sessions: dict[str, _Session] = {}
        self._failed: list[float] = []

    @property
    def operators(self) -> dict[str, str]:
        admin = self.config().admin
        return {o.name: o.password_hash for o in admin.operators} if admin is not None else {}

    # -- the request ---------------------------------------------------------------------------------------
    def render(self, request) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"content-security-policy", b"default-src 'none'; style-src 'unsafe-inline'; "
                                                      b"form-action 'self'; frame-ancestors 'none'")
        path = request.path.decode("utf-8", "replace")
        method = request.method
        if not self.operators:
            request.setResponseCode(404)
            return b"no console: admin.operators names nobody\n"
        if path == "/console/login":
            if method == b"POST":
                return self._login(request)
            return self._page(request, "Log in", self._login_form())
        session = self._session(request)
        if session is None:
            request.setResponseCode(303)
            request.setHeader(b"location", b"/console/login")
            return b""
        if method == b"POST":
            problem = self._post_problem(request, session)
            if problem is not None:
                log.warning("console.post_refused", operator=session.name, path=path, reason=problem)
                request.setResponseCode(403)
                return self._page(request, "Refused", f"<p>{html.escape(problem)}</p>", session)
            if path == "/console/logout":
                return self._logout(request, session)
            if path == "/console/dead/purge":
                return self._purge(request, session)
            if path.startswith("/console/dead/") and path.endswith("/retry"):
                return self._retry(request, session, path.split("/")[3])
            request.setResponseCode(404)
            return self._page(request, "Not found", "<p>No such action.</p>", session)
        if method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            return b""
        if path in ("/console", "/console/"):
            return self._status(request, session)
        if path == "/console/messages":
            return self._messages(request, session)
        if path.startswith("/console/messages/"):
            return self._message(request, session, path.rsplit("/", 1)[1])
        if path == "/console/dead":
            return self._dead(request, session)
        if path == "/console/audit":
            return self._audit_page(request, session)
        request.setResponseCode(404)
        return self._page(request, "Not found", "<p>No such page.</p>", session)

    # -- sessions ------------------------------------------------------------------------------------------
    def _session(self, request) -> _Session | None:
        token = request.getCookie(COOKIE)
        if not token:
            return None
        now = self.clock.seconds()
        session = self.sessions.get(token.decode("ascii", "replace"))
        if session is None:
            return None
        if (now - session.seen > SESSION_IDLE or now - session.started > SESSION_MAX
                or session.name not in self.operators):  # expired, or the operator removed by a reload
            self.sessions.pop(token.decode("ascii", "replace"), None)
            return None
        session.seen = now
        return session

    @staticmethod
    def _same_origin(request) -> bool:
        """No Origin header (a browser sends one with every POST), or this listener's own."""
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        return origin is None or (host is not None and origin == b"http://" + host)

    def _post_problem(self, request, session: _Session) -> str | None:
        if not self._same_origin(request):
            return "a change must come from this console's own pages (cross-site request refused)"
        token = self._arg(request, "csrf")
        if not token or not hmac.compare_digest(token, session.csrf):
            return "this form is not from your session (cross-site request refused): reload the page"
        if request.path != b"/console/logout" and self._arg(request, "confirm") != "yes":
            return "not confirmed: tick the confirmation and send again"
        return None

    def _login(self, request) -> bytes:
        now = self.clock.seconds()
        self._failed = [t for t in self._failed if now - t < 60]
        if not self._same_origin(request):
            request.setResponseCode(403)
            return self._page(request, "Refused", "<p>Cross-site login refused.</p>")
        if len(self._failed) >= MAX_FAILED_LOGINS:
            request.setResponseCode(429)
            request.setHeader(b"retry-after", b"60")
            return self._page(request, "Too many attempts", "<p>Too many failed logins: wait a minute.</p>")
        name, password = self._arg(request, "name") or "", self._arg(request, "password") or ""
        stored = self.operators.get(name)
        ok = stored is not None and password_matches(password, stored)
        self._audit(None if not ok else name, "console.login", 200 if ok else 401, request,
                    detail=None if ok else f"failed login as {name[:64]!r}")
        if not ok:
            self._failed.append(now)
            request.setResponseCode(401)
            return self._page(request, "Log in", "<p class=bad>Wrong name or password.</p>" + self._login_form())
        if len(self.sessions) >= MAX_SESSIONS:
            oldest = min(self.sessions, key=lambda t: self.sessions[t].seen)
            del self.sessions[oldest]
        token = os.urandom(24).hex()
        self.sessions[token] = _Session(name, now)
        request.addCookie(COOKIE, token.encode(), path=b"/console", httpOnly=True, sameSite="strict")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/console/")
        return b""

    def _logout(self, request, session: _Session) -> bytes:
        self.sessions = {t: s for t, s in self.sessions.items() if s is not session}
        self._audit(session.name, "console.logout", 200, request)
        request.addCookie(COOKIE, b"", path=b"/console", httpOnly=True, sameSite="strict", max_age=b"0")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/console/login")
        return b""

    def _audit(self, name: str | None, action: str, outcome: int, request, *, resource_id: str | None = None,
               detail: str | None = None, extra=None):
        """The audit record of a console action, in its own transaction (with ``extra(tx)`` first, if given:
        the change it records, committed together); fires with extra's result."""
        peer = request.getClientAddress()
        entry = AuditEntry(action=action, outcome=outcome, subject=f"console:{name}" if name else None,
                           source=getattr(peer, "host", None), resource_type="Message" if resource_id else None,
                           resource_id=resource_id, detail=detail)

        def work(tx):
            result = extra(tx) if extra is not None else None
            append(tx, entry)
            return result

        return self.chamber.transact(work)

    @staticmethod
    def _arg(request, name: str) -> str | None:
        values = request.args.get(name.encode())
        return values[0].decode("utf-8", "replace") if values else None

    # -- pages ---------------------------------------------------------------------------------------------
    def _page(self, request, title: str, body: str, session: _Session | None = None, refresh: int | None = None
              ) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        nav = ""
        if session is not None:
            nav = (f"<nav><a href=/console/>status</a> · <a href=/console/messages>messages</a> · "
                   f"<a href=/console/dead>dead letters</a> · <a href=/console/audit>audit trail</a> · "
                   f"{html.escape(session.name)} "
                   f"<form method=post action=/console/logout style=display:inline>"
                   f"<input type=hidden name=csrf value={session.csrf}><button>log out</button></form></nav>")
        meta = f"<meta http-equiv=refresh content={refresh}>" if refresh else ""
        return (f"<!doctype html><html><head><meta charset=utf-8>{meta}<title>gatewayd: {html.escape(title)}"
                f"</title><style>body{{font-family:sans-serif;margin:1em 2em}}table{{border-collapse:collapse}}"
                f"td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}.bad{{color:#b00}}.ok{{color:#070}}"
                f"pre{{background:#f4f4f4;padding:.5em;white-space:pre-wrap}}</style></head><body>{nav}"
                f"<h1>{html.escape(title)}</h1>{body}</body></html>").encode("utf-8")

    @staticmethod
    def _login_form() -> str:
        return ("<form method=post action=/console/login><label>name <input name=name autocomplete=username>"
                "</label> <label>password <input name=password type=password autocomplete=current-password>"
                "</label> <button>log in</button></form>")

    def _status(self, request, session: _Session) -> bytes:
        now = self.clock.seconds()
        status = gather(self.config(), now=now, ask=lambda url: self.live())
        downs = [name for name, h in status["his"].items() if h["link"]["up"] is False]
        summary = (f"<p class=bad id=his-state>HIS down: {html.escape(', '.join(downs))}</p>" if downs
                   else "<p class=ok id=his-state>every HIS endpoint up</p>")
        body = summary + f"<pre id=status>{html.escape(render(status, colour=False))}</pre>" + self._charts(now)
        return self._page(request, "Status", body, session, refresh=5)

    def _charts(self, now: float) -> str:
        """Throughput (messages in and out) and delivery latency (commit to the HIS's answer) over the last
        CHART_HOURS hours, in CHART_BUCKET buckets, as inline SVG (no script)."""
        buckets = int(CHART_HOURS * 3600 / CHART_BUCKET)
        since = now - buckets * CHART_BUCKET
        inbound, outbound, latency = [0] * buckets, [0] * buckets, [None] * buckets
        for b, direction, count, mean in self.chamber.read().traffic(since, CHART_BUCKET):
            if 0 <= b < buckets:
                (inbound if direction == "inbound" else outbound)[b] = count
                if direction == "outbound":
                    latency[b] = mean
        start = _when(since)[11:16]
        return (f"<h2>The last {CHART_HOURS:g} hours (from {start} UTC, {CHART_BUCKET / 60:g}-minute bars)</h2>"
                + _bars("chart-in", "messages in (from the HIS)", inbound, "#36c")
                + _bars("chart-out", "messages out (to the HIS)", outbound, "#c63")
                + _bars("chart-latency", "mean seconds from commit to the HIS's answer", latency, "#393",
                        number=lambda v: f"{v:.2f}"))

    def _messages(self, request, session: _Session) -> bytes:
        q = {k: (self._arg(request, k) or "").strip() for k in ("control_id", "type", "state", "peer", "since",
                                                                 "until")}
        found, problem = [], None
        try:
            since = datetime.fromisoformat(q["since"]).timestamp() if q["since"] else None
            until = datetime.fromisoformat(q["until"]).timestamp() if q["until"] else None
        except ValueError:
            since = until = None
            problem = "since/until: use an ISO date or date-time, e.g. 2026-12-07 or 2026-12-07T08:00+08:00"
        if problem is None:
            found = self.chamber.read().messages(control_id=q["control_id"] or None, type=q["type"] or None,
                                                 state=q["state"] or None, peer=q["peer"] or None, since=since,
                                                 until=until, limit=200)
        form = _search_form("/console/messages", q)
        rows = "".join(
            f"<tr><td><a href=/console/messages/{m.id}>{m.id}</a></td><td>{html.escape(m.control_id)}</td>"
            f"<td>{html.escape(m.direction)}</td><td>{html.escape(m.peer)}</td><td>{html.escape(m.type)}</td>"
            f"<td>{html.escape(m.state)}</td><td>{m.attempts}</td><td>{_when(m.created)}</td></tr>" for m in found)
        table = ("<table id=messages><tr><th>id</th><th>control id</th><th>direction</th><th>peer</th><th>type</th>"
                 f"<th>state</th><th>attempts</th><th>committed</th></tr>{rows}</table>")
        note = f"<p class=bad>{html.escape(problem)}</p>" if problem else f"<p>{len(found)} found (newest first, at " \
                                                                           f"most 200)</p>"
        return self._page(request, "Messages", form + note + table, session)

    def _message(self, request, session: _Session, which: str):
        msg = self.chamber.read().message(int(which)) if which.isdigit() else None
        if msg is None:
            request.setResponseCode(404)
            return self._page(request, "Not found", "<p>No such message.</p>", session)
        events = self.chamber.read().message_events(msg.id)
        story = "".join(f"<tr><td>{_when(at)}</td><td>{html.escape(state)}</td><td>{html.escape(detail or '')}"
                        f"</td></tr>" for at, state, detail in events)
        facts = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (
            ("control id", msg.control_id), ("direction", msg.direction), ("peer", msg.peer), ("type", msg.type),
            ("state", msg.state), ("attempts", msg.attempts), ("answer", f"{msg.answer_code or ''} "
                                                                         f"{msg.answer_text or ''}"),
            ("last error", msg.last_error or ""), ("committed", _when(msg.created))))
        unmask = self._arg(request, "unmask") == "yes"
        raw = msg.body.decode(msg.charset or "utf-8", "replace") if msg.body else ""
        if not raw:
            shown = "<p>(no bytes yet: an intent the inner gate encodes on its first send)</p>"
        elif unmask:
            shown = f"<pre id=raw>{html.escape(raw.replace(chr(13), chr(10)))}</pre>"
        else:
            shown = (f"<pre id=raw>{html.escape(mask_patient_fields(raw).replace(chr(13), chr(10)))}</pre>"
                     f"<p><a href=\"/console/messages/{msg.id}?{urlencode({'unmask': 'yes'})}\">show with patient "
                     f"fields (audited)</a></p>")
        retry = ""
        if msg.direction == "outbound" and msg.state in ("dead", "refused"):
            retry = self._retry_form(msg.id, session)
        body = (f"<table id=facts>{facts}</table>{retry}<h2>Story</h2><table id=story><tr><th>when</th><th>state"
                f"</th><th>detail</th></tr>{story}</table><h2>Raw bytes</h2>{shown}")
        page = self._page(request, f"Message {msg.id}", body, session)
        if not unmask or not raw:
            return page
        d = self._audit(session.name, "console.unmask", 200, request, resource_id=str(msg.id),
                        detail=f"{msg.type} {msg.control_id} shown with patient fields")

        def shown_(_):
            request.write(page)
            request.finish()

        def not_audited(failure):  # nothing is shown unmasked that was not recorded
            log.error("console.unmask_not_audited", operator=session.name, error=failure.getErrorMessage())
            request.setResponseCode(503)
            request.write(b"the audit record could not be written: not shown\n")
            request.finish()

        d.addCallbacks(shown_, not_audited)
        return server.NOT_DONE_YET

    @staticmethod
    def _retry_form(message_id: int, session: _Session) -> str:
        return (f"<form method=post action=/console/dead/{message_id}/retry><input type=hidden name=csrf "
                f"value={session.csrf}><label><input type=checkbox name=confirm value=yes> I want message "
                f"{message_id} sent again (same bytes, same control id)</label> <button>retry</button></form>")

    def _audit_page(self, request, session: _Session) -> bytes:
        q = {k: (self._arg(request, k) or "").strip() for k in ("action", "subject", "platform", "resource_id")}
        records = self.chamber.read().search_audit(action=q["action"] or None, subject=q["subject"] or None,
                                                   platform=q["platform"] or None,
                                                   resource_id=q["resource_id"] or None, limit=200)
        form = _search_form("/console/audit", q, "(action: a name, or a prefix ending in %, e.g. console.%)")
        rows = "".join(
            f"<tr><td>{r.seq}</td><td>{_when(r.at_us / 1e6)}</td><td>{html.escape(r.action)}</td><td>{r.outcome}</td>"
            f"<td>{html.escape(r.subject or r.platform or '')}</td><td>{html.escape(r.source or '')}</td>"
            f"<td>{html.escape((r.resource_type or '') + ' ' + (r.resource_id or ''))}</td>"
            f"<td>{html.escape(r.detail or '')}</td></tr>" for r in records)
        return self._page(request, "Audit trail", form + f"<p>{len(records)} found (newest first, at most 200)</p>"
                          "<table id=audit><tr><th>seq</th><th>when</th><th>action</th><th>outcome</th><th>who</th>"
                          f"<th>from</th><th>about</th><th>detail</th></tr>{rows}</table>", session)

    def _dead(self, request, session: _Session) -> bytes:
        dead = self.chamber.read().messages(direction="outbound", state="dead", limit=500)
        rows = "".join(
            f"<tr><td><a href=/console/messages/{m.id}>{m.id}</a></td><td>{html.escape(m.control_id)}</td>"
            f"<td>{html.escape(m.peer)}</td><td>{html.escape(m.type)}</td><td>{html.escape(m.last_error or '')}</td>"
            f"<td>{self._retry_form(m.id, session)}</td></tr>" for m in dead)
        purge = (f"<form method=post action=/console/dead/purge><input type=hidden name=csrf value={session.csrf}>"
                 f"<label>delete the dead letters older than <input name=older_than value=30d size=6></label> "
                 f"<label><input type=checkbox name=confirm value=yes> I want them deleted, with their stories"
                 f"</label> <button>purge</button></form>")
        return self._page(request, "Dead letters", f"<p>{len(dead)} dead letters</p>{purge}<table id=dead><tr><th>id</th>"
                                                   f"<th>control id</th><th>peer</th><th>type</th><th>why</th>"
                                                   f"<th></th></tr>{rows}</table>", session)

    def _purge(self, request, session: _Session):
        try:
            age = parse_duration(self._arg(request, "older_than") or "")
        except ValueError:
            request.setResponseCode(400)
            return self._page(request, "Not purged", "<p id=outcome class=bad>older than: a duration such as 30d or "
                                                     "12h</p>", session)
        d = self._audit(session.name, "console.purge", 200, request, detail=f"dead letters older than {age:g}s",
                        extra=lambda tx: tx.purge_dead(tx.now - age))

        def done(count):
            request.write(self._page(request, "Purged", f"<p id=outcome>deleted {count} dead letters (older than "
                                                        f"{age:g}s) with their stories</p>", session))
            request.finish()

        d.addCallback(done)
        d.addErrback(lambda f: (log.error("console.purge_failed", error=f.getErrorMessage()),
                                request.setResponseCode(503), request.write(b"not purged\n"), request.finish()))
        return server.NOT_DONE_YET

    def _retry(self, request, session: _Session, which: str):
        if not which.isdigit():
            request.setResponseCode(404)
            return self._page(request, "Not found", "<p>No such message.</p>", session)
        d = self._audit(session.name, "console.retry", 200, request, resource_id=which,
                        detail="resubmitted from the console",
                        extra=retry_unit(int(which), self.reprocess, who=f"console:{session.name}"))

        def done(what):
            request.write(self._page(request, "Resubmitted", f"<p id=outcome>{html.escape(what)}</p>", session))
            request.finish()

        def refused(failure):
            failure.trap(NotRetryable)
            request.setResponseCode(409)
            request.write(self._page(request, "Not resubmitted", f"<p id=outcome class=bad>"
                                                                 f"{html.escape(str(failure.value))}</p>", session))
            request.finish()

        d.addCallbacks(done, refused)
        d.addErrback(lambda f: (log.error("console.retry_failed", error=f.getErrorMessage()),
                                request.setResponseCode(503), request.write(b"not resubmitted\n"), request.finish()))
        return server.NOT_DONE_YET

