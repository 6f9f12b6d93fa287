"""Mappings between wire formats and the gateway's scheduling types: pure functions, no I/O.

One module per message pair: ``siu_slot`` (SIU / SQR^S25 -> slot notices), ``srm_booking`` (bookings ->
SRM^S01/S04 and the SQM^S25 query), ``fhir_scheduling`` (chamber views <-> FHIR Slot, Schedule,
Appointment).  The field-by-field profile is docs/hl7-profile.md.
"""
