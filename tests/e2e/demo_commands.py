"""`gatewayd demo`'s printed commands, run by a shell as a person pastes them: find free slots, book the first.
Shared by tests/e2e/test_demo_e2e.py (the checkout's demo) and tests/dist (the installed wheelhouse's)."""

from __future__ import annotations

import json
import subprocess
import time
from typing import IO, Callable


def printed_commands(stdout: IO[str], timeout: float = 60) -> tuple[str, str, str]:
    """Read the demo's output up to the booking command's last line; returns (what was read, the search
    command, the booking command with SLOT_ID still in it)."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stdout.readline()
        if not line:
            break
        lines.append(line)
        if "-d '" in line and not line.rstrip().endswith("\\"):  # the booking command's last line
            break
    out = "".join(lines)
    search = next((line for line in lines if line.startswith("curl") and "/Slot?" in line), None)
    assert search, out
    search = search.strip()
    book = out[out.index("curl", out.index(search) + len(search)):].replace("\\\n", " ").strip()
    assert "POST" in book and "SLOT_ID" in book, book
    return out, search, book


def book_first_free_slot(shell: Callable[..., subprocess.CompletedProcess], search: str, book: str,
                         timeout: float = 60) -> dict:
    """Run ``search`` (through ``shell(command)``, e.g. bash -c) until it lists free slots, then ``book`` the
    first; asserts 201 and returns the booked Appointment."""
    slots = None
    deadline = time.monotonic() + timeout
    while not slots and time.monotonic() < deadline:
        found = shell(search)
        slots = json.loads(found.stdout).get("entry") if found.returncode == 0 and found.stdout else None
        if not slots:
            time.sleep(0.2)
    assert slots, f"no free slots through the printed command within {timeout}s"
    booked = shell(book.replace("SLOT_ID", slots[0]["resource"]["id"]) + " -w '\\n%{http_code}'")
    body, status = booked.stdout.rsplit("\n", 1)
    assert status == "201", booked.stdout + booked.stderr
    appointment = json.loads(body)
    assert appointment["status"] == "booked"
    return appointment
