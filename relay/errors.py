"""Exception types shared along the pipeline.

They live here, not in the module that raises them, so that a consumer (the classifier, the
CLI) can recognise them without importing the producer and the dependencies stay one-way.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base class for the relay's own errors."""


class ConfigError(RelayError):
    """The configuration is unusable. Names the file, the key and what is expected."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")


class ListenError(RelayError):
    """A socket to listen on could not be opened (port in use, address not on this host, no permission).

    The message is the whole answer for the admin: ``cannot listen on 127.0.0.1:2525: address already
    in use``; ``what`` names a socket other than an SMTP listener (the metrics endpoint)."""

    def __init__(self, address: str, reason: str, what: str = "") -> None:
        self.address = address
        self.reason = reason
        self.what = what
        label = f" ({what})" if what else ""
        super().__init__(f"cannot listen on {address}{label}: {reason}")


class TokenError(RelayError):
    """Entra ID did not give us a token.

    ``error`` is the OAuth error (``invalid_client``...), ``aadsts`` the first AADSTS code if any.
    ``transient`` is True when trying again later may help without an admin doing anything
    (network down, HTTP 5xx/429, timeouts). The description never contains a secret: Entra ID
    does not echo secrets, and we never add them.
    """

    def __init__(
        self,
        app: str,
        error: str,
        description: str = "",
        aadsts: int | None = None,
        transient: bool = False,
    ) -> None:
        self.app = app
        self.error = error
        self.description = description
        self.aadsts = aadsts
        self.transient = transient
        code = f" AADSTS{aadsts}" if aadsts is not None else ""
        super().__init__(f"token for app {app!r} failed: {error}{code}: {description}".rstrip(": "))


class SpoolError(RelayError):
    """The spool could not store or change a message (disk full, not writable, corrupt)."""


class SpoolFull(SpoolError):
    """No space (or quota, or a read-only filesystem) for a new message: the client gets 452 4.3.1."""


def exception_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """``exc``, its ``__cause__`` (or ``__context__``), and so on: at most ``limit``, loop-safe.
    What a library wraps (an SSL error inside a connect error, a timeout inside a requests error)
    is found by walking this."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < limit and all(cur is not e for e in out):
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out

