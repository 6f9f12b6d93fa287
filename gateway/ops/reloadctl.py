"""``gatewayd reload --config PATH``: SIGHUP to the gateway running with that config, and its outcome printed.

The process is found through the claims on the config's chamber (gateway/ops/claim.py): each gate's claim file
records its holder's pid and config, and the kernel's table of locks says whether it is held.  Only a holder
whose recorded config is ``PATH`` (the same file, by its real path) is signalled — in the split lock, the outer
and inner processes each have their own config, and ``reload`` is asked of one of them.

The outcome is what the gateway records for the reload (gatewayd run's SIGHUP handler: ``last_reload`` —
applied with what it applied and what needs a restart, or refused with the errors, file:line:key for a config
that does not load), read from its admin listener's ``/status`` before and after the signal.  Without an admin
listener in the config the outcome cannot be read: that is said, with where to look (the log's
``gateway.reloaded``/``gateway.reload_refused``).

A config that does not load is refused here first, with its file:line:key errors, and nothing is signalled:
the gateway would refuse it the same way.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from gateway.ops.claim import Holder, holder as claim_holder
from gateway.ops.status import admin_url, ask_admin

#: exit codes: applied; refused (or nothing to signal); sent, outcome not known in time
APPLIED, REFUSED, UNKNOWN = 0, 1, 2


def running(chamber: str | Path, config_path: Path) -> tuple[list[Holder], list[Holder]]:
    """(the holders of the chamber's claims running ``config_path``, the other holders), one entry per pid.
    Raises :class:`gateway.ops.claim.ClaimError` when the claims cannot be read."""
    mine: dict[int, Holder] = {}
    others: dict[int, Holder] = {}
    wanted = os.path.realpath(config_path)
    for role in ("outer", "inner"):
        held = claim_holder(chamber, role)
        if held is None:
            continue
        (mine if os.path.realpath(held.config) == wanted else others).setdefault(held.pid, held)
    return list(mine.values()), [h for pid, h in others.items() if pid not in mine]


def reload_command(config, config_path: Path, *, out=print, ask: Callable[[str], dict] = ask_admin,
                   kill=os.kill, wait: float = 30.0, clock=time.monotonic, sleep=time.sleep) -> int:
    """Signal the gateway that runs ``config_path`` and print what it did with the new config."""
    from gateway.ops.claim import ClaimError

    try:
        mine, others = running(config.chamber.path, config_path)
    except ClaimError as e:
        out(f"gatewayd reload: {e}")
        return REFUSED
    if not mine:
        who = "; ".join(h.describe() for h in others)
        out(f"gatewayd reload: no gateway runs with {config_path} on the chamber {config.chamber.path}"
            + (f" (it is run by {who}: reload that one with its own --config)" if others else ""))
        return REFUSED
    url = admin_url(config)
    before = _last_reload(url, ask) if url else None
    for h in mine:
        try:
            kill(h.pid, signal.SIGHUP)
        except ProcessLookupError:
            out(f"gatewayd reload: pid {h.pid} is gone (it stopped meanwhile)")
            return REFUSED
        except PermissionError:
            out(f"gatewayd reload: not allowed to signal pid {h.pid} (user {h.user or '?'}): run this as that "
                f"user or root")
            return REFUSED
        out(f"sent SIGHUP to pid {h.pid} (gate {h.gate}, running since {h.since})")
    if url is None:
        out("the config has no admin listener, so the reload's outcome cannot be read here: see the gateway's "
            "log (event gateway.reloaded, or gateway.reload_refused with the errors)")
        return UNKNOWN
    deadline = clock() + wait
    while clock() < deadline:
        after = _last_reload(url, ask)
        if after is not None and after != before:
            return _print_outcome(after, out)
        sleep(0.2)
    out(f"gatewayd reload: the gateway did not report the reload within {wait:g}s at {url}/status: see its log")
    return UNKNOWN


def _last_reload(url: str, ask) -> dict | None:
    try:
        return ask(url).get("last_reload")
    except OSError:
        return None


def _print_outcome(reload: dict, out) -> int:
    if reload.get("outcome") == "applied":
        applied = reload.get("applied") or []
        live = [a for a in applied if not a.startswith("needs a restart: ")]
        restart = [a[len("needs a restart: "):] for a in applied if a.startswith("needs a restart: ")]
        out("reloaded: applied " + (", ".join(live) or "nothing"))
        if restart:
            out("changed but not applied until a restart: " + ", ".join(restart))
        return APPLIED
    out("reload REFUSED: the gateway keeps its running config")
    for error in reload.get("errors") or []:
        out(f"  {error}")
    return REFUSED
