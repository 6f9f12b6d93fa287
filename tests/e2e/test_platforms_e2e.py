"""Platforms get exactly what the hospital grants them, over the real sockets: scopes, revoked certificates,
rate limits, slot quotas under concurrency and across restarts, the audit trail (verify, export, tamper
detection) and no patient data in the log or the chamber's non-patient tables.  Then a fuzz pass.

One HIS simulator + gateway for the module (``granted``): one doctor, one day (two days ahead, so no slot
is inside a release window unless a test widens it), sessions 08:00-16:20 in 5-minute slots = 100 slots.
The tests run in file order; the quota test comes last because it restarts the gateway with a wider
release window.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import timedelta
from urllib.parse import quote

import pytest
import yaml
from cryptography import x509
from fhir.resources.R4B.auditevent import AuditEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.hl7.er7 import parse
from tests.e2e.harness import REPO, Lock, appointment_for, eventually, hospital_today, mllp_exchange

JSON = {"Content-Type": "application/fhir+json"}
PLATFORMS = ("demo", "other", "zero", "readonly", "limited", "revoked")

NAME_FAMILY, NAME_GIVEN = "欧阳", "娜娜"
ID_CARD = "11010519491231002X"
PHONE = "13912345678"
#: identifiers a platform puts in a URL where an id goes (issue 15, finding 5): glued to a letter, under a
#: Chinese character, an ID card number after "ID"; the digits must reach neither the log nor the audit
PROBES = ("x13655550002", "A13655550003", "%E7%A9%BA13655550004", "ID110105194912310049")
SECRETS = (NAME_FAMILY + NAME_GIVEN, NAME_FAMILY, NAME_GIVEN, ID_CARD, PHONE,
           "13655550002", "13655550003", "13655550004", "110105194912310049")


@pytest.fixture(scope="module")
def granted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("granted")
    day = hospital_today() + timedelta(days=2)
    lock = Lock(workdir, platforms=PLATFORMS, doctors=1, days=1, his={"pass_z_segments": True}, sim={
        "start_date": day.isoformat(),
        "departments": [{"code": "CARD", "name": "心内科", "doctors": [{
            "id": "D001", "family": "张", "given": "医生", "service": {"code": "cardiology-consult",
                                                                     "text": "心内科门诊"},
            "sessions": ["08:00-16:20"], "slot_minutes": 5}]}],
    })
    lock.slot_count = 100
    lock.day = day
    by_name = {p["name"]: p for p in lock.gateway_config["platforms"]}
    by_name["demo"]["quotas"] = [{"schedule": "*", "share": "5%", "release_before": "1h"}]
    by_name["zero"]["quotas"] = [{"schedule": "D001", "per_day": 0, "release_before": "1h"}]
    by_name["readonly"]["scopes"] = ["Slot.read", "Schedule.read"]
    by_name["limited"]["rate_limit"] = {"per_second": 1, "burst": 3}
    revoked = x509.load_pem_x509_certificate((lock.certs / "platform-revoked.pem").read_bytes())
    by_name["revoked"]["revoked_serials"] = [format(revoked.serial_number, "X")]
    lock.write_configs()
    with lock:
        yield lock


def outcome(response, status, code=None):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    if code:
        assert body["issue"][0]["code"] == code, body
    return body["issue"][0]["diagnostics"]


def patient_appointment(slot_id: str) -> dict:
    """A booking full of patient data: a name, a national ID card number, a mobile number."""
    body = appointment_for(slot_id)
    body["contained"][0]["identifier"] = [{"system": "urn:oid:1.2.156.112604.1.2.1", "value": ID_CARD,
                                           "type": {"coding": [{"code": "NI"}]}}]
    body["contained"][0]["name"] = [{"family": NAME_FAMILY, "given": [NAME_GIVEN]}]
    body["contained"][0]["telecom"] = [{"system": "phone", "value": PHONE}]
    return body


def gatewayd(lock: Lock, *args: str, config: str = "gateway.yaml") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", config], cwd=lock.workdir,
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": str(REPO)})


def free_slots(lock, platform):
    return [s["id"] for s in lock.search_slots(platform, status="free")]


# -- identity and scopes ----------------------------------------------------------------------------------

def test_a_platform_without_the_scope_gets_403_with_an_operation_outcome(granted):
    lock = granted
    s = lock.session("readonly")
    slot = free_slots(lock, "readonly")[0]
    assert "Appointment.write" in outcome(s.post(f"{lock.base}/Appointment", json=appointment_for(slot),
                                                 headers=JSON), 403, "forbidden")
    outcome(s.get(f"{lock.base}/Appointment"), 403, "forbidden")
    assert s.get(f"{lock.base}/Slot/{slot}").json()["status"] == "free"  # Slot.read it has; nothing held


def test_platform_a_cannot_read_or_cancel_platform_bs_appointment(granted):
    lock = granted
    slot = free_slots(lock, "other")[-1]
    booked = lock.session("other").post(f"{lock.base}/Appointment", json=appointment_for(slot), headers=JSON)
    assert booked.status_code == 201
    appointment_id = booked.json()["id"]
    demo = lock.session("demo")
    outcome(demo.get(f"{lock.base}/Appointment/{appointment_id}"), 404, "not-found")
    outcome(demo.patch(f"{lock.base}/Appointment/{appointment_id}",
                       json=[{"op": "replace", "path": "/status", "value": "cancelled"}],
                       headers={"Content-Type": "application/json-patch+json"}), 404, "not-found")
    assert lock.session("other").get(f"{lock.base}/Appointment/{appointment_id}").json()["status"] == "booked"


def test_a_revoked_certificate_is_refused(granted):
    """Signed by the CA and registered, but its serial is in revoked_serials: 403 on every request."""
    assert "revoked" in outcome(granted.session("revoked").get(f"{granted.base}/metadata"), 403, "security")


def test_over_its_rate_limit_a_platform_gets_429_with_retry_after(granted):
    """'limited' may make 1 request/s with a burst of 3: eight at once give three answers and 429s."""
    lock = granted
    s = lock.session("limited")
    responses = [s.get(f"{lock.base}/metadata") for _ in range(8)]
    codes = [r.status_code for r in responses]
    assert codes[:3] == [200, 200, 200] and codes.count(429) >= 4, codes
    refused = next(r for r in responses if r.status_code == 429)
    outcome(refused, 429, "throttled")
    assert int(refused.headers["Retry-After"]) >= 1
    assert lock.session("demo").get(f"{lock.base}/metadata").status_code == 200  # others are not affected
    time.sleep(1.1)
    assert s.get(f"{lock.base}/metadata").status_code == 200


# -- no patient data in the log or the chamber's non-patient tables -------------------------------------------

def siu(control_id: str, trigger: str, schedule: str, start: str, status: str) -> bytes:
    end = start[:-2] + "05"
    return ("MSH|^~\\&|HIS|HOSPITAL|GATEWAYD|FRONT|20301010120000||SIU^" + trigger + "^SIU_S12|" + control_id
            + "|P|2.5\r"
            f"SCH|H-{control_id}||||{schedule}||||5|MIN|^^5^{start}^{end}|||||||||||||{status}\r"
            f"PID|1||{ID_CARD}^^^^NI||{NAME_FAMILY}^{NAME_GIVEN}||19491231|F|||||{PHONE}\r"
            f"RGS|1\rAIS|1||x^y|{start}|||5|MIN\r"
            f"ZPT|{NAME_FAMILY}{NAME_GIVEN}|{ID_CARD}|{PHONE}\r").encode()  # a Z-segment with the patient, too


def test_patient_data_stays_out_of_the_log_and_the_non_patient_tables(granted):
    """Bookings full of patient data cross every path — booked and cancelled, refused by quota, scope,
    validation, an unknown slot, XML, too deep a body, a bad query, an id in the URL (also with letters or a
    Chinese character glued to it, which reached the log and the audit before); and from the HIS, SIU
    with a PID segment and a Z-segment naming the patient (the HIS passes its Z-segments on) accepted (AA),
    refused (AE) and of an unsupported type (AR), and junk — then the
    gateway's log and every non-patient table of the chamber are searched for the name, the ID card number
    and the phone number."""
    lock = granted
    other = lock.session("other")
    slots = free_slots(lock, "other")
    booked = other.post(f"{lock.base}/Appointment", json=patient_appointment(slots[10]), headers=JSON)
    assert booked.status_code == 201, booked.text
    appointment_id = booked.json()["id"]
    assert booked.json()["contained"][0]["telecom"][0]["value"] == PHONE  # the platform gets its data back
    cancel = other.put(f"{lock.base}/Appointment/{appointment_id}",
                       json={**booked.json(), "status": "cancelled"}, headers=JSON)
    assert cancel.status_code == 200, cancel.text
    outcome(lock.session("zero").post(f"{lock.base}/Appointment", json=patient_appointment(slots[11]),
                                      headers=JSON), 409, "business-rule")
    outcome(lock.session("readonly").post(f"{lock.base}/Appointment", json=patient_appointment(slots[11]),
                                          headers=JSON), 403, "forbidden")
    invalid = patient_appointment(slots[11])
    invalid["status"] = f"{NAME_FAMILY}{NAME_GIVEN}"
    assert other.post(f"{lock.base}/Appointment", json=invalid, headers=JSON).status_code in (400, 422)
    wrong_type = patient_appointment(slots[11])
    wrong_type["contained"][0]["birthDate"] = PHONE
    assert other.post(f"{lock.base}/Appointment", json=wrong_type, headers=JSON).status_code == 400
    outcome(other.post(f"{lock.base}/Appointment", json=patient_appointment("D009-203001010800"), headers=JSON),
            422)
    xml = f"<Appointment><name value='{NAME_FAMILY}{NAME_GIVEN}'/><id value='{ID_CARD}'/></Appointment>"
    outcome(other.post(f"{lock.base}/Appointment", data=xml.encode(),
                       headers={"Content-Type": "application/fhir+xml"}), 415)
    deep = json.dumps(patient_appointment(slots[11]))
    outcome(other.post(f"{lock.base}/Appointment", data=("[" * 40 + deep + "]" * 40).encode(), headers=JSON), 400)
    outcome(other.post(f"{lock.base}/Appointment", data=deep[:-40].encode(), headers=JSON), 400)
    outcome(other.get(f"{lock.base}/Appointment", params={"name": NAME_FAMILY + NAME_GIVEN}), 400)
    outcome(other.get(f"{lock.base}/Slot", params={"start": PHONE}), 400)
    outcome(other.get(f"{lock.base}/Appointment/{ID_CARD}"), 404)
    outcome(other.get(f"{lock.base}/Appointment/{quote(NAME_FAMILY)}"), 404)
    for probe in PROBES:
        outcome(other.get(f"{lock.base}/Appointment/{probe}"), 404)

    answers = [parse(mllp_exchange(lock.mllp_port, msg)).segment("MSA").get(1) for msg in (
        siu("MASK-S12", "S12", "D001", "203010100800", "Booked"),
        siu("MASK-AE", "S12", "", "203010100805", "Booked"),
        siu("MASK-AR", "S12", "D001", "203010100810", "Booked").replace(b"SIU^S12^SIU_S12", b"ADT^A01^ADT_A01"),
        f"not HL7 at all: {NAME_FAMILY}{NAME_GIVEN} {ID_CARD} {PHONE}".encode(),
    )]
    assert answers == ["AA", "AE", "AR", "AR"]
    eventually(lambda: lock.session("other").get(f"{lock.base}/Slot/D001-203010100800").json()["status"] == "busy",
               what="the SIU^S12 from the HIS to be applied")

    time.sleep(0.3)  # let the last log lines reach the file
    log_text = lock.gateway.log_path.read_text(encoding="utf-8")
    assert "outer.request" in log_text and "inner.message" in log_text  # the log did record these paths
    for secret in SECRETS:
        assert secret not in log_text, f"{secret!r} is in the gateway's log"

    conn = sqlite3.connect(lock.workdir / "chamber.sqlite3")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert "audit_records" in tables
        # where patient data is kept by design: raw HL7, the booking's patient (and its earlier versions, for
        # vread), the platform's request as sent
        patient_columns = {("messages", "body"), ("appointments", "patient"), ("appointment_versions", "patient"),
                           ("platform_requests", "body")}
        dumped = []
        for table in tables:
            if table == "appointments":
                continue  # the patient table: what the HIS needs to book, by design
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            keep = [c for c in columns if (table, c) not in patient_columns]
            for row in conn.execute(f"SELECT {', '.join(keep)} FROM {table}"):
                dumped.append(json.dumps([v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                                          for v in row], ensure_ascii=False))
        text = "\n".join(dumped)
        assert appointment_id in text  # the audit (and the message story) do name the appointment ...
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} is in a non-patient table of the chamber"
        bodies = b"".join(r[0] for r in conn.execute("SELECT body FROM messages"))
        assert ID_CARD.encode() in bodies  # ... and the raw HL7 kept for reprocessing has it, by design
    finally:
        conn.close()


def test_text_the_gateway_cannot_keep_is_refused_and_no_control_byte_reaches_the_his(granted):
    """Findings 4, 6 and 7 over the real sockets: a lone surrogate (a 500 before), a NUL (written raw into
    PID-5 before) and a key named twice (the last one won) are 400 with an OperationOutcome naming the
    element, and nothing is queued for the HIS; a TAB, which FHIR text may hold, is booked and crosses as
    \\X09\\. No message the gateway sent the HIS holds a control byte but the segment separator (the bodies
    kept in the chamber are the bytes framed onto the wire)."""
    lock = granted
    other = lock.session("other")
    slot = free_slots(lock, "other")[30]
    sent = "SELECT body FROM messages WHERE direction = 'outbound'"
    before = len(lock.chamber_rows(sent))
    for family in ("\ud800", "欧\x00阳"):
        body = patient_appointment(slot)
        body["contained"][0]["name"] = [{"family": family}]
        r = other.post(f"{lock.base}/Appointment", data=json.dumps(body).encode("ascii"), headers=JSON)
        outcome(r, 400, "invalid")
        assert r.json()["issue"][0]["expression"] == ["Appointment.contained[0].name[0].family"]
    twice = json.dumps(appointment_for(slot))[:-1] + ', "status": "booked"}'
    assert "'status' more than once" in outcome(other.post(f"{lock.base}/Appointment", data=twice.encode(),
                                                           headers=JSON), 400, "invalid")
    assert len(lock.chamber_rows(sent)) == before

    tab = appointment_for(slot, mrn="MRN-TAB\t1")
    tab["contained"][0]["name"] = [{"family": "欧\t阳", "given": ["娜\t娜"]}]
    booked = other.post(f"{lock.base}/Appointment", json=tab, headers=JSON)
    assert booked.status_code == 201, booked.text
    assert any(e["placer"] == booked.json()["id"] and e["ack"] == "AA" for e in lock.received())
    bodies = [row[0] for row in lock.chamber_rows(sent)]
    assert any(b"MRN-TAB\\X09\\1" in body and "欧\\X09\\阳".encode() in body for body in bodies)
    for body in bodies:
        assert not [byte for byte in body if byte < 0x20 and byte != 0x0D], body[:80]
    assert "outer.internal_error" not in lock.gateway.log_path.read_text(encoding="utf-8")


# -- the audit trail ---------------------------------------------------------------------------------------------

def test_audit_verify_and_export_while_the_gateway_runs(granted):
    lock = granted
    verified = gatewayd(lock, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("ok: ")
    exported = gatewayd(lock, "audit", "export", "--since", hospital_today().isoformat(), "--format", "fhir")
    assert exported.returncode == 0, exported.stderr
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    for event in events:
        AuditEvent.model_validate(event)
    who_did_what = Counter((e["agent"][0]["who"].get("display"), e["entity"][0]["detail"][0]["valueString"],
                            e["outcome"]) for e in events if "entity" in e)
    assert who_did_what[("other", "book", "0")] >= 2
    assert who_did_what[("readonly", "book", "4")] >= 2  # refusals are there too
    assert who_did_what[("demo", "read", "4")] >= 1  # the 404 on another platform's appointment
    for secret in SECRETS:
        assert secret not in exported.stdout
    later = gatewayd(lock, "audit", "export", "--since", (hospital_today() + timedelta(days=1)).isoformat())
    assert later.returncode == 0 and later.stdout == ""
    asked = gatewayd(lock, "audit", "find", PROBES[0], PROBES[2])  # the ids are in no record, yet are found
    assert asked.returncode == 0, asked.stdout + asked.stderr
    found = [json.loads(line) for line in asked.stdout.splitlines() if line.startswith("{")]
    assert {(r["platform"], r["action"], r["outcome"]) for r in found} == {("other", "read", 404)}
    assert len({r["resource_id"] for r in found}) == 2 and all(r["resource_id"].startswith("hmac:") for r in found)


def tampered_copy(lock: Lock, name: str, *statements: str) -> str:
    """A copy of the live chamber (SQLite backup), changed as an intruder would, and a config using it."""
    path = lock.workdir / f"{name}.sqlite3"
    src, dst = sqlite3.connect(lock.workdir / "chamber.sqlite3"), sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.execute("DROP TRIGGER audit_records_are_not_changed")
    dst.execute("DROP TRIGGER audit_records_are_pruned_only_behind_the_anchor")
    for sql in statements:
        dst.execute(sql)
    dst.commit()
    dst.close()
    config = {**lock.gateway_config, "chamber": {"path": path.name}}
    (lock.workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return f"{name}.yaml"


def test_editing_or_deleting_one_audit_record_is_found_and_named(granted):
    """Change one record's outcome, or delete one record, in a copy of the SQLite file: `gatewayd audit
    verify` exits 1 and names that record.  (The live chamber refuses both while its triggers stand.)"""
    lock = granted
    conn = sqlite3.connect(lock.workdir / "chamber.sqlite3")
    try:
        count = conn.execute("SELECT count(*) FROM audit_records").fetchone()[0]
        with pytest.raises(sqlite3.DatabaseError):
            conn.execute("UPDATE audit_records SET outcome = 200 WHERE seq = 3")
    finally:
        conn.close()
    assert count >= 10
    k = count // 2
    edited = gatewayd(lock, "audit", "verify", config=tampered_copy(
        lock, "edited", f"UPDATE audit_records SET outcome = 200, platform = 'demo' WHERE seq = {k}"))
    assert edited.returncode == 1
    assert f"BROKEN at record {k}:" in edited.stdout and f"record {k} was changed" in edited.stdout
    deleted = gatewayd(lock, "audit", "verify", config=tampered_copy(
        lock, "deleted", f"DELETE FROM audit_records WHERE seq = {k + 1}"))
    assert deleted.returncode == 1
    assert f"BROKEN at record {k + 1}:" in deleted.stdout and "missing" in deleted.stdout
    assert gatewayd(lock, "audit", "verify").returncode == 0  # the live chamber is untouched


# -- slot quotas (last: it restarts the gateway with a wider release window) -------------------------------------

def test_five_percent_of_a_100_slot_schedule_under_20_concurrent_clients_then_released(granted):
    """demo's quota is 5% of D001's 100 slots that day: 20 clients booking 20 different slots at once get
    exactly 5 bookings and 15 refusals (409 business-rule); the 6th later is refused too; demo's searches no
    longer show that day's free slots while 'other' sees them all; the count survives a restart.  Then the
    release window is widened to 100 h (restart): every remaining slot is visible to everyone again, 'zero'
    (quota 0) included, and demo may book beyond its share."""
    lock = granted
    day = lock.day.strftime("%Y%m%d")
    slots = [s for s in free_slots(lock, "other") if s.startswith(f"D001-{day}")]
    before = len(slots)
    assert before >= 90
    barrier = threading.Barrier(20)
    results: list = [None] * 20

    def book(i):
        s = lock.session("demo")
        s.get(f"{lock.base}/metadata", timeout=10)  # the TLS handshake is done before the race
        barrier.wait()
        results[i] = s.post(f"{lock.base}/Appointment", json=appointment_for(slots[i], mrn=f"MRN-Q{i}"),
                            headers=JSON, timeout=30)

    threads = [threading.Thread(target=book, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = Counter(r.status_code for r in results)
    assert codes[201] + codes[202] == 5 and codes[409] == 15, codes
    for r in results:
        if r.status_code == 409:
            assert "holds 5 of the 5 slot(s)" in outcome(r, 409, "business-rule")
    demo = lock.session("demo")
    outcome(demo.post(f"{lock.base}/Appointment", json=appointment_for(slots[20]), headers=JSON),
            409, "business-rule")
    assert [s for s in free_slots(lock, "demo") if s.startswith(f"D001-{day}")] == []
    assert [s for s in free_slots(lock, "zero") if s.startswith(f"D001-{day}")] == []
    assert len([s for s in free_slots(lock, "other") if s.startswith(f"D001-{day}")]) == before - 5
    outcome(demo.get(f"{lock.base}/Slot/{slots[20]}"), 404, "not-found")

    assert lock.gateway.stop() == 0
    lock.start_gateway()
    outcome(lock.session("demo").post(f"{lock.base}/Appointment", json=appointment_for(slots[21]), headers=JSON),
            409, "business-rule")

    for p in lock.gateway_config["platforms"]:
        for quota in p.get("quotas", []):
            quota["release_before"] = "100h"
    lock.write_configs()
    assert lock.gateway.stop() == 0
    lock.start_gateway()
    for platform in ("demo", "zero", "other"):
        visible = [s for s in free_slots(lock, platform) if s.startswith(f"D001-{day}")]
        assert len(visible) == before - 5, platform
    assert lock.session("demo").post(f"{lock.base}/Appointment", json=appointment_for(slots[21]),
                                     headers=JSON).status_code == 201
    assert lock.session("zero").post(f"{lock.base}/Appointment", json=appointment_for(slots[22]),
                                     headers=JSON).status_code == 201


# -- fuzz ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    lock = Lock(tmp_path_factory.mktemp("fuzz"))
    for p in lock.gateway_config["platforms"]:
        p["rate_limit"] = None
    lock.gateway_config["logging"]["level"] = "warning"
    lock.write_configs()
    with lock:
        lock.fuzz_session = lock.session("demo")
        lock.fuzz_slots = free_slots(lock, "demo")
        booked = lock.fuzz_session.post(f"{lock.base}/Appointment", json=appointment_for(lock.fuzz_slots[-1]),
                                        headers=JSON)
        assert booked.status_code == 201
        lock.fuzz_appointment = booked.json()["id"]
        yield lock


SEGMENTS = st.one_of(
    st.sampled_from(["metadata", "Slot", "Schedule", "Appointment", "Patient", "$book", "_history", "..",
                     "%2e%2e", "%00", "D001", "Appointment/_search"]),
    st.text(min_size=1, max_size=24).map(lambda t: quote(t, safe="")),
)
#: the served routes ({slot} and {appointment} stand for a real one), three times as likely as random paths
ROUTES = st.sampled_from([["Appointment"], ["Appointment"], ["Appointment", "{appointment}"], ["Slot"],
                          ["Slot", "{slot}"], ["Schedule"], ["Schedule", "D001"], ["metadata"]])
PATHS = st.one_of(ROUTES, ROUTES, ROUTES, st.lists(SEGMENTS, max_size=4))
PARAM_NAMES = st.one_of(st.sampled_from(["_count", "_offset", "start", "status", "schedule", "service-type",
                                         "_id", "_format", "_pretty", "name", "identifier"]),
                        st.text(max_size=12))
PARAM_VALUES = st.one_of(st.text(max_size=40), st.integers().map(str),
                         st.sampled_from(["ge2026-11-24", "lt9999-12-31", "eq0001-01-01", "free", "busy,free",
                                          "Schedule/D001", "-1", "1e9", "9" * 400, "ge2026-13-45T99:99"]))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children,
                                                                       max_size=4),
    max_leaves=25)
APPOINTMENT_KEYS = ["resourceType", "status", "slot", "contained", "participant", "identifier", "description",
                    "minutesDuration", "start", "id"]


@st.composite
def appointment_like(draw):
    body = appointment_for(draw(st.sampled_from(["{slot}", "{slot}", "D001-203001010800", "x"])))
    for _ in range(draw(st.integers(0, 3))):
        body[draw(st.sampled_from(APPOINTMENT_KEYS))] = draw(JSON_VALUES)
    return json.dumps(body, ensure_ascii=False).encode()


BODIES = st.one_of(
    appointment_like(), appointment_like(),
    st.none(),
    JSON_VALUES.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
    appointment_like(),
    st.integers(1, 20_000).map(lambda n: ("[" * n + "]" * n).encode()),
    st.integers(1, 20_000).map(lambda n: ('{"a":' * n + "1" + "}" * n).encode()),
    st.binary(max_size=200),
    st.sampled_from([b'{"minutesDuration": 1e999}', b'{"a": NaN}', b"9" * 5000, b'"\\ud800"',
                     b'{"resourceType": "Appointment", "slot": [{"reference": "Slot/' + b"x" * 70000 + b'"}]}']),
)
CONTENT_TYPES = st.one_of(
    st.just("application/fhir+json"), st.just("application/fhir+json"),
    st.sampled_from([None, "application/json", "application/json-patch+json", "application/fhir+xml", "text/plain",
                     "multipart/form-data; boundary=x", "application/x-www-form-urlencoded",
                     "application/fhir+json; charset=latin-1"]))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "GET", "POST", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]),
       segments=PATHS, params=st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=5),
       body=BODIES, content_type=CONTENT_TYPES)
def test_fuzz_never_a_500_and_every_error_is_an_operation_outcome(fuzzed, method, segments, params, body,
                                                                  content_type):
    """Hypothesis-generated requests — methods, paths (unicode, traversal, ids), query strings, bodies
    (random JSON, mutated Appointments, deep nesting, huge numbers and strings, binary) and media types —
    against a running gateway: never a 500, and every error answer is a JSON OperationOutcome."""
    lock = fuzzed
    real = {"{slot}": lock.fuzz_slots[0], "{appointment}": lock.fuzz_appointment}
    url = f"{lock.base}/" + "/".join(real.get(s, s) for s in segments)
    if body is not None:
        body = body.replace(b"{slot}", lock.fuzz_slots[0].encode())
    headers = {"Content-Type": content_type} if content_type else {}
    r = lock.fuzz_session.request(method, url, params=params, data=body, headers=headers, timeout=20,
                                  allow_redirects=False)
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:500])
    if r.status_code >= 400 and method != "HEAD":
        assert r.headers.get("Content-Type", "").startswith("application/fhir+json"), r.headers
        data = r.json()
        assert data["resourceType"] == "OperationOutcome" and data["issue"], data


def test_the_gateway_survived_the_fuzz_without_an_internal_error(fuzzed):
    lock = fuzzed
    assert lock.gateway.alive()
    assert lock.fuzz_session.get(f"{lock.base}/metadata").status_code == 200
    log_text = lock.gateway.log_path.read_text(encoding="utf-8")
    assert "outer.internal_error" not in log_text and "Traceback" not in log_text, log_text[-3000:]
    verified = gatewayd(lock, "audit", "verify")
    assert verified.returncode == 0, verified.stdout
