"""The simulated hospital's slot book: schedules, slots and bookings.

Pure domain code: no I/O, no clock. Every method that depends on time takes ``now`` (a naive datetime
in hospital local time, like every datetime here: HL7 DTMs in the profile carry no offset).

A slot is identified by (schedule id, start). Its state is open, booked (with the HIS appointment id
``H<6 digits>`` and who booked it: ``'counter'`` or the gateway's placer appointment id) or blocked.
The inventory lives in memory and is rebuilt from config at each start: it is a simulator.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta

COUNTER = "counter"


class InventoryError(Exception):
    """Base of the inventory's refusals; ``str()`` is the text the HIS answers with."""


class UnknownSlot(InventoryError):
    pass


class SlotNotOpen(InventoryError):
    pass


class UnknownBooking(InventoryError):
    pass


class SlotStatus(enum.Enum):
    """Slot state, valued as the SCH-25 filler status the profile uses."""

    OPEN = "Open"
    BOOKED = "Booked"
    BLOCKED = "Blocked"


@dataclass(frozen=True)
class Schedule:
    """A doctor's bookable calendar (schedule id = doctor id) and what it offers."""

    id: str
    family: str
    given: str
    department_code: str
    department_name: str
    service_code: str
    service_text: str
    slot_minutes: int
    sessions: tuple[tuple[time, time], ...] = ()

    @property
    def display_name(self) -> str:
        return f"{self.family}{self.given}"


@dataclass(frozen=True)
class Booking:
    appointment_id: str
    schedule_id: str
    start: datetime
    by: str
    placer_id: str | None = None
    tentative: bool = False  # a hold (SRM^S01 with ARQ-8 Tentative), until confirmed or cancelled


@dataclass(frozen=True)
class Slot:
    """A snapshot of one slot; the inventory replaces it on every change."""

    schedule: Schedule
    start: datetime
    minutes: int
    status: SlotStatus = SlotStatus.OPEN
    booking: Booking | None = None

    @property
    def key(self) -> tuple[str, datetime]:
        return (self.schedule.id, self.start)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(minutes=self.minutes)


def parse_session(text: str) -> tuple[time, time]:
    """``"08:00-12:00"`` -> (08:00, 12:00); ValueError if malformed or empty."""
    try:
        first, last = (part.strip() for part in text.split("-"))
        begin = datetime.strptime(first, "%H:%M").time()
        end = datetime.strptime(last, "%H:%M").time()
    except ValueError:
        raise ValueError(f"session {text!r} is not HH:MM-HH:MM") from None
    if end <= begin:
        raise ValueError(f"session {text!r} ends before it starts")
    return begin, end


def session_starts(day: date, session: tuple[time, time], minutes: int) -> list[datetime]:
    """Slot starts of one session on one day: only slots that end within the session."""
    start = datetime.combine(day, session[0])
    end = datetime.combine(day, session[1])
    step = timedelta(minutes=minutes)
    starts = []
    while start + step <= end:
        starts.append(start)
        start += step
    return starts


class Inventory:
    """All slots of all schedules, and the bookings on them."""

    def __init__(self, slots: Iterable[Slot], *, next_appointment_number: int = 1) -> None:
        self._slots: dict[tuple[str, datetime], Slot] = {}
        self._schedules: dict[str, Schedule] = {}
        for slot in slots:
            self._slots[slot.key] = slot
            self._schedules[slot.schedule.id] = slot.schedule
        self._by_appointment: dict[str, tuple[str, datetime]] = {}
        self._by_placer: dict[str, tuple[str, datetime]] = {}
        self._next_number = next_appointment_number

    @classmethod
    def build(cls, schedules: Sequence[Schedule], first_day: date, days: int) -> Inventory:
        """Every slot of every schedule's sessions on ``days`` days from ``first_day``, all open."""
        slots = []
        for offset in range(days):
            day = first_day + timedelta(days=offset)
            for schedule in schedules:
                for session in schedule.sessions:
                    for start in session_starts(day, session, schedule.slot_minutes):
                        slots.append(Slot(schedule, start, schedule.slot_minutes))
        return cls(slots)

    # -- reading -----------------------------------------------------------------------------

    def schedules(self) -> list[Schedule]:
        return list(self._schedules.values())

    def slots(self, start_from: datetime | None = None, until: datetime | None = None) -> list[Slot]:
        """Slots whose start is within [start_from, until] (either bound may be None), in start order."""
        chosen = [
            slot
            for slot in self._slots.values()
            if (start_from is None or slot.start >= start_from) and (until is None or slot.start <= until)
        ]
        chosen.sort(key=lambda s: (s.start, s.schedule.id))
        return chosen

    def open_slots(self) -> list[Slot]:
        return [slot for slot in self.slots() if slot.status is SlotStatus.OPEN]

    def slot(self, schedule_id: str, start: datetime) -> Slot:
        try:
            return self._slots[(schedule_id, start)]
        except KeyError:
            raise UnknownSlot("no such slot") from None

    def booking(self, *, appointment_id: str | None = None, placer_id: str | None = None) -> Booking:
        """The live booking with this HIS appointment id, else with this placer id; UnknownBooking."""
        key = None
        if appointment_id:
            key = self._by_appointment.get(appointment_id)
        if key is None and placer_id:
            key = self._by_placer.get(placer_id)
        if key is None:
            raise UnknownBooking("no such appointment")
        booking = self._slots[key].booking
        assert booking is not None
        return booking

    # -- changing ----------------------------------------------------------------------------

    def book(self, schedule_id: str, start: datetime, by: str, placer_id: str | None = None,
             tentative: bool = False) -> Booking:
        """Book an open slot (``tentative``: hold it for that placer); returns the booking with its new HIS
        appointment id.

        Raises UnknownSlot, or SlotNotOpen when the slot is booked or blocked.
        """
        slot = self.slot(schedule_id, start)
        if slot.status is SlotStatus.BOOKED:
            raise SlotNotOpen("slot already booked")
        if slot.status is SlotStatus.BLOCKED:
            raise SlotNotOpen("slot blocked")
        booking = Booking(
            appointment_id=f"H{self._next_number:06d}",
            schedule_id=schedule_id,
            start=start,
            by=by,
            placer_id=placer_id,
            tentative=tentative,
        )
        self._next_number += 1
        self._slots[slot.key] = dataclasses.replace(slot, status=SlotStatus.BOOKED, booking=booking)
        self._by_appointment[booking.appointment_id] = slot.key
        if placer_id:
            self._by_placer[placer_id] = slot.key
        return booking

    def confirm(self, booking: Booking) -> Booking:
        """A tentative booking becomes a booking (the placer's ordinary SRM^S01 for the slot it holds)."""
        confirmed = dataclasses.replace(booking, tentative=False)
        key = (booking.schedule_id, booking.start)
        self._slots[key] = dataclasses.replace(self._slots[key], booking=confirmed)
        return confirmed

    def move(self, schedule_id: str, start: datetime, *, appointment_id: str | None = None,
             placer_id: str | None = None) -> Booking:
        """Move a booking (found as in :meth:`cancel`) to another open slot, keeping its HIS appointment id and
        placer; the old slot opens.  The same slot: nothing changes.  UnknownBooking, UnknownSlot, SlotNotOpen."""
        booking = self.booking(appointment_id=appointment_id, placer_id=placer_id)
        target = self.slot(schedule_id, start)
        if target.key == (booking.schedule_id, booking.start):
            return booking
        if target.status is not SlotStatus.OPEN:
            raise SlotNotOpen(f"slot {target.status.value.lower()}")
        old_key = (booking.schedule_id, booking.start)
        moved = dataclasses.replace(booking, schedule_id=schedule_id, start=start)
        self._slots[old_key] = dataclasses.replace(self._slots[old_key], status=SlotStatus.OPEN, booking=None)
        self._slots[target.key] = dataclasses.replace(target, status=SlotStatus.BOOKED, booking=moved)
        self._by_appointment[moved.appointment_id] = target.key
        if moved.placer_id:
            self._by_placer[moved.placer_id] = target.key
        return moved

    def cancel(self, *, appointment_id: str | None = None, placer_id: str | None = None) -> Booking:
        """Cancel a booking found by HIS appointment id (preferred) or placer id; the slot opens again."""
        booking = self.booking(appointment_id=appointment_id, placer_id=placer_id)
        key = (booking.schedule_id, booking.start)
        self._slots[key] = dataclasses.replace(self._slots[key], status=SlotStatus.OPEN, booking=None)
        del self._by_appointment[booking.appointment_id]
        if booking.placer_id:
            self._by_placer.pop(booking.placer_id, None)
        return booking

    def block(self, schedule_id: str, start: datetime) -> Slot:
        """Block an open slot (the doctor is away); SlotNotOpen if it is booked."""
        slot = self.slot(schedule_id, start)
        if slot.status is SlotStatus.BOOKED:
            raise SlotNotOpen("slot already booked")
        blocked = dataclasses.replace(slot, status=SlotStatus.BLOCKED)
        self._slots[slot.key] = blocked
        return blocked

    def book_at_counter(self, rng: random.Random, now: datetime) -> Booking | None:
        """The hospital's counter books one random open slot that starts after ``now``; None if none."""
        candidates = [slot for slot in self.open_slots() if slot.start > now]
        if not candidates:
            return None
        slot = rng.choice(candidates)
        return self.book(slot.schedule.id, slot.start, by=COUNTER)
