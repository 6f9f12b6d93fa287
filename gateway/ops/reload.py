"""SIGHUP: a new config applied to a running gateway, as far as it can be without a restart (:func:`reload`).

It works on the :class:`gateway.service.Gateway` that ``make_service`` built: the parts it swaps are named there
(the outer gate's API and TLS switch, the MLLP listener's TLS switch, the connections to inner.his, the
booking and prescription services), and it builds their replacements with the same builders the service tree
was built with.
"""

from __future__ import annotations

import dataclasses
from zoneinfo import ZoneInfo

import structlog
from twisted.internet import endpoints

from adapters.outer.oauth import clients_from_config
from adapters.outer.access import PlatformDirectory
from adapters.outer.delivery import hooks_from_config
from adapters.outer.tls import read_crl, tls_options
from adapters.tls import server_options
from gateway.config.model import GatewayConfig
from gateway.domain.patients import IdentifierRules
from gateway.domain.quota import Quotas
from gateway.ops import logs

log = structlog.get_logger("gateway.ops.reload")
from gateway.service import Gateway, notify_grants, pharmacy_route, rate_limiter, token_url


def reload(gateway: Gateway, config: GatewayConfig) -> list[str]:
    """Apply a new config to a running gateway without dropping connections.  Applied live: log
    level, the outer gate's certificates, client CAs and CRL (for new connections; the CRL for every request),
    platforms (subjects, scopes, quotas, revoked serials, SPKI pins, token keys, rate limits, notification
    endpoints: a delivery in flight finishes with the old one), the patient
    identifier rules (patients.identifiers), the MLLP listener's certificates and CA (new connections), the
    HIS's address (next connection, and its probe at once), the console's operators (admin.operators: the next
    request), the routes while the endpoints stay (new bookings and prescriptions; a
    cancellation follows its booking).  Every other key whose value changed (listen addresses, chamber path,
    timeouts, ...) needs a restart: each is named in the returned list.  Everything is built
    before anything is swapped, so a new config that fails (a certificate that does not parse) changes
    nothing."""
    old, gate = gateway.config, gateway.gate
    swaps: list = []
    applied: list[str] = [f"logging.level={config.logging.level}"]
    if gate in ("both", "outer") and config.outer is not None:
        tls = tls_options(config.outer.tls)
        tz = ZoneInfo(config.hospital.timezone)
        crl = read_crl(config.outer.tls, gateway.reactor.seconds())
        platforms = PlatformDirectory.from_config(config.platforms, crl)
        oauth_clients, url = clients_from_config(config.platforms), token_url(config.outer)
        quotas = Quotas.from_config(config.platforms, tz)
        limiter = rate_limiter(config, gateway.reactor)
        hooks = hooks_from_config(config.platforms, gateway.reactor)  # (notify: reads the certificates now)

        def outer_swap():
            gateway.outer_tls.current = tls
            gateway.api.reconfigure(platforms=platforms, quotas=quotas, rate_limiter=limiter,
                                    oauth_clients=oauth_clients, token_url=url)
            gateway.booking.quotas = quotas
            if gateway.delivery is not None:  # notify: new endpoints, certificates and retry policy
                gateway.api.subscriptions.notify = {p.name: p.notify for p in config.platforms if p.notify}
                gateway.delivery.hooks = hooks
                # a platform without notify, or without a topic's scope, now: its subscriptions end, pending
                # notifications dead-lettered (docs/subscriptions.md)
                gateway.api.subscriptions.subs.withdraw(notify_grants(config.platforms)).addErrback(
                    lambda f: log.error("notify.withdraw_failed", error=f.getErrorMessage()))
                gateway.delivery.wake()

        swaps.append(outer_swap)
        applied += ["outer.tls" + (" (with CRL)" if crl is not None else ""), f"platforms ({len(config.platforms)})"]
    if gate == "inner":  # the free-slot topic's notifications of the inner gate's changes follow the quotas
        inner_quotas = Quotas.from_config(config.platforms, ZoneInfo(config.hospital.timezone))
        swaps.append(lambda: setattr(gateway.booking, "quotas", inner_quotas))
    if gate in ("both", "inner") and config.inner is not None:
        inner_tls = config.inner.tls
        if inner_tls is not None and gateway.inner_tls is not None:
            mllp_options = server_options(inner_tls.certificate, inner_tls.private_key, inner_tls.client_ca)
            swaps.append(lambda: setattr(gateway.inner_tls, "current", mllp_options))
            applied.append("inner.tls")
        his, was = config.inner.his, old.inner.his
        if (his.host, his.port) != (was.host, was.port):
            endpoint = endpoints.HostnameEndpoint(gateway.reactor, his.host, his.port, timeout=his.connect_timeout)
            probe = gateway.probes.get(was.name)
            swaps.append(lambda: [client.retarget(endpoint) for client in gateway.his_clients]
                         + ([probe.retarget(endpoint)] if probe is not None else []))
            applied.append(f"inner.his {his.host}:{his.port}")
    endpoints_kept = (old.inner and old.inner.endpoints) == (config.inner and config.inner.endpoints)
    if config.routes != old.routes and endpoints_kept:  # (a route to a new endpoint waits for the restart)
        booking, prescribing = gateway.booking, gateway.prescribing
        pharmacy = pharmacy_route(config, gate)

        def routes_swap():
            booking.route = config.route_taken
            booking.by_facility = any(r.facility is not None for r in config.routes)
            prescribing.peer, prescribing.writer = pharmacy

        swaps.append(routes_swap)
        applied.append(f"routes ({len(config.routes)})")
    patients = IdentifierRules.from_config(config.patients)  # accepted systems (outer gate), PID-3 (inner gate)
    swaps.append(lambda: setattr(gateway.booking, "patients", patients))
    applied.append(f"patients.identifiers ({len(config.patients.identifiers)})")
    if config.admin is not None and old.admin is not None and config.admin.operators != old.admin.operators:
        applied.append(f"admin.operators ({len(config.admin.operators)})")  # the console reads the running config
    live = {"logging", "inner.his.host", "inner.his.port", "patients", "admin.operators"}
    if gate in ("both", "outer") and config.outer is not None:
        live |= {"outer.tls", "outer.rate_limit", "outer.token_rate_limit", "outer.token_url", "platforms"}
    if "inner.tls" in applied:
        live.add("inner.tls")
    if config.routes != old.routes and endpoints_kept:
        live.add("routes")
    restart = [key for key in _changed_keys(old, config)
               if not any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in live)]
    logs.configure(config.logging.level, config.logging.format)
    for swap in swaps:
        swap()
    gateway.config = config
    return applied + [f"needs a restart: {name}" for name in restart]


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (sections compared field by field, lists as a
    whole, a section added or removed as its own key)."""
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
        keys: list[str] = []
        for f in dataclasses.fields(old):
            keys += _changed_keys(getattr(old, f.name), getattr(new, f.name), f"{prefix}.{f.name}" if prefix else f.name)
        return keys
    return [] if old == new else [prefix]
