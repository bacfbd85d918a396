"""Who may send, as whom, and through which mailbox and app registration.

Policy sees a principal (an authenticated local user, or an allowlisted network for clients that
never authenticate) and an envelope sender, and answers with a :class:`Route` or a :class:`Refusal`.
It never touches the network or the disk.

Sender patterns (``may_send_as``): an exact address ``noreply@contoso.com``, a whole domain
``@contoso.com`` (or ``*@contoso.com``), a shell-style pattern ``alerts-*@contoso.com``, or ``*``.
An empty list means: any address listed under ``mailboxes``.

The same patterns judge the envelope sender (MAIL FROM, :meth:`Policy.route`) and the header
``From:`` (:meth:`Policy.header_from`), because Exchange checks SendAs on the header From: a client
allowed to use one envelope sender must not put someone else's address in From. ``rewrite_from``:

- ``never``: a sender or From the principal may not use is refused (550 5.7.1);
- ``when-not-allowed`` (default): it is replaced by the carrying mailbox (display name kept,
  original address in Reply-To); allowed addresses pass unchanged;
- ``always``: envelope sender and From always become the carrying mailbox.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relay.config import AuthMode, NetworkRule, RewriteFrom, Settings, UserSettings
from relay.envelope import Route
from relay.intake.addresses import has_forbidden_characters
from relay.intake.rewrite import field_name, from_addresses, split_header_fields


@dataclass(frozen=True)
class Refusal:
    """An SMTP refusal: code, enhanced status and text."""

    code: int
    text: str

    @property
    def reply(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class Principal:
    """Who is sending: a local user, or an allowlisted network rule (no AUTH)."""

    name: str
    may_send_as: tuple[str, ...]
    mailbox: str | None

    @classmethod
    def for_user(cls, user: UserSettings) -> Principal:
        return cls(name=f"user {user.name}", may_send_as=user.may_send_as, mailbox=user.mailbox)

    @classmethod
    def for_network(cls, rule: NetworkRule) -> Principal:
        return cls(name=f"network {rule.network}", may_send_as=rule.may_send_as, mailbox=rule.mailbox)


def sender_matches(address: str, pattern: str) -> bool:
    """Does ``address`` match one ``may_send_as`` pattern (case-insensitive)?"""
    address = address.lower()
    pattern = pattern.strip().lower()
    if pattern == "*":
        return True
    if pattern.startswith("@"):
        return address.endswith(pattern)
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(address, pattern)
    return address == pattern


@dataclass(frozen=True)
class HeaderDecision:
    """What to do with a message's header From: keep it (``rewrite_to`` None) or rewrite it; and
    whether to remove a ``Sender:`` field the client may not use."""

    rewrite_to: str | None = None
    drop_sender: bool = False


class Policy:
    """Routing decisions for one configuration (a reload builds a new Policy)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._mailboxes = {m.address: m for m in settings.mailboxes}
        self._users = {u.name: u for u in settings.users}
        self._networks = [(ipaddress.ip_network(r.network, strict=False), r) for r in settings.accept.networks]

    def user(self, name: str) -> UserSettings | None:
        return self._users.get(name)

    def principal(self, user: str | None, client_ip: str) -> Principal | None:
        """Who is sending: the logged-in ``user`` (None: no login), else the allowlisted network of
        ``client_ip``, which ``accept.auth: required`` never accepts. None: nobody we know."""
        if user:
            found = self.user(user)
            return Principal.for_user(found) if found else None
        if self.settings.accept.auth is AuthMode.REQUIRED:
            return None
        rule = self.network_rule(client_ip)
        return Principal.for_network(rule) if rule else None

    def network_rule(self, peer_ip: str) -> NetworkRule | None:
        """The first allowlisted network containing ``peer_ip`` (IPv4-mapped IPv6 understood)."""
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net, rule in self._networks:
            if ip.version == net.version and ip in net:
                return rule
        return None

    def may_send_as(self, principal: Principal, address: str) -> bool:
        if not principal.may_send_as:
            return address.lower() in self._mailboxes
        return any(sender_matches(address, p) for p in principal.may_send_as)

    def header_from(self, principal: Principal, route: Route, headers: bytes) -> HeaderDecision | Refusal:
        """Judge the header ``From:`` of a message whose envelope :meth:`route` already accepted.

        More than one From field is refused (Exchange and mail clients would each pick a different
        one). A From that does not parse to unambiguous addresses counts as not allowed.
        """
        fields = split_header_fields(headers)
        froms = [f for f in fields if field_name(f) == "from"]
        if len(froms) > 1:
            return Refusal(554, "5.6.0 Message has more than one From header field")
        senders = [f for f in fields if field_name(f) == "sender"]
        if len(senders) > 1:
            return Refusal(554, "5.6.0 Message has more than one Sender header field")
        mode = self.settings.sender.rewrite_from
        # Sender: is shown as "<Sender> on behalf of <From>": the same rule as for From applies.
        drop_sender = False
        if senders:
            sender = from_addresses(senders[0])
            if not (sender and len(sender) == 1 and self._allowed(principal, sender)):
                if mode is RewriteFrom.NEVER:
                    shown = f"<{sender[0]}>" if sender and len(sender) == 1 else "this header Sender"
                    return Refusal(550, f"5.7.1 {principal.name} may not send as {shown} (header Sender)")
                drop_sender = True
        if mode is RewriteFrom.ALWAYS or (route.rewrite_from and not froms):
            return HeaderDecision(rewrite_to=route.mailbox, drop_sender=drop_sender)
        if not froms:
            return HeaderDecision(drop_sender=drop_sender)
        addresses = from_addresses(froms[0])
        if addresses and self._allowed(principal, addresses):
            return HeaderDecision(drop_sender=drop_sender)
        if mode is RewriteFrom.NEVER:
            shown = ", ".join(f"<{a}>" for a in addresses) if addresses else "this header From"
            return Refusal(550, f"5.7.1 {principal.name} may not send as {shown} (header From)")
        return HeaderDecision(rewrite_to=route.mailbox, drop_sender=drop_sender)

    def _allowed(self, principal: Principal, addresses: Iterable[str]) -> bool:
        return all(not has_forbidden_characters(a) and self.may_send_as(principal, a) for a in addresses)

    def check_recipient(self, address: str) -> Refusal | None:
        if has_forbidden_characters(address) or not address or "@" not in address:
            return Refusal(553, "5.1.3 Recipient address is not a valid address")
        return None

    def route(self, principal: Principal, mail_from: str) -> Route | Refusal:
        """Decide the mailbox, the app and the envelope sender for a message from ``principal``."""
        if has_forbidden_characters(mail_from):
            return Refusal(553, "5.1.7 Sender address contains forbidden characters")
        sender = mail_from.lower()
        rewrite_mode = self.settings.sender.rewrite_from
        allowed = sender == "" or self.may_send_as(principal, sender)
        own_mailbox = self._mailboxes.get(sender) if allowed else None

        if own_mailbox is not None and rewrite_mode is not RewriteFrom.ALWAYS:
            return Route(app=own_mailbox.app, mailbox=own_mailbox.address, sender=mail_from)

        carrier = principal.mailbox or self.settings.sender.default_mailbox
        if carrier is None:
            if not allowed:
                return Refusal(550, f"5.7.1 {principal.name} may not send as <{mail_from}>")
            return Refusal(550, f"5.7.1 <{mail_from}> is not a configured mailbox and no "
                                "sender.default_mailbox is set")
        mailbox = self._mailboxes[carrier]
        if allowed and rewrite_mode is not RewriteFrom.ALWAYS:
            # Allowed sender that is not itself a mailbox: carried by the default mailbox, which
            # needs SendAs on it in Exchange (Add-RecipientPermission, admin step 5).
            return Route(app=mailbox.app, mailbox=mailbox.address, sender=mail_from)
        if rewrite_mode is RewriteFrom.NEVER:
            return Refusal(550, f"5.7.1 {principal.name} may not send as <{mail_from}>")
        note = f"sender <{mail_from}> rewritten to <{mailbox.address}>"
        return Route(app=mailbox.app, mailbox=mailbox.address, sender=mailbox.address,
                     rewrite_from=True, notes=(note,))
