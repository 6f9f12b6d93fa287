"""A platform's change to an Appointment -> the status it asks for, the only change a platform can make.

Four shapes are read (``PUT`` a whole resource; ``PATCH`` with a JSON Patch, a FHIRPath Patch Parameters, or a
partial resource as a merge patch).  Anything in them that would change something else (the start, the patient,
a comment...) is refused with 422 naming it (``Appointment.start``), never dropped: the platform would believe
it made a change the gateway did not make.  What a PUT may differ in from the appointment as served is its
status, ``meta`` and ``text`` (the server's own) and the participants' status (which follows the appointment's).
Pure: no I/O; raises InvalidResource.
"""

from __future__ import annotations

from typing import Any

from adapters.maps.fhir_scheduling import InvalidResource

#: what a PUT may leave different from the appointment as served
_SERVERS_OWN = {"status", "meta", "text"}
MAX_NAMED = 5


def _unchangeable(names: list[str]) -> InvalidResource:
    names = sorted(set(names))
    listed = ", ".join(names[:MAX_NAMED]) + (" ..." if len(names) > MAX_NAMED else "")
    return InvalidResource([("business-rule", f"{listed}: cannot be changed by a platform (the only change a "
                             "platform can make is status -> cancelled); nothing was changed", names[0])], 422)


def _without_participant_status(participants) -> Any:
    if not isinstance(participants, list):
        return participants
    return [{k: v for k, v in p.items() if k != "status"} if isinstance(p, dict) else p for p in participants]


def _status(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidResource([("required", f"{where}: the new status is missing", "Appointment.status")], 422)
    return value


def put_status(body: Any, current: dict, appointment_id: str) -> str:
    """A PUT of a whole Appointment: its status, if nothing else differs from ``current`` (as served)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Appointment":
        raise InvalidResource([("invalid", "the body must be an Appointment resource", None)])
    if body.get("id") not in (None, appointment_id):
        raise InvalidResource([("invalid", "the resource id does not match the URL", "Appointment.id")])
    changed = []
    for name in (set(body) | set(current)) - _SERVERS_OWN - {"id"}:
        mine, theirs = body.get(name), current.get(name)
        if name == "participant":
            mine, theirs = _without_participant_status(mine), _without_participant_status(theirs)
        if mine != theirs:
            changed.append(f"Appointment.{name}")
    if changed:
        raise _unchangeable(changed)
    return _status(body.get("status"), "Appointment.status")


def patch_status(body: Any, current: dict) -> str:
    """A PATCH (JSON Patch list, FHIRPath Patch Parameters, or a partial Appointment): the status it sets, if
    it sets nothing else."""
    if isinstance(body, list):
        return _json_patch_status(body)
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        return _fhirpath_patch_status(body)
    if isinstance(body, dict) and body.get("resourceType") in (None, "Appointment"):
        changed = [f"Appointment.{k}" for k, v in body.items()
                   if k not in ("resourceType", "id", "meta", "status") and current.get(k) != v]
        if changed:
            raise _unchangeable(changed)
        return _status(body.get("status"), "the partial Appointment")
    raise InvalidResource([("structure", "the body must be a JSON Patch, a FHIRPath Patch (Parameters) or a "
                            "partial Appointment", None)])


def _only_status(kind: str, status, others: list[str], only: str) -> str:
    """The status a patch of ``kind`` sets, if it does nothing else (``others``: what else it does)."""
    if others:
        raise InvalidResource([("business-rule", f"{kind} operation(s) {', '.join(others[:MAX_NAMED])}: the only "
                                f"change a platform can make is {only} with cancelled; nothing was changed",
                                "Appointment")], 422)
    return _status(status, f"the {kind}")


def _json_patch_status(operations: list) -> str:
    status, others = None, []
    for op in operations:
        if not isinstance(op, dict):
            raise InvalidResource([("structure", "a JSON Patch is a list of operation objects", None)])
        if op.get("path") == "/status" and op.get("op") in ("replace", "add") and status is None:
            status = op.get("value")
        else:
            others.append(f"{op.get('op')!s:.16} {op.get('path')!s:.64}")
    return _only_status("JSON Patch", status, others, "replace /status")


def _parts(parameter: dict) -> dict:
    out = {}
    for part in parameter.get("part") or []:
        if isinstance(part, dict) and isinstance(part.get("name"), str):
            value = next((v for k, v in part.items() if k.startswith("value")), None)
            out[part["name"]] = value
    return out


def _fhirpath_patch_status(body: dict) -> str:
    status, others = None, []
    for parameter in body.get("parameter") or []:
        if not isinstance(parameter, dict) or parameter.get("name") != "operation":
            raise InvalidResource([("structure", "a FHIRPath Patch holds only 'operation' parameters",
                                    "Parameters.parameter")])
        parts = _parts(parameter)
        path = str(parts.get("path"))[:64]
        if parts.get("type") == "replace" and path == "Appointment.status" and status is None:
            status = parts.get("value")
        else:
            target = f"{path}.{str(parts.get('name'))[:32]}" if parts.get("name") else path
            others.append(f"{str(parts.get('type'))[:16]} {target}")
    return _only_status("FHIRPath Patch", status, others, "replace Appointment.status")
