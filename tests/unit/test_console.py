"""The web console's rules (gateway/ops/console.py) on a task.Clock: password hashes, masking, and the limits of
what an anonymous peer can hold or try (sessions, failed logins). Pages over real HTTP: tests/e2e/test_console_e2e.py."""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import task
from twisted.web.test.requesthelper import DummyRequest

from gateway.chamber.engine import Chamber
from gateway.ops.console import (MAX_FAILED_LOGINS, MAX_SESSIONS, SESSION_IDLE, Console, hash_password,
                                 mask_patient_fields, password_matches)

PASSWORD = "correct horse battery staple"
HASH = hash_password(PASSWORD)


class Request(DummyRequest):
    def __init__(self, path: bytes, method: bytes = b"GET", args: dict | None = None, cookie: bytes | None = None):
        super().__init__([])
        self.path, self.method, self.args, self.cookie, self.cookies_set = path, method, args or {}, cookie, []

    def getCookie(self, key):
        return self.cookie

    def addCookie(self, key, value, **kw):
        self.cookies_set.append(value)


def test_a_password_hash_matches_its_password_only():
    assert HASH.startswith("scrypt$16384$8$1$") and PASSWORD not in HASH
    assert password_matches(PASSWORD, HASH)
    assert not password_matches("correct horse battery stapler", HASH)
    assert not password_matches(PASSWORD, "scrypt$1$2$3$bad")
    assert hash_password(PASSWORD) != HASH  # salted


def test_patient_segments_are_masked_field_by_field():
    raw = "MSH|^~\\&|GW|F|HIS|H|20300101||SRM^S01|G1|P|2.5\rPID|1||MRN-1^^^X^MR||王^芳||19800101|F\rAIS|1||x"
    masked = mask_patient_fields(raw).split("\r")
    assert masked[0] == raw.split("\r")[0] and masked[2] == "AIS|1||x"
    assert masked[1] == "PID|1||***||***||***|***"


def console(tmp_path, clock):
    chamber = Chamber(tmp_path / "c.sqlite3", clock=clock.seconds)
    chamber.open()
    config = SimpleNamespace(admin=SimpleNamespace(operators=[SimpleNamespace(name="alice", password_hash=HASH)]))
    return Console(chamber, lambda: config, lambda: {}, clock=clock), chamber


def login(c: Console, password: str = PASSWORD) -> Request:
    request = Request(b"/console/login", b"POST", {b"name": [b"alice"], b"password": [password.encode()]})
    c.render(request)
    return request


def test_a_session_ends_after_its_idle_time_and_the_oldest_goes_past_the_limit(tmp_path):
    clock = task.Clock()
    c, chamber = console(tmp_path, clock)
    first = login(c)
    assert first.responseCode == 303 and len(first.cookies_set) == 1
    token = first.cookies_set[0]
    page = Request(b"/console/dead", cookie=token)
    c.render(page)
    assert page.responseCode in (None, 200)
    clock.advance(SESSION_IDLE + 1)
    stale = Request(b"/console/dead", cookie=token)
    c.render(stale)
    assert stale.responseCode == 303  # back to the login page
    tokens = [login(c).cookies_set[0] for _ in range(MAX_SESSIONS + 1)]
    assert len(c.sessions) == MAX_SESSIONS
    oldest = Request(b"/console/dead", cookie=tokens[0])
    c.render(oldest)
    assert oldest.responseCode == 303
    chamber.close()


def test_failed_logins_are_limited_and_audited(tmp_path):
    clock = task.Clock()
    c, chamber = console(tmp_path, clock)
    for _ in range(MAX_FAILED_LOGINS):
        assert login(c, "guess").responseCode == 401
    assert login(c).responseCode == 429  # even the right password, for a minute
    clock.advance(61)
    assert login(c).responseCode == 303
    rows = chamber._reader.execute("SELECT action, outcome, subject FROM audit_records ORDER BY seq").fetchall()
    assert [tuple(r) for r in rows] == [("console.login", 401, None)] * MAX_FAILED_LOGINS + [
        ("console.login", 200, "console:alice")]
    chamber.close()


def test_no_operators_no_console(tmp_path):
    clock = task.Clock()
    c, chamber = console(tmp_path, clock)
    c.config = lambda: SimpleNamespace(admin=SimpleNamespace(operators=[]))
    request = Request(b"/console/login")
    assert b"no console" in c.render(request) and request.responseCode == 404
    chamber.close()


def test_a_post_from_this_console_passes_the_origin_check_and_one_from_elsewhere_does_not(tmp_path):
    """Browsers send Origin with every POST: the listener's own (http://<Host>) is let through, any other
    (another site, 'null' from a sandboxed page or a file) refused with 403 before anything is done."""
    clock = task.Clock()
    c, chamber = console(tmp_path, clock)
    for origin, code in ((b"http://127.0.0.1:9102", 303), (b"http://evil.example", 403), (b"null", 403)):
        request = Request(b"/console/login", b"POST", {b"name": [b"alice"], b"password": [PASSWORD.encode()]})
        request.requestHeaders.setRawHeaders(b"host", [b"127.0.0.1:9102"])
        request.requestHeaders.setRawHeaders(b"origin", [origin])
        c.render(request)
        assert request.responseCode == code, origin
    chamber.close()



def test_the_charts_count_each_ten_minutes_and_the_delivery_latency(tmp_path):
    """Three SIUs in the last ten minutes and one two hours ago; an SRM answered 1.5 s after its commit: bars
    at the right places, their values in their titles; nothing older than six hours is drawn."""
    clock = task.Clock()
    clock.advance(1_900_000_000)
    c, chamber = console(tmp_path, clock)
    now = clock.seconds()
    for i, (direction, created, state) in enumerate([("inbound", now - 60, "delivered"), ("inbound", now - 120,
                                                     "delivered"), ("inbound", now - 300, "delivered"),
                                                     ("inbound", now - 7200, "delivered"),
                                                     ("inbound", now - 8 * 3600, "delivered"),
                                                     ("outbound", now - 100, "delivered")]):
        chamber.transact_now(lambda tx, d=direction, s=state, n=i: tx.add_message(
            direction=d, peer="his", control_id=f"C{n}", type="SIU^S12", state=s, body=b"MSH|", charset="utf-8"))
        chamber._conn.execute("UPDATE messages SET created = ?, updated = ? WHERE control_id = ?",
                              (created, created + 1.5, f"C{i}"))
    chamber._conn.commit()
    charts = c._charts(now)
    inbound = charts[charts.index("id=chart-in>"):charts.index("id=chart-out>")]
    assert inbound.count("<rect") == 2 and "<title>3</title>" in inbound and "<title>1</title>" in inbound
    latency = charts[charts.index("id=chart-latency>"):]
    assert latency.count("<rect") == 1 and "<title>1.50</title>" in latency
    chamber.close()
