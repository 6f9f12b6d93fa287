"""The HIS simulator keeps its state across restarts, as a real HIS does (issue 15, finding 11).

Each test starts a simulator from a YAML config on disk (its store is the default one, next to the config),
changes something, stops it (or abandons it, as kill -9 would: only what was committed remains) and starts a
new one from the same config on a new fake reactor. What is proved: bookings, holds and who made them survive
and no slot is published again (no S24 for a booked slot, no S15/S17); appointment ids continue; what the
simulator had answered is answered again byte for byte to a resend; a notification not yet acknowledged goes
again with its MSH-10; an order accepted by the pharmacy is still dispensed. And cancels are matched as a HIS
matches them: by the sender's placer id, checked against the filler id. No sockets, no real time.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from adapters.hl7.er7 import parse
from adapters.maps.rde_order import read_order_answer
from hissim.config import load_config
from hissim.inventory import Inventory, SlotStatus, UnknownBooking
from hissim.service import HisSimulator
from hissim.store import SCHEMA_VERSION, Store, StoreError
from tests.unit.test_hissim import DAY, T0, FakeClient, Wire, at, inventory, schedule, sqm, srm
from tests.unit.test_hissim_pharmacy import golden, with_msh7


def sim_yaml(tmp_path: Path, **changes) -> Path:
    """A simulator config on disk, as a hospital writes one (no ``store`` key: the default store)."""
    config = {
        "listen": "tcp:0:interface=127.0.0.1",
        "gateway": {"host": "127.0.0.1", "port": 1},
        "publish": "push",
        "start_date": DAY.isoformat(),
        "days": 1,
        "counter_bookings_per_minute": 0,
        "seed": 7,
        "departments": [{"code": "CARD", "name": "心内科", "doctors": [
            {"id": "D001", "family": "张", "given": "伟", "service": {"code": "cardiology-consult", "text": "心内科门诊"},
             "sessions": ["08:00-09:00"], "slot_minutes": 15}]}],
        **changes,
    }
    path = tmp_path / "his-sim.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


class Gateway(FakeClient):
    """The fake MLLP client towards the gateway: answers AA to the first ``answers`` messages (None: to all),
    then takes every message and never answers (the simulator waits for its ACK)."""

    def __init__(self, answers: int | None = None):
        super().__init__()
        self.answers = answers

    def send(self, payload, control_id, timeout):
        if self.answers is not None and len(self.sent) >= self.answers:
            self.sent.append(payload)
            return Deferred()
        return super().send(payload, control_id, timeout)


class Run:
    """One run of the simulator from ``config``: a fresh fake reactor (``later`` seconds after T0), a fake
    gateway client, started; ``stop()`` is a clean stop."""

    def __init__(self, config: Path, *, later: float = 0.0, client: Gateway | None = None):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(T0 + later)
        self.client = client if client is not None else Gateway()
        self.sim = HisSimulator(load_config(config), self.reactor, client=self.client,
                                pharmacy_client=self.client)
        self.sim.startService()
        self.settle()

    def settle(self, seconds: float = 0.0) -> None:
        """Let the reactor run ``seconds`` on, then the notifier's pump (it waits a millisecond)."""
        self.reactor.advance(seconds)
        for _ in range(50):
            self.reactor.advance(0.01)

    def ask(self, payload: bytes):
        """The simulator's answer to one message from the gateway, as bytes and parsed."""
        raw = self.sim.handler.handle(parse(payload), None)
        self.settle()
        return raw, parse(raw)

    def sent(self) -> list:
        """What it pushed to the gateway, parsed."""
        return [parse(p) for p in self.client.sent]

    def statuses(self) -> dict[str, tuple[str, str, str]]:
        """Each slot's SCH-25, placer id (SCH-1) and filler id (SCH-2) from its answer to an SQM^S25."""
        _, answer = self.ask(sqm(control_id=f"Q{len(self.client.sent)}-{self.reactor.seconds()}"))
        return {g[0].get(11, 4): (g[0].get(25), g[0].get(1), g[0].get(2)) for g in answer.groups("SCH")}

    def stop(self) -> None:
        self.sim.stopService()
        self.settle()


# ================================================================================================
# Restarts
# ================================================================================================


def test_a_restart_keeps_every_booking_and_publishes_no_slot_again(tmp_path):
    """A gateway booking and a counter booking, then a restart: the new run knows both (SQM: Booked, the same
    placer and HIS appointment ids) and pushes nothing at all: no S24 for any slot (a booked slot announced
    as open is what made the gateway cancel 1,340 bookings), no S15/S17."""
    config = sim_yaml(tmp_path)
    first = Run(config)
    assert [m.trigger for m in first.sent()] == ["S24"] * 4
    _, answer = first.ask(srm(control_id="G1", placer="APT-1", start="203001070800"))
    assert answer.segment("MSA").get(1) == "AA"
    counter = first.sim.counter_booking_now()
    first.settle()
    before = first.statuses()
    assert before["203001070800"] == ("Booked", "APT-1", "H000001")
    assert sum(1 for s in before.values() if s[0] == "Booked") == 2
    first.stop()

    second = Run(config, later=60)
    second.settle(30)
    assert second.sent() == []
    assert second.statuses() == before
    slot = second.sim.inventory.slot(counter.schedule_id, counter.start)
    assert (slot.status, slot.booking.by, slot.booking.appointment_id) == (SlotStatus.BOOKED, "counter", "H000002")


def test_appointment_ids_continue_after_a_restart(tmp_path):
    """H000001 before the restart, H000002 after it: an id the HIS gave is never given again."""
    config = sim_yaml(tmp_path)
    first = Run(config)
    _, answer = first.ask(srm(control_id="G1", placer="APT-1", start="203001070800"))
    assert answer.segment("SCH").get(2) == "H000001"
    first.stop()
    second = Run(config, later=60)
    _, answer = second.ask(srm(control_id="G2", placer="APT-2", start="203001070815"))
    assert (answer.segment("MSA").get(1), answer.segment("SCH").get(2)) == ("AA", "H000002")


def test_a_stale_cancel_after_a_restart_cancels_only_its_own_booking(tmp_path):
    """APT-1 booked H000001, the simulator restarted, APT-2 booked another slot; the gateway's (late) cancel of
    APT-1 naming H000001 cancels APT-1's booking, never APT-2's (once a restarted simulator gave APT-2 the
    id H000001 again and the stale cancel cancelled it)."""
    config = sim_yaml(tmp_path)
    first = Run(config)
    first.ask(srm(control_id="G1", placer="APT-1", start="203001070800"))
    first.stop()
    second = Run(config, later=60)
    second.ask(srm(control_id="G2", placer="APT-2", start="203001070815"))
    _, answer = second.ask(srm("S04", control_id="G3", placer="APT-1", filler="H000001", start="203001070800"))
    assert (answer.segment("MSA").get(1), answer.segment("SCH").get(1)) == ("AA", "APT-1")
    statuses = second.statuses()
    assert statuses["203001070815"][:2] == ("Booked", "APT-2")
    assert statuses["203001070800"][0] == "Open"


def test_a_resend_after_a_restart_gets_the_answer_given_before_it(tmp_path):
    """The gateway did not get the SRR to its cancel before the simulator went down, and resends it (same
    MSH-10, MSH-7 stamped anew): the restarted simulator answers with the very same bytes, and changes
    nothing (no 'no such appointment', which the gateway would read as the hospital refusing)."""
    config = sim_yaml(tmp_path)
    first = Run(config)
    first.ask(srm(control_id="G1", placer="APT-1", start="203001070800"))
    cancel = srm("S04", control_id="G2", placer="APT-1", filler="H000001", start="203001070800")
    answered, _ = first.ask(cancel)
    first.stop()
    second = Run(config, later=60)
    again, _ = second.ask(cancel.replace(b"20300107070000", b"20300107070100", 1))
    assert again == answered
    assert second.sent() == []


def test_a_notification_not_acknowledged_before_a_restart_goes_again_with_its_control_id(tmp_path):
    """The gateway never acknowledged the S12 of a booking before the simulator stopped: the next run sends
    those very bytes again (same MSH-10, so the gateway can drop a duplicate), and nothing else."""
    config = sim_yaml(tmp_path)
    first = Run(config)
    first.ask(srm(control_id="G1", placer="APT-1", start="203001070800"))
    first.client.answers = len(first.client.sent)
    first.sim.counter_booking_now()
    first.settle()
    unanswered = first.client.sent[-1]
    assert parse(unanswered).trigger == "S12"
    first.stop()
    second = Run(config, later=60)
    assert second.client.sent == [unanswered]


def test_new_slots_in_the_config_are_published_after_a_restart_and_only_they(tmp_path):
    """One more day in the config: the restarted simulator opens that day's slots (one S24 each) and publishes
    nothing about the slots it already had."""
    first = Run(sim_yaml(tmp_path))
    first.ask(srm(control_id="G1", placer="APT-1", start="203001070800"))
    first.stop()
    second = Run(sim_yaml(tmp_path, days=2), later=60)
    assert [(m.trigger, m.segment("AIS").get(4)) for m in second.sent()] == [
        ("S24", "203001080800"), ("S24", "203001080815"), ("S24", "203001080830"), ("S24", "203001080845")]
    assert second.statuses()["203001070800"][0] == "Booked"


def test_an_order_accepted_before_a_restart_is_dispensed_and_a_resend_gets_the_same_fillers(tmp_path):
    """The pharmacy accepted an order and stopped before its dispense_delay ran out: the next run sends the
    RDS^O13 when the delay is up, with the filler numbers of its answer; the order resent to it gets the
    very answer of the first run (no second filler number, no second dispense)."""
    config = sim_yaml(tmp_path, publish="none",
                      pharmacy={"listen": "tcp:0:interface=127.0.0.1", "dispense_delay": "10s"})
    first = Run(config)
    order = golden("rde_o11_bundle.utf8.hl7")
    answered = first.sim.pharmacy.handler.handle(parse(order), None)
    fillers = [i.filler_id for i in read_order_answer(parse(answered)).items]
    first.settle(2)
    first.stop()
    assert first.client.sent == []

    second = Run(config, later=4)
    again = second.sim.pharmacy.handler.handle(parse(with_msh7(order, b"20300107091600")), None)
    assert again == answered
    second.settle(3)
    assert second.client.sent == []
    second.settle(5)
    (rds,) = second.sent()
    assert rds.type_name == "RDS^O13"
    assert [orc.get(3) for orc in rds.all("ORC")] == fillers


# ================================================================================================
# Cancels and moves name one booking: the sender's placer id, checked against the filler id
# ================================================================================================


def test_a_cancel_whose_placer_and_filler_ids_name_different_bookings_is_refused(tmp_path):
    """APT-1 holds H000001, APT-2 H000002. An SRM^S04 from APT-1 naming H000002 (a stale or crossed filler
    id) is AR 204 at ARQ-2 and cancels nothing; so is an SRM^S03 move; a cancel with no placer id (ARQ-1)
    is AR 101; the cancel naming APT-1 and its own H000001 is AA."""
    wire = Wire(tmp_path)
    wire.exchange(srm(control_id="G1", placer="APT-1", start="203001070800"))
    wire.exchange(srm(control_id="G2", placer="APT-2", start="203001070815"))
    _raw, answer = wire.exchange(srm("S04", control_id="G3", placer="APT-1", filler="H000002"))
    err = answer.segment("ERR")
    assert (answer.segment("MSA").get(1), err.get(3, 1), err.get(2, 1), err.get(2, 3)) == ("AR", "204", "ARQ", "2")
    _raw, answer = wire.exchange(srm("S03", control_id="G4", placer="APT-1", filler="H000002",
                                     start="203001070830"))
    assert (answer.segment("MSA").get(1), answer.segment("ERR").get(3, 1)) == ("AR", "204")
    _raw, answer = wire.exchange(srm("S04", control_id="G5", placer="", filler="H000002"))
    assert (answer.segment("MSA").get(1), answer.segment("ERR").get(3, 1)) == ("AR", "101")
    assert [wire.inventory.slot("D001", at(8, m)).booking.placer_id for m in (0, 15)] == ["APT-1", "APT-2"]
    assert wire.inventory.slot("D001", at(8, 30)).status is SlotStatus.OPEN
    assert [n.trigger for n in wire.notes] == ["S12", "S12"]
    _raw, answer = wire.exchange(srm("S04", control_id="G6", placer="APT-1", filler="H000001"))
    assert (answer.segment("MSA").get(1), answer.segment("SCH").get(2)) == ("AA", "H000001")


# ================================================================================================
# The store itself
# ================================================================================================


def test_a_new_store_is_wal_at_the_current_schema_version_and_its_owners_alone(tmp_path):
    """The default store is the config's name with .sqlite3, next to it; a new one is created in WAL mode at
    SCHEMA_VERSION, with synchronous=NORMAL (a commit survives kill -9), mode 0600 (the pharmacy's orders name
    patients)."""
    config = load_config(sim_yaml(tmp_path))
    assert config.store == str(tmp_path / "his-sim.sqlite3")
    store = Store(config.store)
    store.open()
    try:
        conn = store._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert (tmp_path / "his-sim.sqlite3").stat().st_mode & 0o777 == 0o600
    finally:
        store.close()


def test_a_store_in_use_or_of_a_newer_simulator_is_refused_with_the_reason(tmp_path):
    """A second simulator on the same store is refused (it would hand out the same appointment ids); so is a
    store whose schema version is newer than this simulator's, which is left untouched."""
    path = tmp_path / "his.sqlite3"
    first = Store(path)
    first.open()
    with pytest.raises(StoreError, match="another simulator is using it"):
        Store(path).open()
    first.close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        Store(path).open()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    raw.close()


def test_a_failed_commit_answers_ae_and_changes_nothing(tmp_path):
    """The store refuses the write (a read-only database here): the MLLP listener answers AE with ERR 207, the
    slot is still open, no appointment id is used up, no SIU is queued and the answer is not remembered; the
    same message once the store writes again is booked as H000001."""
    wire = Wire(tmp_path)
    wire.store._conn.execute("PRAGMA query_only = ON")
    _raw, answer = wire.exchange(srm(control_id="G1", placer="APT-1"))
    assert (answer.segment("MSA").get(1), answer.segment("ERR").get(3, 1)) == ("AE", "207")
    slot = wire.inventory.slot("D001", at(8, 0))
    assert (slot.status, slot.booking, wire.inventory.next_appointment_number) == (SlotStatus.OPEN, None, 1)
    assert wire.notes == []
    wire.store._conn.execute("PRAGMA query_only = OFF")
    _raw, answer = wire.exchange(srm(control_id="G1", placer="APT-1"))
    assert (answer.segment("MSA").get(1), answer.segment("SCH").get(2)) == ("AA", "H000001")
    assert wire.store.load_inventory().slot("D001", at(8, 0)).booking.placer_id == "APT-1"


def test_after_a_kill_only_the_message_in_flight_goes_again(tmp_path):
    """Killed (nothing more is written) while the gateway had taken three S24 and not answered the fourth:
    the next run sends the fourth again, the same bytes, and nothing the gateway had taken."""
    config = sim_yaml(tmp_path)
    first = Run(config, client=Gateway(answers=3))
    assert len(first.client.sent) == 4
    first.sim.store.close()  # kill -9
    second = Run(config, later=60)
    assert second.client.sent == first.client.sent[3:]


def test_discarded_changes_leave_the_inventory_as_it_was():
    """book, move, cancel and a new slot, then discard_changes: every slot, the ids it finds bookings by and the
    next appointment number are those of the last settle."""
    inv = inventory()
    kept = inv.book("D001", at(8, 0), by="APT-1", placer_id="APT-1")
    inv.settle()
    snapshot = inv.slots()
    inv.move("D001", at(8, 15), placer_id="APT-1")
    inv.book("D001", at(8, 0), by="APT-2", placer_id="APT-2")
    inv.cancel(placer_id="APT-2")
    inv.add_slots(Inventory.build([schedule("D009")], DAY, 1).slots())
    assert len(inv.changes().slots) == 2 + 4
    inv.discard_changes()
    assert inv.slots() == snapshot and inv.next_appointment_number == 2
    assert inv.booking(placer_id="APT-1") == kept == inv.booking(appointment_id="H000001")
    with pytest.raises(UnknownBooking):
        inv.booking(placer_id="APT-2")
    assert inv.changes().slots == []
