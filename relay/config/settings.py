"""The whole configuration (:class:`Settings`): its sections, the checks across them (names unique,
every reference resolves, never an open relay) and the per-mailbox pacing defaults."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field, model_validator

from relay.config.apps import AppSettings, MailboxSettings
from relay.config.networks import is_loopback_host, too_wide
from relay.config.problems import KeyedError
from relay.config.sections import (
    AcceptSettings,
    AuthMode,
    DeliverySettings,
    FleetSettings,
    LimitSettings,
    ListenerTlsSettings,
    ListenSettings,
    ObservabilitySettings,
    SenderSettings,
    SpoolSettings,
    TlsMode,
    UserSettings,
)
from relay.config.values import FrozenModel


class Settings(FrozenModel):
    """The whole configuration. Frozen: a reload builds a new one."""

    listen: tuple[ListenSettings, ...] = (ListenSettings(),)
    tls: ListenerTlsSettings | None = None
    hostname: str | None = None
    accept: AcceptSettings = AcceptSettings()
    users: tuple[UserSettings, ...] = ()
    apps: tuple[AppSettings, ...] = Field(min_length=1)
    mailboxes: tuple[MailboxSettings, ...] = Field(min_length=1)
    sender: SenderSettings = SenderSettings()
    delivery: DeliverySettings = DeliverySettings()
    limits: LimitSettings = LimitSettings()
    spool: SpoolSettings = SpoolSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    #: optional: share each mailbox's limits with other relays through Redis (relay.fleet)
    fleet: FleetSettings | None = None

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        _unique("apps", [a.name for a in self.apps])
        _unique("mailboxes", [m.address for m in self.mailboxes])
        _unique("users", [u.name for u in self.users])
        app_names = {a.name for a in self.apps}
        for i, mbx in enumerate(self.mailboxes):
            if mbx.app not in app_names:
                raise KeyedError(f"mailboxes[{i}].app",
                                  f"no app named {mbx.app!r}; apps are: {', '.join(sorted(app_names))}")
        mailboxes = {m.address for m in self.mailboxes}
        if self.sender.default_mailbox and self.sender.default_mailbox not in mailboxes:
            raise KeyedError("sender.default_mailbox",
                              f"{self.sender.default_mailbox!r} is not listed under mailboxes")
        for i, user in enumerate(self.users):
            if user.mailbox and user.mailbox not in mailboxes:
                raise KeyedError(f"users[{i}].mailbox", f"{user.mailbox!r} is not listed under mailboxes")
        for i, rule in enumerate(self.accept.networks):
            if rule.mailbox and rule.mailbox not in mailboxes:
                raise KeyedError(f"accept.networks[{i}].mailbox",
                                  f"{rule.mailbox!r} is not listed under mailboxes")
        needs_tls = [lst.address for lst in self.listen if lst.tls is not TlsMode.NONE]
        if needs_tls and self.tls is None:
            raise KeyedError("tls", f"listener(s) {', '.join(needs_tls)} use TLS: set tls.cert_file and tls.key_file")
        if self.accept.auth is not AuthMode.NONE and not self.users and self.accept.auth is AuthMode.REQUIRED:
            raise KeyedError("users", "accept.auth is 'required' but no users are configured")
        _refuse_open_relay(self)
        return self

    def app(self, name: str) -> AppSettings:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)

    def mailbox(self, address: str) -> MailboxSettings | None:
        address = address.lower()
        for mbx in self.mailboxes:
            if mbx.address == address:
                return mbx
        return None

    def _pacing_default(self, mbx: MailboxSettings, key: str) -> int:
        """delivery.per_mailbox.<key> when the admin set it, else the app's cloud preset (HVE differs)."""
        per_mailbox = self.delivery.per_mailbox
        if key in per_mailbox.model_fields_set:
            return int(getattr(per_mailbox, key))
        try:
            return int(getattr(self.app(mbx.app).preset, key))
        except KeyError:
            return int(getattr(per_mailbox, key))

    def mailbox_connections(self, mbx: MailboxSettings) -> int:
        return mbx.connections or self._pacing_default(mbx, "connections")

    def mailbox_per_minute(self, mbx: MailboxSettings) -> int:
        if mbx.per_minute is not None:
            return mbx.per_minute
        return self._pacing_default(mbx, "per_minute")


def open_relay_problem(settings: Settings, listening: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """Invariant 4: never run as an open relay. ``listening`` is (host, address shown) of every
    listener to judge: the file's own ``listen`` at start, the sockets actually bound on a reload
    (a changed ``listen`` needs a restart, so the old sockets are the ones that take mail).

    An open relay: a listener reachable beyond loopback while mail without AUTH is accepted from a
    network that is too wide (:func:`too_wide`). Each half alone is fine: a wide allowlist on a
    loopback-only listener reaches nobody, and a public listener with ``accept.auth: required`` (or a
    narrow allowlist) only takes mail from known users or hosts. Returns (key, problem) or None.
    """
    if settings.accept.auth is AuthMode.REQUIRED:
        return None
    public = [address for host, address in listening if not is_loopback_host(host)]
    if not public:
        return None
    for i, rule in enumerate(settings.accept.networks):
        if too_wide(rule.network):
            return (
                f"accept.networks[{i}]",
                f"{rule.network!r} lets anyone on the Internet send mail without a password through this relay "
                f"(an open relay), and the relay listens beyond loopback on {', '.join(public)}. Fix: list only "
                "the networks of your own apps (e.g. 10.1.2.0/24), or set accept.auth: required so every client "
                "logs in, or listen on 127.0.0.1 only. Entries wider than /16 (IPv4) or /48 (IPv6) that contain "
                "public addresses are refused.",
            )
    return None


def _refuse_open_relay(settings: Settings) -> None:
    problem = open_relay_problem(settings, [(lst.host, lst.address) for lst in settings.listen])
    if problem is not None:
        raise KeyedError(*problem)


def _unique(section: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise KeyedError(f"{section}[{i}]", f"{name!r} appears twice")
        seen.add(name)

