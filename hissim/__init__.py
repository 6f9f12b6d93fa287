"""The bundled HIS simulator: a real MLLP peer with its own slot inventory.

It plays "the hospital" for the demo and the end-to-end tests. It listens for SRM^S01 / SRM^S04 /
SQM^S25 from the gateway, answers per ``docs/hl7-profile.md``, and (``publish: push``) pushes SIU
notifications to the gateway: one S24 per slot it opens (all of them at its first start, except the slots of
doctors marked ``held``, which open all at once when SIGHUP releases them), S12 for every booking (counter or
gateway) and S15 for every cancellation. Like a real HIS it keeps its state across
restarts (``store``): a restart publishes no slot again and hands out no appointment id twice. With a
``pharmacy:`` section it also plays the hospital's pharmacy system on a listener of its own: it answers
RDE^O11 / OMP^O09, dispenses (RDS^O13) and releases prescriptions to outside pharmacies (RDE^O11, ORC-16
RELEASE), per ``docs/pharmacy-profile.md``.

Modules:
- ``config``     schema dataclasses of ``his-sim.yaml`` and ``load_config``;
- ``inventory``  the slot book (pure, no I/O, takes ``now``);
- ``store``      its SQLite store: inventory, appointment ids, answers given, outbox, accepted orders;
- ``messages``   building the outgoing SIU (hl7apy) and the answers SRR/SQR/ACK (er7 formatting);
- ``handler``    the MLLP handler: what the HIS answers to each message it receives;
- ``notifier``   the outgoing queue of messages to the gateway (one in flight, resend with the same MSH-10);
- ``pharmacy``   the pharmacy role: its MLLP handler, dispensing later, releasing, its own notifier;
- ``pharmacy_messages`` reading the gateway's orders and writing RRE/ORP, RDS^O13 and released RDE^O11;
- ``counter``    the hospital's own counter, booking random free slots over time;
- ``journal``    the JSON-lines received/sent logs the tests read;
- ``service``    ``make_service(config, reactor)``;
- ``cli``        ``main(argv)`` for ``gatewayd his-sim`` / ``python -m hissim``.
"""
