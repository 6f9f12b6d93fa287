"""A small synchronous load driver for mixed traffic against a running lock (``tests.e2e.harness.Lock``).

Two independent drivers, each safe to run in its own thread while the test kills and restarts processes:

* :func:`send_sius` plays the HIS: SIU^S24 / SIU^S12 over MLLP (raw sockets) to the gateway's inner
  port, one message at a time, and records for every control id (MSH-10 ``LOAD-<run>-<n>``) the
  acknowledgement it got. Only an ``AA`` is a promise the chamber must keep; a message with no answer
  (connection refused, reset, timeout) is *unacknowledged*, never an error: the driver reconnects and goes
  on.
* :func:`book_slots` plays a platform: ``POST /Appointment`` for each slot, recording the status codes and
  appointment ids. Connection errors (the gateway is down) and 503 are retried ``attempts`` times, with the
  same ``Idempotency-Key`` and body, then recorded as failed.

:func:`run_mixed` runs both at once in two threads. Everything returned is plain dicts, lists, str and int.
Simple and correct rather than fast.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta

import requests

__all__ = ["book_slots", "free_slot_ids", "run_mixed", "send_sius", "siu_message", "slot_id"]

SB, EB = b"\x0b", b"\x1c\x0d"
FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
_STATUS = {"S24": "Open", "S12": "Booked", "S15": "Cancelled", "S23": "Blocked", "S17": "Deleted"}
_REASON = {"S24": "opened", "S12": "booked", "S15": "cancelled", "S23": "blocked", "S17": "deleted"}


def _run_id() -> str:
    return uuid.uuid4().hex[:6].upper()


def slot_id(schedule: str, start: datetime) -> str:
    """The gateway's FHIR Slot.id for a schedule and a start (docs/hl7-profile.md)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", f"{schedule}-{start.strftime('%Y%m%d%H%M')}")


# -- HIS side: SIU over MLLP -------------------------------------------------------------------------------


def siu_message(control_id: str, *, trigger: str = "S24", schedule: str = "LOAD", start: datetime,
                minutes: int = 15, filler_id: str = "", service: tuple[str, str] = ("load-test", "Load test"),
                now: datetime | None = None) -> bytes:
    """One SIU^<trigger>^SIU_S12 as docs/hl7-profile.md describes it (ASCII, MSH-18 empty): schedule id in
    SCH-5, start in AIS-4 (and SCH-11), filler status in SCH-25, SCH-2 = ``filler_id`` for S12."""
    if trigger not in _STATUS:
        raise ValueError(f"trigger must be one of {sorted(_STATUS)}")
    now = now or datetime.now()
    begin, end = start.strftime("%Y%m%d%H%M"), (start + timedelta(minutes=minutes)).strftime("%Y%m%d%H%M")
    sch = [""] * 26
    sch[0] = "SCH"
    sch[2] = filler_id
    sch[5] = f"{schedule}^Load schedule {schedule}"
    sch[6] = f"{trigger}^{_REASON[trigger]}"
    sch[9], sch[10] = str(minutes), "MIN"
    sch[11] = f"^^{minutes}^{begin}^{end}"
    sch[25] = _STATUS[trigger]
    segments = [
        (f"MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|{now.strftime('%Y%m%d%H%M%S')}||SIU^{trigger}^SIU_S12|"
         f"{control_id}|P|2.5"),
        "|".join(sch),
        "RGS|1",
        f"AIS|1||{service[0]}^{service[1]}|{begin}|||{minutes}|MIN",
        f"AIP|1||{schedule}^Load^Doctor",
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


class _MLLPLink:
    """One MLLP connection that sends a message and waits for the answer whose MSA-2 is its control id."""

    def __init__(self, host: str, port: int, connect_timeout: float):
        self.host, self.port, self.connect_timeout = host, port, connect_timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock, self.buffer = None, b""

    def exchange(self, payload: bytes, control_id: str, ack_timeout: float) -> tuple[str, str] | None:
        """(MSA-1, MSA-3) of the answer to ``control_id``, or None (and the connection closed) if none came.
        Raises OSError if the connection cannot be made or breaks while sending."""
        if self.sock is None:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(ack_timeout)
        self.sock.sendall(SB + payload + EB)
        deadline = time.monotonic() + ack_timeout
        while True:
            while SB in self.buffer and b"\x1c" in self.buffer[self.buffer.index(SB):]:
                start = self.buffer.index(SB)
                end = self.buffer.index(b"\x1c", start)
                frame, self.buffer = self.buffer[start + 1:end], self.buffer[end + 1:].lstrip(b"\r")
                answer = _msa(frame)
                if answer is not None and answer[1] == control_id:
                    return answer[0], answer[2]
                # an answer to something else (a late ACK of an earlier message): not ours, ignore it
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()  # so a late answer can never be taken for the next message's
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                self.close()
                return None
            except OSError:
                self.close()
                return None
            if not data:
                self.close()
                return None
            self.buffer += data
            if len(self.buffer) > 4 << 20:
                self.close()
                return None


def _msa(frame: bytes) -> tuple[str, str, str] | None:
    for segment in frame.split(b"\r"):
        if segment.startswith(b"MSA"):
            text = segment.decode("utf-8", errors="replace")
            sep = text[3:4] or "|"
            fields = text.split(sep) + ["", "", ""]
            return fields[1], fields[2], fields[3]
    return None


def send_sius(port: int, n: int, *, host: str = "127.0.0.1", run: str | None = None,
              triggers: tuple[str, ...] = ("S24", "S12"), schedule: str | None = None,
              first_start: datetime = datetime(2030, 1, 7, 8, 0), minutes: int = 15, attempts: int = 1,
              ack_timeout: float = 5.0, connect_timeout: float = 2.0, reconnect_delay: float = 0.2,
              interval: float = 0.0, stop: threading.Event | None = None) -> dict:
    """Send ``n`` SIU messages to the gateway's MLLP port and record each one's acknowledgement.

    Message ``i`` (0-based, control id ``LOAD-<run>-<i>``) has trigger ``triggers[i % len(triggers)]`` and
    is about slot ``i // len(triggers)`` of schedule ``schedule`` (default ``LOAD<run>``), starting at
    ``first_start + slot * minutes``: with the default triggers each slot is opened (S24) and then booked
    at the counter (S12, SCH-2 ``H-<control id>``). Each message is sent at most ``attempts`` times (always
    with its control id) until some answer comes; connection failures wait ``reconnect_delay`` and
    reconnect. ``stop`` ends the run early (the rest are recorded with ``attempts`` 0).

    Returns ``{"run", "schedule", "messages": [{"control_id", "trigger", "slot_id", "ack": "AA"|"AE"|
    "AR"|None, "text": MSA-3, "attempts", "answered_at"}], "acked": [control ids answered AA],
    "refused": [AE/AR], "unacknowledged": [no answer], "connection_failures", "elapsed"}``.
    """
    run = run or _run_id()
    schedule = schedule or f"LOAD{run}"
    link = _MLLPLink(host, port, connect_timeout)
    messages, failures = [], 0
    started = time.monotonic()
    try:
        for i in range(n):
            trigger = triggers[i % len(triggers)]
            start = first_start + timedelta(minutes=minutes * (i // len(triggers)))
            control_id = f"LOAD-{run}-{i}"
            record = {"control_id": control_id, "trigger": f"SIU^{trigger}", "slot_id": slot_id(schedule, start),
                      "ack": None, "text": "", "attempts": 0, "answered_at": None}
            messages.append(record)
            if stop is not None and stop.is_set():
                continue
            payload = siu_message(control_id, trigger=trigger, schedule=schedule, start=start, minutes=minutes,
                                  filler_id=f"H-{control_id}" if trigger == "S12" else "")
            for _ in range(max(1, attempts)):
                record["attempts"] += 1
                try:
                    answer = link.exchange(payload, control_id, ack_timeout)
                except OSError:
                    link.close()
                    answer = None
                if answer is not None:
                    record["ack"], record["text"] = answer
                    record["answered_at"] = time.time()
                    break
                failures += 1
                if stop is not None and stop.wait(reconnect_delay):
                    break
                if stop is None:
                    time.sleep(reconnect_delay)
            if interval:
                time.sleep(interval)
    finally:
        link.close()
    return {
        "run": run,
        "schedule": schedule,
        "messages": messages,
        "acked": [m["control_id"] for m in messages if m["ack"] == "AA"],
        "refused": [m["control_id"] for m in messages if m["ack"] in ("AE", "AR")],
        "unacknowledged": [m["control_id"] for m in messages if m["ack"] is None],
        "connection_failures": failures,
        "elapsed": time.monotonic() - started,
    }


# -- platform side: FHIR bookings ---------------------------------------------------------------------------


def free_slot_ids(lock, n: int | None = None, *, platform: str = "demo", **params) -> list[str]:
    """Ids of (the first ``n``) free slots the gateway offers now."""
    ids = [s["id"] for s in lock.search_slots(platform, status="free", **params)]
    return ids if n is None else ids[:n]


def book_slots(lock, slot_ids: list[str], *, platform: str = "demo", run: str | None = None,
               mrn: str = "MRN-0001", attempts: int = 3, retry_delay: float = 0.5,
               timeout: tuple[float, float] = (2.0, 15.0), interval: float = 0.0,
               stop: threading.Event | None = None) -> dict:
    """``POST /Appointment`` once per slot (``tests.e2e.harness.appointment_for``), as ``platform``.

    Each request carries ``Idempotency-Key: LOAD-<run>-<i>``; on a connection error, a timeout or a 503
    it is sent again (same key, same body) up to ``attempts`` times in all, ``retry_delay`` apart. Without
    idempotency on the gateway's side a retry after a lost answer may be refused (409: the first attempt
    holds the slot), so the whole story is kept in ``answers``.

    Returns ``{"run", "bookings": [{"slot_id", "key", "status": last HTTP status or None, "appointment_id",
    "appointment_status", "location", "answers": [status codes, or "error: <exception>"], "answered_at"}],
    "status_counts": {status or "failed": count}, "connection_errors", "elapsed"}``.
    """
    from tests.e2e.harness import appointment_for

    run = run or _run_id()
    session = lock.session(platform)
    url = f"{lock.base}/Appointment"
    bookings, errors = [], 0
    started = time.monotonic()
    try:
        for i, sid in enumerate(slot_ids):
            key = f"LOAD-{run}-{i}"
            record = {"slot_id": sid, "key": key, "status": None, "appointment_id": None,
                      "appointment_status": None, "location": None, "answers": [], "answered_at": None}
            bookings.append(record)
            if stop is not None and stop.is_set():
                continue
            body = appointment_for(sid, mrn=mrn)
            for attempt in range(max(1, attempts)):
                if attempt:
                    if stop is not None and stop.wait(retry_delay):
                        break
                    if stop is None:
                        time.sleep(retry_delay)
                try:
                    r = session.post(url, json=body, headers={**FHIR_JSON, "Idempotency-Key": key},
                                     timeout=timeout)
                except requests.RequestException as e:
                    errors += 1
                    record["answers"].append(f"error: {type(e).__name__}: {e}"[:300])
                    session.close()
                    session = lock.session(platform)
                    continue
                record["answers"].append(r.status_code)
                record["status"] = r.status_code
                record["answered_at"] = time.time()
                record["location"] = r.headers.get("Location")
                try:
                    resource = r.json()
                except ValueError:
                    resource = {}
                if isinstance(resource, dict) and resource.get("resourceType") == "Appointment":
                    record["appointment_id"] = resource.get("id")
                    record["appointment_status"] = resource.get("status")
                if r.status_code != 503:
                    break
            if interval:
                time.sleep(interval)
    finally:
        session.close()
    counts = Counter(b["status"] if b["status"] is not None else "failed" for b in bookings)
    return {
        "run": run,
        "bookings": bookings,
        "status_counts": dict(counts),
        "connection_errors": errors,
        "elapsed": time.monotonic() - started,
    }


def run_mixed(lock, *, sius: int, slot_ids: list[str], run: str | None = None, siu_kwargs: dict | None = None,
              booking_kwargs: dict | None = None, stop: threading.Event | None = None,
              timeout: float | None = None) -> dict:
    """Run :func:`send_sius` (to ``lock.mllp_port``) and :func:`book_slots` at the same time, one thread
    each; returns ``{"his": <send_sius result>, "platform": <book_slots result>}``. A driver that raised
    is reported as ``{"error": "<exception>"}``. ``timeout`` bounds the wait (then ``stop`` is set)."""
    run = run or _run_id()
    stop = stop or threading.Event()
    results: dict = {}

    def drive(name, fn, *args, **kwargs):
        try:
            results[name] = fn(*args, **kwargs)
        except Exception as e:  # reported, not lost in a thread
            results[name] = {"error": f"{type(e).__name__}: {e}"}

    threads = [
        threading.Thread(target=drive, args=("his", send_sius, lock.mllp_port, sius),
                         kwargs={"run": f"{run}H", "stop": stop, **(siu_kwargs or {})}, daemon=True),
        threading.Thread(target=drive, args=("platform", book_slots, lock, slot_ids),
                         kwargs={"run": f"{run}P", "stop": stop, **(booking_kwargs or {})}, daemon=True),
    ]
    for t in threads:
        t.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        stop.set()
        for t in threads:
            t.join(30)
    return results
