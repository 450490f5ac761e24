"""Generated SIP passwords: strong, plain, and read the same by every client."""

from __future__ import annotations

import string

import pytest

from controlplane import secrets as pbx_secrets


def test_a_generated_password_has_every_kind_of_character_and_nothing_else():
    for _ in range(200):
        pw = pbx_secrets.new_sip_password()
        assert len(pw) == 20 and set(pw) <= set(string.ascii_letters + string.digits)
        assert any(c.isdigit() for c in pw) and any(c.isupper() for c in pw) \
            and any(c.islower() for c in pw)


@pytest.mark.parametrize("prefix", ["0x", "0X"])
def test_a_generated_password_never_starts_like_a_hexadecimal_key(monkeypatch, prefix):
    """Clients such as SIPp take a password starting with 0x for a hexadecimal key: one
    drawn so is drawn again."""
    drawn = iter(prefix + "Ab1" + "c" * 15 + "Zz9" + "d" * 17)
    monkeypatch.setattr(pbx_secrets.secrets, "choice", lambda _: next(drawn))
    assert pbx_secrets.new_sip_password() == "Zz9" + "d" * 17
