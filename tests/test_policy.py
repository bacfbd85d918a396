"""Sender policy (relay.intake.policy): who may use which envelope sender and header From, via which mailbox."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import settings_from_dict
from relay.envelope import Route
from relay.intake.policy import HeaderDecision, Policy, Principal, Refusal, sender_matches

APP = {"name": "contoso", "tenant_id": "11111111-1111-1111-1111-111111111111",
       "client_id": "22222222-2222-2222-2222-222222222222", "client_secret": "x"}
HASH = "scrypt$10$8$1$AAAA$BBBB"


def policy(rewrite: str = "when-not-allowed", **extra: Any) -> Policy:
    data: dict[str, Any] = {
        "apps": [APP],
        "mailboxes": [{"address": "relay@contoso.com", "app": "contoso"},
                      {"address": "scanner@contoso.com", "app": "contoso"}],
        "users": [{"name": "erp", "password_hash": HASH, "may_send_as": ["relay@contoso.com", "@alerts.contoso.com",
                                                                         "report-*@contoso.com"]},
                  {"name": "scan", "password_hash": HASH, "may_send_as": ["scanner@contoso.com"],
                   "mailbox": "scanner@contoso.com"},
                  {"name": "any", "password_hash": HASH}],
        "accept": {"networks": [{"network": "10.1.0.0/16", "may_send_as": ["*@devices.contoso.com"],
                                 "mailbox": "scanner@contoso.com"}, "127.0.0.1/32"]},
        "sender": {"default_mailbox": "relay@contoso.com", "rewrite_from": rewrite},
    }
    data.update(extra)
    return Policy(settings_from_dict(data))


def user(p: Policy, name: str) -> Principal:
    u = p.user(name)
    assert u is not None
    return Principal.for_user(u)


@pytest.mark.parametrize(("address", "pattern", "ok"), [
    ("relay@contoso.com", "relay@contoso.com", True),
    ("Relay@Contoso.COM", "relay@contoso.com", True),
    ("relay@contoso.com.evil.example", "relay@contoso.com", False),
    ("a@alerts.contoso.com", "@alerts.contoso.com", True),
    ("a@evilalerts.contoso.com", "@alerts.contoso.com", False),
    ("a@x.alerts.contoso.com", "@alerts.contoso.com", False),
    ("a@alerts.contoso.com", "*@alerts.contoso.com", True),
    ("report-daily@contoso.com", "report-*@contoso.com", True),
    ("report@contoso.com", "report-*@contoso.com", False),
    ("anything@anywhere.example", "*", True),
])
def test_sender_matches(address: str, pattern: str, ok: bool) -> None:
    assert sender_matches(address, pattern) is ok


def test_allowed_mailbox_routes_as_itself() -> None:
    p = policy()
    route = p.route(user(p, "erp"), "relay@contoso.com")
    assert route == Route(app="contoso", mailbox="relay@contoso.com", sender="relay@contoso.com")


def test_allowed_non_mailbox_sender_carried_by_default_mailbox() -> None:
    p = policy()
    route = p.route(user(p, "erp"), "report-x@contoso.com")
    assert isinstance(route, Route) and route.mailbox == "relay@contoso.com"
    assert route.sender == "report-x@contoso.com" and not route.rewrite_from


def test_user_mailbox_carries_its_rewrites() -> None:
    p = policy()
    route = p.route(user(p, "scan"), "device@scanner.local")
    assert isinstance(route, Route)
    assert (route.mailbox, route.sender, route.rewrite_from) == ("scanner@contoso.com", "scanner@contoso.com", True)


def test_network_rule_patterns_and_mailbox() -> None:
    p = policy()
    rule = p.network_rule("10.1.2.3")
    assert rule is not None and p.network_rule("::ffff:10.1.2.3") == rule
    net = Principal.for_network(rule)
    ok = p.route(net, "printer@devices.contoso.com")
    assert isinstance(ok, Route) and ok.mailbox == "scanner@contoso.com" and not ok.rewrite_from
    rewritten = p.route(net, "printer@elsewhere.example")
    assert isinstance(rewritten, Route) and rewritten.sender == "scanner@contoso.com" and rewritten.rewrite_from
    assert p.network_rule("10.2.0.1") is None


def test_empty_may_send_as_means_configured_mailboxes() -> None:
    p = policy("never")
    anyone = user(p, "any")
    assert isinstance(p.route(anyone, "scanner@contoso.com"), Route)
    assert isinstance(p.route(anyone, "other@contoso.com"), Refusal)


@pytest.mark.parametrize("mode", ["never", "when-not-allowed", "always"])
def test_modes_for_envelope_sender(mode: str) -> None:
    p = policy(mode)
    erp = user(p, "erp")
    allowed = p.route(erp, "relay@contoso.com")
    denied = p.route(erp, "ceo@contoso.com")
    if mode == "never":
        assert isinstance(allowed, Route) and not allowed.rewrite_from
        assert isinstance(denied, Refusal) and denied.reply.startswith("550 5.7.1")
    elif mode == "when-not-allowed":
        assert isinstance(allowed, Route) and not allowed.rewrite_from
        assert isinstance(denied, Route) and denied.rewrite_from and denied.sender == "relay@contoso.com"
    else:
        assert isinstance(allowed, Route) and allowed.rewrite_from
        assert isinstance(denied, Route) and denied.rewrite_from and denied.sender == "relay@contoso.com"


def test_null_sender_allowed() -> None:
    p = policy("never")
    route = p.route(user(p, "erp"), "")
    assert isinstance(route, Route) and route.mailbox == "relay@contoso.com" and route.sender == ""


@pytest.mark.parametrize("bad", ["a\r@contoso.com", "a\n@contoso.com", "a\x00@contoso.com", "a\x0b@contoso.com",
                                 "a\x7f@contoso.com", "a\udcff@contoso.com"])
def test_control_characters_refused(bad: str) -> None:
    p = policy("always")
    refusal = p.route(user(p, "erp"), bad)
    assert isinstance(refusal, Refusal) and refusal.code == 553
    rcpt = p.check_recipient(bad)
    assert rcpt is not None and rcpt.code == 553


def headers(from_value: str | None, *more: str) -> bytes:
    lines = [f"From: {from_value}"] if from_value is not None else []
    lines += [*more, "Subject: s"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


ROUTE = Route(app="contoso", mailbox="relay@contoso.com", sender="relay@contoso.com")
REWRITTEN = Route(app="contoso", mailbox="relay@contoso.com", sender="relay@contoso.com", rewrite_from=True)


@pytest.mark.parametrize(("mode", "from_value", "expected"), [
    ("when-not-allowed", "Relay <relay@contoso.com>", HeaderDecision()),
    ("when-not-allowed", '"Doe, Jane" <jane@alerts.contoso.com>', HeaderDecision()),
    ("when-not-allowed", "CEO <ceo@contoso.com>", HeaderDecision("relay@contoso.com")),
    ("when-not-allowed", "relay@contoso.com, ceo@contoso.com", HeaderDecision("relay@contoso.com")),
    ("when-not-allowed", "relay@contoso.com <ceo@contoso.com>", HeaderDecision("relay@contoso.com")),  # ambiguous
    ("when-not-allowed", "=?utf-8?q?relay=40contoso.com?= <ceo@contoso.com>", HeaderDecision("relay@contoso.com")),
    ("never", "Relay <relay@contoso.com>", HeaderDecision()),
    ("never", "CEO <ceo@contoso.com>", "550 5.7.1"),
    ("never", "garbage without address", "550 5.7.1"),
    ("always", "Relay <relay@contoso.com>", HeaderDecision("relay@contoso.com")),
])
def test_header_from_modes(mode: str, from_value: str, expected: HeaderDecision | str) -> None:
    p = policy(mode)
    decision = p.header_from(user(p, "erp"), ROUTE, headers(from_value))
    if isinstance(expected, str):
        assert isinstance(decision, Refusal) and decision.reply.startswith(expected)
        assert "header From" in decision.reply
    else:
        assert decision == expected


def test_header_from_when_envelope_was_rewritten_but_from_is_allowed() -> None:
    p = policy()
    assert p.header_from(user(p, "erp"), REWRITTEN, headers("relay@contoso.com")) == HeaderDecision()
    assert p.header_from(user(p, "erp"), REWRITTEN, headers(None)) == HeaderDecision("relay@contoso.com")
    assert p.header_from(user(p, "erp"), ROUTE, headers(None)) == HeaderDecision()


@pytest.mark.parametrize("mode", ["never", "when-not-allowed", "always"])
def test_two_from_fields_refused(mode: str) -> None:
    p = policy(mode)
    decision = p.header_from(user(p, "erp"), ROUTE, headers("relay@contoso.com", "From: ceo@contoso.com"))
    assert isinstance(decision, Refusal) and decision.reply.startswith("554 5.6.0")


@pytest.mark.parametrize(("auth", "login", "client", "expected"), [
    pytest.param("optional", "erp", "192.0.2.1", "user erp", id="logged-in-from-anywhere"),
    pytest.param("optional", "gone", "10.1.2.3", None, id="login-no-longer-configured-is-nobody"),
    pytest.param("optional", None, "10.1.2.3", "network 10.1.0.0/16", id="allowlisted-network"),
    pytest.param("optional", None, "::ffff:10.1.2.3", "network 10.1.0.0/16", id="ipv4-mapped-client"),
    pytest.param("optional", "", "127.0.0.1", "network 127.0.0.1/32", id="empty-login-is-no-login"),
    pytest.param("optional", None, "192.0.2.1", None, id="unlisted-network"),
    pytest.param("required", None, "10.1.2.3", None, id="required-ignores-networks"),
    pytest.param("required", "erp", "10.1.2.3", "user erp", id="required-user"),
])
def test_principal_is_the_logged_in_user_else_the_allowlisted_network(
        auth: str, login: str | None, client: str, expected: str | None) -> None:
    p = policy(accept={"auth": auth, "networks": ["10.1.0.0/16", "127.0.0.1/32"]})
    principal = p.principal(login, client)
    assert (principal.name if principal else None) == expected
