"""Slot quotas: how much of each schedule a platform may hold.

The rule (docs/security.md, "Slot quotas"), for a platform P and a slot S of schedule X on day D (the
hospital's local date of the slot's start):

- P's quota entry for X is the one naming X, else the ``'*'`` one; with neither, P is not limited on X.
- allowance(P, X, D) = ``per_day``, or floor(share x N) where N is the number of X's slots on D in the
  chamber, whatever their status (the share is taken to a millionth: 5% of 100 slots is exactly 5).
- used(P, X, D) = P's appointments on X's slots of D that are ``pending`` (held, waiting for the HIS) or
  ``booked``.  Cancelled and refused ones give their slot back.
- S is *released* when it starts within ``release_before`` of now: a released slot is open to every
  platform, quota or not.  (Booking it still counts in used(P, X, D).)
- P may book S, and sees S when it is free, iff S is released or used(P, X, D) < allowance(P, X, D).

Booking decides this inside the chamber transaction that holds the slot, so concurrent bookings are
counted exactly (units of a transaction run one after another) and the count survives restarts (it is
read from the chamber, never kept in memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from gateway.domain.model import SchedulingError


class QuotaExhausted(SchedulingError):
    """The platform holds all the slots its quota gives it on that schedule and day."""

    code = "quota-exhausted"


@dataclass(frozen=True)
class QuotaRule:
    schedule: str  # a schedule id or '*'
    share_ppm: int | None  # the share in millionths (5% -> 50000)
    per_day: int | None
    release_before: float | None  # seconds; None: never released

    def allowance(self, slots_that_day: int) -> int:
        if self.per_day is not None:
            return self.per_day
        return (self.share_ppm or 0) * slots_that_day // 1_000_000

    def released(self, start_ts: float, now: float) -> bool:
        return self.release_before is not None and start_ts - now <= self.release_before

    def describe(self) -> str:
        what = f"{self.per_day} slot(s) per day" if self.per_day is not None else \
            f"{self.share_ppm / 10_000:g}% of the schedule's slots per day"
        when = (f"; slots open to every platform {self.release_before / 3600:g} h before they start"
                if self.release_before is not None else "")
        return what + when


def _day_text(day: str) -> str:
    return f"{day[:4]}-{day[4:6]}-{day[6:8]}"


class Quotas:
    """Every platform's quota rules; decisions take the chamber transaction or reader they work on."""

    def __init__(self, rules: dict[str, list[QuotaRule]], tz: ZoneInfo):
        self._rules = {platform: {r.schedule: r for r in rs} for platform, rs in rules.items() if rs}
        self.tz = tz

    @classmethod
    def from_config(cls, platforms, tz: ZoneInfo) -> "Quotas":
        return cls({p.name: [QuotaRule(q.schedule, None if q.share is None else round(q.share * 1_000_000),
                                       q.per_day, q.release_before) for q in p.quotas]
                    for p in platforms}, tz)

    def limited(self, platform: str) -> bool:
        return platform in self._rules

    def rule_for(self, platform: str, schedule_id: str) -> QuotaRule | None:
        rules = self._rules.get(platform)
        if not rules:
            return None
        return rules.get(schedule_id) or rules.get("*")

    def check(self, tx, platform: str, slot) -> None:
        """Inside the booking's transaction: raise QuotaExhausted if ``platform`` may not book ``slot``."""
        rule = self.rule_for(platform, slot.schedule_id)
        if rule is None or rule.released(slot.start_ts, tx.now):
            return
        day = slot.start_local[:8]
        allowance = rule.allowance(tx.slots_on_day(slot.schedule_id, day))
        used = tx.active_appointments_on_day(platform, slot.schedule_id, day)
        if used >= allowance:
            raise QuotaExhausted(
                f"platform {platform!r} holds {used} of the {allowance} slot(s) its quota gives it on "
                f"Schedule/{slot.schedule_id} on {_day_text(day)} ({rule.describe()})")

    def may_book(self, reader, platform: str, slot, now: float) -> bool:
        rule = self.rule_for(platform, slot.schedule_id)
        if rule is None or rule.released(slot.start_ts, now):
            return True
        day = slot.start_local[:8]
        return (reader.active_appointments_on_day(platform, slot.schedule_id, day)
                < rule.allowance(reader.slots_on_day(slot.schedule_id, day)))

    def release_periods(self, platform: str) -> set[float]:
        """The ``release_before`` periods of the platform's rules (its slots released by the passage of time)."""
        return {r.release_before for r in self._rules.get(platform, {}).values() if r.release_before is not None}

    def used_up(self, reader, platform: str, slot) -> bool:
        """Whether ``platform`` holds all its quota of the slot's schedule and day (release aside)."""
        rule = self.rule_for(platform, slot.schedule_id)
        if rule is None:
            return False
        day = slot.start_local[:8]
        return (reader.active_appointments_on_day(platform, slot.schedule_id, day)
                >= rule.allowance(reader.slots_on_day(slot.schedule_id, day)))

    def hidden(self, reader, platform: str, now: float) -> list[tuple[str, str, float | None]]:
        """(schedule id, day, cutoff) for every schedule and day, from today on, where ``platform`` has used
        its quota: its free slots there starting after ``cutoff`` (None: any) are not shown to it."""
        if platform not in self._rules:
            return []
        today = datetime.fromtimestamp(now, self.tz).strftime("%Y%m%d")
        used = reader.active_appointments_by_day(platform, today)
        out = []
        for (schedule_id, day), n in sorted(reader.slot_counts_by_day(today).items()):
            rule = self.rule_for(platform, schedule_id)
            if rule is None or used.get((schedule_id, day), 0) < rule.allowance(n):
                continue
            out.append((schedule_id, day, None if rule.release_before is None else now + rule.release_before))
        return out
