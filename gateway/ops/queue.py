"""What an operator can do to the chamber's messages (``gatewayd queue ...``), safely while the daemon runs.

- **retry** an outbound message that was dead-lettered or refused: it goes back to ``committed`` with its
  original bytes and control id (so the HIS can still drop a duplicate) and its story records who resubmitted
  it; the running relay picks it up within a second.  A booking whose appointment was already settled is not
  resent: the platform was told it failed, and booking it now would surprise everyone.
- **reprocess** an inbound message that was refused (e.g. a mapping problem since fixed): its raw bytes, as
  received, are read again by the current code; the outcome is recorded on the same message.
- **purge** dead-lettered messages older than a given age (with their stories).

The same for the notifications owed to platforms' subscriptions (docs/subscriptions.md): **retry** a dead one
(pending again, due now: the outer gate sends it at once — once: as it is past its ``give_up_after``, a failure
dead-letters it again with the new error; it keeps its event number, so a platform that has had later ones
places it), unless its platform may no longer receive it (no ``notify`` endpoint, or not the topic's scope);
**purge** dead ones older than an age.

SQLite in WAL mode lets this process and the daemon use the chamber at once; every change here is one
committed transaction.
"""

from __future__ import annotations

from typing import Callable

RETRYABLE_OUTBOUND = ("dead", "refused")


class NotRetryable(Exception):
    """The message cannot be resubmitted; str() says why."""


def retry(chamber, message_id: int, reprocess_inbound: Callable, *, who: str = "operator") -> str:
    """Resubmit one message; returns what happened, or raises NotRetryable."""
    return chamber.transact_now(retry_unit(message_id, reprocess_inbound, who=who))


def retry_unit(message_id: int, reprocess_inbound: Callable, *, who: str = "operator") -> Callable:
    """The unit of work (``tx -> what happened``, or NotRetryable) that resubmits one message, for a caller that
    commits it itself (the console, with its audit record)."""

    def work(tx) -> str:
        msg = tx.message(message_id)
        if msg is None:
            raise NotRetryable(f"no message {message_id}")
        if msg.direction == "inbound":
            if msg.state != "refused":
                raise NotRetryable(f"message {message_id} was not refused (it is {msg.state}); nothing to reprocess")
            if not msg.type.startswith("SIU"):
                raise NotRetryable(f"message {message_id} is {msg.type}: only refused SIU slot notifications are "
                                   f"reprocessed; ask the HIS to send it again")
            code, text = reprocess_inbound(tx, msg)
            state = "delivered" if code == "AA" else "refused"
            tx.set_message_state(msg.id, state, answer_code=code, answer_text=text,
                                 detail=f"reprocessed by {who}: {code} {text}".strip())
            return f"message {message_id} reprocessed: {state} ({code}{': ' + text if text else ''})"
        if msg.state not in RETRYABLE_OUTBOUND:
            raise NotRetryable(f"message {message_id} is {msg.state}; only dead or refused messages are resubmitted")
        if msg.type == "SRM^S01" and (msg.subject or "").startswith("appointment:"):
            appt = tx.appointment(msg.subject.split(":", 1)[1])
            if appt is None or appt.status != "pending":
                raise NotRetryable(f"message {message_id} carried a booking that is already "
                                   f"{appt.status if appt else 'gone'}; it is not sent again")
        if (msg.subject or "").startswith("prescription:"):
            p = tx.prescription(msg.subject.split(":", 1)[1])
            if p is None or p.status != "pending":  # the platform was told it did not reach the pharmacy
                raise NotRetryable(f"message {message_id} carried a prescription that is already "
                                   f"{p.status if p else 'gone'} (its items cancelled, the platform told); it "
                                   f"is not sent again: the platform sends the prescription again")
        tx.set_message_state(msg.id, "committed", attempts=0, detail=f"resubmitted by {who}")
        return f"message {message_id} ({msg.type}, control id {msg.control_id}) resubmitted"

    return work


def retry_all_dead(chamber, reprocess_inbound: Callable, *, who: str = "operator") -> list[str]:
    """Resubmit every dead-lettered outbound message, oldest first; returns one line per message."""
    return _each_oldest_first(chamber.read().messages(state="dead", limit=1_000_000),
                              lambda msg: retry(chamber, msg.id, reprocess_inbound, who=who))


def _each_oldest_first(rows, resubmit: Callable) -> list[str]:
    """``resubmit(row)`` for each of ``rows`` (newest first), oldest first: one line each, a refusal as skipped."""
    out = []
    for row in reversed(rows):
        try:
            out.append(resubmit(row))
        except NotRetryable as e:
            out.append(f"skipped: {e}")
    return out


def purge_dead(chamber, older_than_seconds: float) -> int:
    """Delete dead-lettered messages last changed more than ``older_than_seconds`` ago."""
    return chamber.transact_now(lambda tx: tx.purge_dead(tx.now - older_than_seconds))


def count_purgeable(chamber, older_than_seconds: float) -> int:
    reader = chamber.read()
    return _older(reader.messages(state="dead", limit=1_000_000), reader.now - older_than_seconds)


def _older(rows, cutoff: float) -> int:
    return sum(1 for row in rows if row.updated < cutoff)


def retry_notification(chamber, subscription_id: str, event: int, granted: dict, *, who: str = "operator") -> str:
    """Resubmit one dead notification; ``granted``: each platform with a notify endpoint -> its scopes (what it
    may still receive).  Returns what happened, or raises NotRetryable."""
    from gateway.domain.notifications import TOPIC_SCOPES

    def work(tx) -> str:
        n = tx.notification(subscription_id, event)
        if n is None:
            raise NotRetryable(f"no notification {subscription_id}/{event}")
        if n.state != "dead":
            raise NotRetryable(f"notification {subscription_id}/{event} is {n.state}; only dead ones are resubmitted")
        sub = tx.subscription(subscription_id)
        scope = TOPIC_SCOPES.get(sub.topic) if sub is not None else None
        if n.platform not in granted or (scope is not None and scope not in granted[n.platform]):
            raise NotRetryable(f"platform {n.platform!r} may no longer receive it (no notify endpoint, or not the "
                               f"scope {scope}): it is not sent")
        tx.set_notification_state(subscription_id, event, "pending", attempts=0, next_attempt=tx.now,
                                  last_error=f"resubmitted by {who} after: {n.last_error or 'no error recorded'}"[:300])
        return f"notification {subscription_id}/{event} ({n.platform}, {n.what} {n.focus}) resubmitted"

    return chamber.transact_now(work)


def retry_dead_notifications(chamber, granted: dict, *, who: str = "operator") -> list[str]:
    """Resubmit every dead notification, oldest first; one line each."""
    return _each_oldest_first(chamber.read().notifications_in("dead", limit=1_000_000),
                              lambda n: retry_notification(chamber, n.subscription_id, n.event, granted, who=who))


def purge_dead_notifications(chamber, older_than_seconds: float) -> int:
    """Delete dead notifications last changed more than ``older_than_seconds`` ago."""
    return chamber.transact_now(lambda tx: tx.purge_dead_notifications(tx.now - older_than_seconds))


def count_purgeable_notifications(chamber, older_than_seconds: float) -> int:
    reader = chamber.read()
    return _older(reader.notifications_in("dead", limit=1_000_000), reader.now - older_than_seconds)
