"""Registration addresses on the node's own interface (pyroute2)."""

from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute, NetlinkError

log = logging.getLogger(__name__)


def ensure_addresses(addresses: list[str], interface: str) -> list[str]:
    """Add each IPv4 address (as /32) to `interface` unless it is already there.

    Returns those of `addresses` that are on the interface afterwards: one the kernel
    refuses is logged and left out, and so is any but 127.0.0.0/8 on loopback."""
    usable = []
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=interface)
        if not links:
            raise RuntimeError(f"no network interface {interface!r} on this host")
        index = links[0]
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}
        for raw in addresses:
            ip = ipaddress.ip_address(raw)
            if ip.version != 4:
                continue
            if str(ip) in present:
                usable.append(str(ip))
                continue
            if interface == "lo" and not ip.is_loopback:
                log.warning("not adding %s to lo: not a loopback address", ip)
                continue
            try:
                ipr.addr("add", index=index, address=str(ip), prefixlen=32)
            except NetlinkError as exc:
                log.warning("could not add registration address %s to %s: %s", ip, interface,
                            exc)
                continue
            usable.append(str(ip))
            log.info("added registration address %s to %s", ip, interface)
    return usable
