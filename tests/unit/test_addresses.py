"""Registration addresses on the node's interface: one the kernel refuses is left out, so
that no transport is rendered for an address the node does not have."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from pyroute2 import NetlinkError

from controlplane.net import addresses


class FakeAddr:
    def __init__(self, ip: str) -> None:
        self.ip = ip

    def get_attr(self, name: str) -> str:
        assert name == "IFA_ADDRESS"
        return self.ip


class FakeIPRoute:
    """eth0 holding 192.0.2.10; the kernel refuses 192.0.2.99."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def link_lookup(self, ifname: str) -> list[int]:
        return [2] if ifname == "eth0" else []

    def get_addr(self, index: int, family: int) -> list[FakeAddr]:
        return [FakeAddr("192.0.2.10")]

    def addr(self, op: str, index: int, address: str, prefixlen: int) -> None:
        if address == "192.0.2.99":
            raise NetlinkError(22, "Invalid argument")
        self.added.append(address)


def test_an_address_the_kernel_refuses_is_logged_and_left_out(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    fake = FakeIPRoute()
    monkeypatch.setattr(addresses, "IPRoute", lambda: fake)
    with caplog.at_level(logging.WARNING):
        usable = addresses.ensure_addresses(["192.0.2.10", "192.0.2.99", "192.0.2.11"],
                                            "eth0")
    assert usable == ["192.0.2.10", "192.0.2.11"] and fake.added == ["192.0.2.11"]
    assert "192.0.2.99" in caplog.text


def test_only_loopback_addresses_go_on_lo(monkeypatch: pytest.MonkeyPatch):
    fake = FakeIPRoute()
    monkeypatch.setattr(FakeIPRoute, "link_lookup", lambda self, ifname: [1])
    monkeypatch.setattr(addresses, "IPRoute", lambda: fake)
    assert addresses.ensure_addresses(["127.0.0.41", "198.51.100.1"], "lo") == ["127.0.0.41"]
    assert fake.added == ["127.0.0.41"]
