"""Incremental sync for platforms that poll (issue 23): ``_lastUpdated`` on Slot and Appointment searches (FHIR's
prefixes and the value's precision) and ``GET /Appointment/_history?_since=``.  A poller passes the latest
``meta.lastUpdated`` it has seen with ``ge`` (or as ``_since``, inclusive) and drops the (id, versionId) pairs it
has had: a change committed within that same second — even at the very same instant — is not missed."""

from datetime import datetime, timedelta
from urllib.parse import quote

from gateway.domain.model import SlotNotice
from gateway.domain.slot_book import SlotBook
from tests.unit.outer_gate import DAY, NOW, SCHEDULE, SID, TZ, entries, outcome
from tests.unit.test_fhir_conventions import booked


def at(ts: float) -> str:
    return quote(datetime.fromtimestamp(ts, TZ).isoformat(timespec="seconds"))


def block(gate, index):
    gate.chamber.transact_now(lambda tx: SlotBook(TZ).apply(tx, [
        SlotNotice("block", SCHEDULE, DAY + timedelta(minutes=15 * index), 15, "card", "x")]))


def test_slot_last_updated_with_prefixes_and_precision(gate):
    gate.clock.advance(3600)
    block(gate, 2)
    changed = NOW + 3600
    ids = lambda q: [s["id"] for s in entries(gate.request("GET", f"/Slot?_lastUpdated={q}", platform="other"))]
    assert ids(f"ge{at(changed)}") == [SID[2]]
    assert ids(f"gt{at(changed - 1)}") == [SID[2]]
    assert ids(f"gt{at(changed)}") == []  # (after the whole second given)
    assert len(ids(f"lt{at(changed)}")) == 7  # the others, published at NOW
    assert ids(at(changed)) == [SID[2]]  # eq: within that second
    day = datetime.fromtimestamp(changed, TZ).strftime("%Y-%m-%d")
    assert len(ids(day)) == 8 and ids(f"gt{day}") == []  # a date: the whole day
    assert SID[2] in ids(f"ge{quote(datetime.fromtimestamp(changed, TZ).isoformat(timespec='milliseconds'))}")
    assert ids(f"gt{quote(datetime.fromtimestamp(changed - 0.5, TZ).isoformat(timespec='milliseconds'))}") == [SID[2]]
    outcome(gate.request("GET", "/Slot?_lastUpdated=ne2030-01-01"), 400, "not-supported")
    outcome(gate.request("GET", "/Slot?_lastUpdated=yesterday"), 400, "invalid")


def test_a_poller_misses_no_slot_change_committed_at_its_boundarys_very_instant(gate):
    """The poller reads what changed, remembers the latest lastUpdated, and a change is then committed at that
    very instant (the clock has not moved): ge finds it again, and its versionId tells it apart."""
    seen: set[tuple[str, str]] = set()
    boundary = None

    def poll():
        nonlocal boundary
        query = f"/Slot?_lastUpdated=ge{boundary}" if boundary else "/Slot"
        new = [s for s in entries(gate.request("GET", query, platform="other"))
               if (s["id"], s["meta"]["versionId"]) not in seen]
        seen.update((s["id"], s["meta"]["versionId"]) for s in new)
        if new:
            boundary = quote(max(s["meta"]["lastUpdated"] for s in new))
        return [(s["id"], s["status"]) for s in new]

    assert len(poll()) == 8
    gate.clock.advance(0.25)
    block(gate, 3)
    assert poll() == [(SID[3], "busy-unavailable")]
    block(gate, 4)  # the same instant as the change just read
    assert poll() == [(SID[4], "busy-unavailable")]
    assert poll() == []  # nothing new: nothing again


def test_appointment_last_updated_and_the_type_level_history(gate):
    first = booked(gate, 1)
    gate.clock.advance(10)
    second = booked(gate, 2)
    later = NOW + 10
    r = gate.request("GET", f"/Appointment?_lastUpdated=ge{at(later)}")
    assert [a["id"] for a in entries(r)] == [second]
    history = gate.request("GET", f"/Appointment/_history?_since={at(later)}").json
    assert history["type"] == "history" and history["total"] == 2
    assert [(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in history["entry"]] == [
        (second, "2"), (second, "1")]
    everything = gate.request("GET", f"/Appointment/_history?_since={at(NOW)}&_count=3").json
    assert everything["total"] == 4 and len(everything["entry"]) == 3
    assert any(link["relation"] == "next" for link in everything["link"])
    assert gate.request("GET", f"/Appointment/_history?_since={at(NOW)}", platform="other").json["total"] == 0
    assert first not in [e["resource"]["id"] for e in history["entry"]]


def test_a_history_poller_misses_nothing_committed_at_its_since_instant(gate):
    appointment_id = booked(gate, 1)
    history = gate.request("GET", f"/Appointment/_history?_since={at(NOW)}").json
    seen = {(e["resource"]["id"], e["resource"]["meta"]["versionId"]) for e in history["entry"]}
    since = quote(max(e["resource"]["meta"]["lastUpdated"] for e in history["entry"]))
    cancel = gate.request("PATCH", f"/Appointment/{appointment_id}", {"status": "cancelled"})
    assert cancel.status in (200, 202)  # at the same instant (the clock has not moved)
    again = gate.request("GET", f"/Appointment/_history?_since={since}").json
    new = [e["resource"] for e in again["entry"] if (e["resource"]["id"], e["resource"]["meta"]["versionId"]) not in seen]
    assert new and all(r["id"] == appointment_id for r in new) and int(new[0]["meta"]["versionId"]) == 3


def test_what_history_does_not_serve_is_refused_not_ignored(gate):
    outcome(gate.request("GET", "/Appointment/_history"), 400, "invalid")  # no _since: refused, not everything
    outcome(gate.request("GET", "/Appointment/_history?_since=2030-01-01&_at=2030"), 400, "not-supported")
    outcome(gate.request("GET", "/Appointment/_history?_since=soon"), 400, "invalid")
    r = gate.request("GET", "/Slot/_history?_since=2030-01-01")
    assert "_lastUpdated" in outcome(r, 404, "not-supported")
