"""Platform developers' client libraries, unmodified, against the real lock (issue 17): fhirpy's sync client
(tests/e2e/test_booking_e2e.py), its async client and SMART's fhirclient each find a free slot, book it, read the
appointment back and cancel it; fhirpy's .count() reads the searchset's total; its get_or_create (a POST with a
query) is refused instead of booking again.  The async client's answers go through aiohttp, so they are checked
against the FHIR R4 schema here; the others' through the conftest's check."""

import asyncio
import ssl

import pytest

from tests.conformance import problems
from tests.e2e.harness import appointment_for, eventually


def free_slot(lock, platform="demo"):
    return [s["id"] for s in lock.search_slots(platform, status="free")][-1]


def test_fhirpy_async_finds_books_reads_and_cancels(lock):
    from fhirpy import AsyncFHIRClient

    context = ssl.create_default_context(cafile=str(lock.certs / "ca.pem"))
    context.load_cert_chain(*lock.cert("demo"))
    client = AsyncFHIRClient(lock.base, aiohttp_config={"ssl": context})

    async def flow():
        slots = await client.resources("Slot").search(status="free").limit(20).fetch()
        assert slots and all(problems(s.serialize()) == [] for s in slots)
        total = await client.resources("Slot").search(status="free").count()
        assert total >= len(slots)
        appointment = client.resource("Appointment", **appointment_for(slots[-1]["id"], mrn="MRN-ASYNC"))
        await appointment.save()
        assert appointment["status"] in ("booked", "pending") and problems(appointment.serialize()) == []
        appointment_id = appointment["id"]

        async def read():
            return await client.reference("Appointment", appointment_id).to_resource()

        for _ in range(200):
            read_back = await read()
            if read_back["status"] == "booked":
                break
            await asyncio.sleep(0.05)
        assert read_back["status"] == "booked" and problems(read_back.serialize()) == []
        read_back["status"] = "cancelled"
        await read_back.save()
        assert read_back["status"] in ("cancelled", "booked")  # (booked: 202, the HIS has not answered yet)
        for _ in range(200):
            if (await read())["status"] == "cancelled":
                return appointment_id
            await asyncio.sleep(0.05)
        raise AssertionError("the cancellation did not settle")

    appointment_id = asyncio.run(flow())
    assert any(r["type"] == "SRM^S04" and r["placer"] == appointment_id for r in lock.received())


def test_fhirclient_finds_books_reads_and_cancels(lock):
    from fhirclient import client
    from fhirclient.models.appointment import Appointment
    from fhirclient.models.slot import Slot

    smart = client.FHIRClient(settings={"app_id": "platform-demo", "api_base": lock.base + "/"})
    smart.server.session.cert = lock.cert("demo")
    smart.server.session.verify = str(lock.certs / "ca.pem")
    smart.server.session.trust_env = False
    slots = Slot.where(struct={"status": "free", "_count": "20"}).perform_resources(smart.server)
    assert slots and all(s.status == "free" for s in slots)
    created = Appointment(appointment_for(slots[-1].id, mrn="MRN-SMART")).create(smart.server)
    appointment_id = created["id"]
    booked = eventually(lambda: (a := Appointment.read(appointment_id, smart.server)).status == "booked" and a,
                        timeout=15, what="the booking to be confirmed")
    assert booked.slot[0].reference == f"Slot/{slots[-1].id}"
    booked.status = "cancelled"
    booked.update(smart.server)
    eventually(lambda: Appointment.read(appointment_id, smart.server).status == "cancelled", timeout=15,
               what="the cancellation to settle")
    assert any(r["type"] == "SRM^S04" and r["placer"] == appointment_id for r in lock.received())


def test_fhirpy_count_and_get_or_create(lock):
    """.count() sends _count=0 and reads total; get_or_create sends POST /Appointment?identifier=... — the query
    was dropped and a second slot booked; now it is refused and nothing is booked."""
    from fhirpy.base.exceptions import OperationOutcome

    client = lock.fhirpy("other")
    assert client.resources("Slot").count() == len(lock.search_slots("other"))
    before = client.resources("Appointment").count()
    body = dict(appointment_for(free_slot(lock, "other"), mrn="MRN-GOC"),
                identifier=[{"system": "urn:platform:other", "value": "goc-1"}])
    with pytest.raises(OperationOutcome) as refused:
        client.resources("Appointment").search(identifier="urn:platform:other|goc-1").get_or_create(
            client.resource("Appointment", **body))
    assert "If-None-Exist" in str(refused.value)
    assert client.resources("Appointment").count() == before
