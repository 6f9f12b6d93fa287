"""Routes to several HIS endpoints (issue 6): by message type and by facility, first match wins, the HIS by
default — as configured in the YAML (every mistake named with file:line:key), and as the booking service
applies them on a real chamber: a booking goes to the endpoint of the facility that published its schedule,
carries that facility in MSH-6, and its cancellation follows it."""

import functools
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from twisted.internet import task

from adapters.hl7.er7 import parse
from adapters.maps.srm_booking import Hl7Header, build_srm
from gateway.domain.booking import BookingService, HisLinkInfo
from gateway.domain.slot_book import SlotBook
from gateway.chamber.engine import Chamber
from gateway.domain.model import BookingRequest, HisAnswer, Patient, PatientIdentifier, ScheduleInfo, SlotNotice
from gateway.domain.ids import slot_id
from tests.deferreds import successResultOf
from tests.unit import config_files

HEAD = """
inner:
  his: {host: 127.0.0.1, port: 2576, name: his, receiving_application: HIS}
  endpoints:
    - {name: his-branch-a, host: 127.0.0.1, port: 2577, receiving_application: HIS-A}
    - {name: pharmacy, host: 127.0.0.1, port: 2578, receiving_application: PHARM, send_types: [RDE^O11]}
"""


def load(tmp_path, text):
    return config_files.load(tmp_path, text, HEAD)


def problems(tmp_path, text):
    return config_files.problems(tmp_path, text, HEAD)


# -- the configuration -----------------------------------------------------------------------------------


def test_routes_by_type_and_by_facility_first_match_wins_default_the_his(tmp_path):
    """A facility route takes only that facility's messages (of its types, or of every type without
    ``types``); a type route takes its types for any facility; the first match wins; the rest goes to
    the HIS."""
    config = load(tmp_path, """
routes:
  - {types: [SRM], facility: 分院A, to: his-branch-a}
  - {facility: BRANCH-A, to: his-branch-a}
  - {types: [RDE^O11], to: pharmacy}
  - {types: [SRM^S01], to: his-branch-a}
""")
    assert config.route("SRM^S01", "分院A") == "his-branch-a"
    assert config.route("SRM^S04", "分院A") == "his-branch-a"
    assert config.route("SQM^S25", "BRANCH-A") == "his-branch-a"  # no types: every type
    assert config.route("RDE^O11", "分院A") == "pharmacy"  # the facility route is for SRM only
    assert config.route("RDE^O11") == "pharmacy"
    assert config.route("SRM^S01", "分院B") == "his-branch-a"  # first match: the type route
    assert config.route("SRM^S04", "分院B") == "his"  # nothing matches: the HIS
    assert config.route("SRM^S04") == "his"
    assert config.route_taken("SRM^S01", "分院A").facility == "分院A"
    assert config.route_taken("SRM^S04") is None


def test_facility_is_compared_exactly(tmp_path):
    """'branch-a' is not 'BRANCH-A' (HL7 values are case-sensitive); a message for no facility never takes
    a facility route."""
    config = load(tmp_path, "routes: [{facility: BRANCH-A, to: his-branch-a}]\n")
    assert config.route("SRM^S01", "branch-a") == "his"
    assert config.route("SRM^S01", None) == "his"
    assert config.route("SRM^S01", "") == "his"


def test_a_route_to_an_unknown_endpoint_is_refused_with_file_line_and_key(tmp_path):
    """check-config names the route, its line and key, for the facility form as for the type form."""
    found = problems(tmp_path, """routes:
  - {types: [RDE^O11], to: pharmacy}
  - {types: [SRM], facility: 分院B, to: his-branch-b}
  - {facility: 分院C, to: nowhere}
""")
    assert any(p.startswith("9:routes[1].to: no HIS endpoint is named 'his-branch-b'") for p in found), found
    assert any(p.startswith("10:routes[2].to: no HIS endpoint is named 'nowhere'") for p in found), found
    assert len(found) == 2, found


def test_route_mistakes_are_reported_with_their_keys(tmp_path):
    """A route with neither types nor facility, an empty facility, a facility route to an endpoint that may
    not send SRM, and an unknown key: each named, all at once."""
    found = problems(tmp_path, """routes:
  - {to: his-branch-a}
  - {facility: " ", to: his-branch-a}
  - {facility: 分院A, to: pharmacy}
  - {facilty: 分院A, to: his}
""")
    keys = [p.split(": ")[0] for p in found]
    assert "8:routes[0].types" in keys, found
    assert "9:routes[1].facility" in keys, found
    assert "10:routes[2].to" in keys and any("do not allow SRM" in p for p in found), found
    assert any(p.startswith("11:routes[3].facilty") for p in found), found


def test_outbound_z_segments_must_be_z_segments(tmp_path):
    """inner.his.z_segments takes ER7 segments named Z.., without line breaks; others are refused by key."""
    found = problems(tmp_path, "    - {name: x, host: h, port: 1, receiving_application: X, "
                               "z_segments: ['ZCH|WEB', 'PID|1', 'ZX|a']}\n")
    assert [p.split(": ")[0] for p in found] == ["7:inner.endpoints[2].z_segments[1]",
                                                  "7:inner.endpoints[2].z_segments[2]"], found
    found = problems(tmp_path, "    - {name: x, host: h, port: 1, receiving_application: X, charset: ascii, "
                               "z_segments: ['ZCH|WEB', 'ZCH|互联网']}\n")
    assert [p.split(": ")[0] for p in found] == ["7:inner.endpoints[2].z_segments[1]"], found


# -- the booking service applies them ---------------------------------------------------------------------

TZ = ZoneInfo("Asia/Shanghai")
START = datetime(2030, 1, 7, 8, 0)
PATIENT = Patient((PatientIdentifier("urn:demo:mrn", "MRN-1", "MR"),), "王", "芳", "13800000000")


def schedule(sid, facility):
    return ScheduleInfo(sid, f"Dr {sid}", sid, f"Dr {sid}", "CARD", "心内科", facility=facility)


@pytest.fixture
def env(tmp_path, chamber_backend):
    """Three schedules: D-A published by 分院A, D-B by BRANCH-B, D-H by the main hospital (HOSPITAL); routes
    send 分院A's bookings to his-branch-a and BRANCH-B's to his-branch-b; each endpoint has its own MSH-5/6
    and Z-segments."""
    config = load(tmp_path, """    - {name: his-branch-b, host: 127.0.0.1, port: 2579, receiving_application: HIS-B,
       receiving_facility: B-DEFAULT, cancel_message: SRM^S03, z_segments: ['ZCH|WEB^{platform}|互联网']}
routes:
  - {types: [SRM], facility: 分院A, to: his-branch-a}
  - {facility: BRANCH-B, to: his-branch-b}
""")
    clock = task.Clock()
    clock.advance(datetime(2030, 1, 1, tzinfo=TZ).timestamp())
    chamber = Chamber(backend=chamber_backend(), clock=clock.seconds)
    chamber.open()
    links = {}
    for e in (config.inner.his, *config.inner.endpoints):
        header = Hl7Header("GATEWAYD", "FRONT", e.receiving_application, e.receiving_facility, "2.5", "utf-8")
        links[e.name] = HisLinkInfo(e.name, "utf-8", e.cancel_message.split("^")[1],
                                    functools.partial(build_srm, header=header), tuple(e.z_segments))
    booking = BookingService(chamber, links["his"], tz=TZ, hold_seconds=60, clock=clock, route=config.route_taken,
                             by_facility=True, links=links)
    book = SlotBook(TZ)
    chamber.transact_now(lambda tx: book.apply(tx, [
        SlotNotice("open", schedule(sid, facility), START, 15, "card", "心内科门诊")
        for sid, facility in (("D-A", "分院A"), ("D-B", "BRANCH-B"), ("D-H", "HOSPITAL"))]))
    yield chamber, booking
    booking.stop()
    chamber.close()


def queued(chamber, appointment_id):
    return [m for m in reversed(chamber.read().messages(direction="outbound"))
            if m.subject == f"appointment:{appointment_id}"]


def sent(chamber, booking, message):
    """Encode as the inner gate does before the first send; the message as the HIS would read it."""
    def work(tx):
        body, type_, charset = booking.encode(tx, tx.message(message.id))
        tx.set_encoded(message.id, body, type_, charset)
        return body

    return parse(chamber.transact_now(work))


def test_schedules_remember_the_facility_that_published_them(env):
    chamber, _ = env
    assert {s.id: s.facility for s in chamber.read().schedules()} == {"D-A": "分院A", "D-B": "BRANCH-B",
                                                                      "D-H": "HOSPITAL"}


@pytest.mark.parametrize("sid, peer, msh5, msh6", [
    ("D-A", "his-branch-a", "HIS-A", "分院A"),
    ("D-B", "his-branch-b", "HIS-B", "BRANCH-B"),
    ("D-H", "his", "HIS", "HOSPITAL"),  # no route for its facility: the HIS, with its own MSH-6
])
def test_a_booking_goes_to_its_facilitys_endpoint_with_the_facility_in_msh6(env, sid, peer, msh5, msh6):
    chamber, booking = env
    appointment_id, _ = successResultOf(booking.book("demo", BookingRequest(slot_id(sid, START), PATIENT)))
    [msg] = queued(chamber, appointment_id)
    assert msg.peer == peer
    srm = sent(chamber, booking, msg)
    assert (srm.receiving_application, srm.receiving_facility) == (msh5, msh6)


def test_the_outer_gate_routes_without_knowing_any_endpoint(env):
    """Split lock: the outer gate has routes (names only) and no HIS links; it queues to the right name."""
    chamber, inner_booking = env
    outer = BookingService(chamber, HisLinkInfo("his"), tz=TZ, hold_seconds=60, clock=inner_booking.clock,
                           route=inner_booking.route, by_facility=True)
    try:
        appointment_id, _ = successResultOf(outer.book("demo", BookingRequest(slot_id("D-B", START), PATIENT)))
        assert [m.peer for m in queued(chamber, appointment_id)] == ["his-branch-b"]
    finally:
        outer.stop()


def test_a_cancellation_follows_its_booking_with_the_endpoints_own_cancel_and_z_segments(env):
    """The cancel goes to the endpoint that has the booking (SRM^S03 there, as that endpoint is configured),
    with the same MSH-6; the endpoint's Z-segments ride on both, '{platform}' filled in."""
    chamber, booking = env
    appointment_id, _ = successResultOf(booking.book("demo", BookingRequest(slot_id("D-B", START), PATIENT)))
    [book_msg] = queued(chamber, appointment_id)
    srm = sent(chamber, booking, book_msg)
    assert [s.er7() for s in srm.all("ZCH")] == ["ZCH|WEB^demo|互联网"]
    assert srm.segments[-1].name == "ZCH"
    chamber.transact_now(lambda tx: booking.on_answer(tx, tx.message(book_msg.id), HisAnswer("AA", "", "H1")))
    settled = [r for r in chamber.read().audit_records() if r.action == "book.settled"]
    assert [(r.resource_id, r.source) for r in settled] == [(appointment_id, "his:his-branch-b")]  # who answered
    assert successResultOf(booking.cancel("demo", appointment_id)) == "sent"
    cancel_msg = queued(chamber, appointment_id)[-1]
    assert cancel_msg.peer == "his-branch-b"
    srm = sent(chamber, booking, cancel_msg)
    assert (srm.type_name, srm.receiving_facility) == ("SRM^S03", "BRANCH-B")
    assert [s.er7() for s in srm.all("ZCH")] == ["ZCH|WEB^demo|互联网"]


def test_no_z_segments_unless_configured(env):
    chamber, booking = env
    appointment_id, _ = successResultOf(booking.book("demo", BookingRequest(slot_id("D-A", START), PATIENT)))
    srm = sent(chamber, booking, queued(chamber, appointment_id)[0])
    assert not [s for s in srm.segments if s.name.startswith("Z")]


def test_a_hold_told_to_the_his_is_confirmed_where_it_went_even_after_the_routes_changed(env):
    """outer.hold_at_his: the tentative SRM^S01 went to BRANCH-B's endpoint; the routes then change (SIGHUP)
    so that BRANCH-B's bookings would go to the HIS; $book's confirming SRM^S01 still goes where the hold is."""
    chamber, booking = env
    booking.hold_at_his = True
    appointment_id = successResultOf(booking.hold("demo", slot_id("D-B", START), PATIENT))
    [hold_msg] = queued(chamber, appointment_id)
    assert hold_msg.peer == "his-branch-b"
    sent(chamber, booking, hold_msg)
    chamber.transact_now(lambda tx: booking.on_answer(tx, tx.message(hold_msg.id), HisAnswer("AA", "", "H9")))
    booking.route = lambda message_type, facility=None: None  # every route gone: all to the HIS
    assert successResultOf(booking.book_held("demo", appointment_id, PATIENT)) == "new"
    confirm = queued(chamber, appointment_id)[-1]
    assert confirm.type == "SRM^S01" and confirm.peer == "his-branch-b"


def test_a_move_to_another_facilitys_slot_is_cancel_and_new_even_where_the_his_moves_with_s03(env):
    """BRANCH-B's HIS moves bookings with SRM^S03, but the booking being moved is at 分院A's HIS: the new slot
    gets an ordinary SRM^S01 at B (an S03 there would name a booking B does not have), and once B accepts,
    the old booking is cancelled at A."""
    from dataclasses import replace as with_changes

    chamber, booking = env
    booking.links["his-branch-b"] = with_changes(booking.links["his-branch-b"], move_trigger="S03")
    old_id, _ = successResultOf(booking.book("demo", BookingRequest(slot_id("D-A", START), PATIENT)))
    [old_msg] = queued(chamber, old_id)
    sent(chamber, booking, old_msg)
    chamber.transact_now(lambda tx: booking.on_answer(tx, tx.message(old_msg.id), HisAnswer("AA", "", "HA1")))
    new_id = successResultOf(booking.reschedule("demo", old_id, slot_id("D-B", START)))
    [new_msg] = queued(chamber, new_id)
    assert new_msg.peer == "his-branch-b"
    assert sent(chamber, booking, new_msg).type_name.startswith("SRM^S01")
    new_msg = chamber.read().message(new_msg.id)
    chamber.transact_now(lambda tx: booking.on_answer(tx, new_msg, HisAnswer("AA", "", "HB1")))
    cancel = queued(chamber, old_id)[-1]
    assert (cancel.type, cancel.peer) == ("SRM^cancel", "his-branch-a")
    assert chamber.read().appointment(new_id).status == "booked"


def test_his_addresses_must_be_ip_addresses(tmp_path):
    """inner.his_addresses are compared with a connection's source address at accept: a host name (never
    resolved there) or a typo would reserve nothing, so it is refused, naming the entry."""
    head = HEAD.replace("inner:\n", "inner:\n  his_addresses: [10.1.2.3, his.example.org, '::1']\n")
    found = config_files.problems(tmp_path, "", head)
    assert len(found) == 1 and found[0].startswith("3:inner.his_addresses[1]: 'his.example.org' is not an IP"), found
    assert config_files.load(tmp_path, "", HEAD.replace("inner:\n", "inner:\n  his_addresses: [10.1.2.3, '::1']\n"))
