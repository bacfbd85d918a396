"""The data every stage hands on: what the client asked for and where policy routes it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope as the client gave it. The envelope is the truth, never the headers.

    ``mail_from`` is ``""`` for the null sender ``<>`` (bounces). ``mail_options`` are the ESMTP
    parameters of MAIL FROM worth passing on (``SMTPUTF8``, ``BODY=8BITMIME``); ``SIZE`` is not kept.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    """Where policy sends a message.

    ``app`` names the app registration (tenant + client) whose token carries it, ``mailbox`` is the
    XOAUTH2 ``user=`` (the mailbox the service principal has FullAccess on), ``sender`` the envelope
    sender to use upstream (may differ from the client's after a From rewrite).
    """

    app: str
    mailbox: str
    sender: str
    transport: str = "smtp"
    rewrite_from: bool = False
    notes: tuple[str, ...] = field(default=())
