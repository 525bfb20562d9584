"""Announcing the server by zeroconf (`_wyoming._tcp.local.`), as Home Assistant discovers it."""

from __future__ import annotations

import logging
import socket

_LOGGER = logging.getLogger(__name__)

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "*")
_MDNS_GROUP = "224.0.0.251"


def lan_address() -> str:
    """The address this host uses towards the mDNS group (the one on its LAN)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((_MDNS_GROUP, 5353))  # no packet is sent: this only picks a route
        return probe.getsockname()[0]


async def announce(name: str, port: int, bind_host: str, announce_host: str | None):
    """Register the service; returns the zeroconf object to keep alive, or None on failure.

    A failure is a warning: the server still works, it just has to be added to Home Assistant
    by hand (host and port).
    """
    from wyoming.zeroconf import HomeAssistantZeroconf

    host = announce_host or (None if bind_host in WILDCARD_HOSTS else bind_host)
    try:
        if host is None:
            host = lan_address()
        zeroconf = HomeAssistantZeroconf(port=port, name=name, host=host)
        await zeroconf.register_server()
    except Exception as err:  # noqa: BLE001 - discovery is a convenience, never fatal
        _LOGGER.warning(
            "Zeroconf announcement failed (%s: %s); add the server to Home Assistant by host and "
            "port, or set --zeroconf-host to this machine's address",
            type(err).__name__,
            err,
        )
        return None
    _LOGGER.info("Announced %s._wyoming._tcp.local. at %s:%d", name, host, port)
    return zeroconf
