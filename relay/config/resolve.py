"""The raw YAML tree before validation: ``${ENV}`` expanded, placeholders from the example config
found, ``*_file`` secrets read (or, for commands that use no credential, left unread)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.config.problems import key_path
from relay.errors import ConfigError

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PLACEHOLDER_RE = re.compile(r"<[A-Z][A-Z0-9_ -]*>")
#: keys whose value is a secret; each has a ``<key>_file`` twin read at load time.
_SECRET_FILE_KEYS = {"client_secret_file": "client_secret", "pfx_password_file": "pfx_password",
                     "password_file": "password"}
_INLINE_SECRET_KEYS = {"client_secret", "pfx_password", "password"}
#: keys that hold an app's credential or point at it: only token requests need them.
_CREDENTIAL_KEYS = {*_SECRET_FILE_KEYS, *_INLINE_SECRET_KEYS, "private_key_file", "certificate_file", "pfx_file",
                    "federated_token_file"}


class Resolver:
    """Expand ``${ENV}``, collect example placeholders, read ``*_file`` secrets.

    ``read_secrets=False`` (commands that need no credential: queue, health, exchange-setup): no
    secret file is read, and a credential key whose ``${VAR}`` is unset (``${CREDENTIALS_DIRECTORY}``
    outside the service) keeps its text. ``lenient_credentials`` does the latter while still reading
    every secret it can (``check --offline`` from an admin's shell); the keys left unread are listed
    in ``unread``. ``secrets_of="fleet"``: only that top-level section's secrets are read; the others
    are treated as with ``read_secrets=False`` (``fleet status`` needs Redis's password, not the apps').
    """

    def __init__(self, file: str, base: Path, env: Mapping[str, str], *, read_secrets: bool,
                 lenient_credentials: bool, secrets_of: str | None = None) -> None:
        self.file = file
        self.base = base
        self.env = env
        self.read_secrets = read_secrets
        self.secrets_of = secrets_of
        self.lenient = lenient_credentials or not read_secrets
        self.inline_secrets: list[str] = []
        self.placeholders: list[tuple[str, str]] = []
        self.unread: list[str] = []
        self._unread_paths: set[tuple[str | int, ...]] = set()
        #: secret files to read once the whole file is known to hold no placeholder
        self._pending: list[tuple[dict[str, Any], str, Any, tuple[str | int, ...]]] = []

    def read_secret_files(self) -> None:
        for out, secret_key, secret_file, path in self._pending:
            out[secret_key] = _read_secret_file(secret_file, path, self.file, self.base)

    def resolve(self, node: Any, path: tuple[str | int, ...] = ()) -> Any:
        if isinstance(node, dict):
            return self._mapping(node, path)
        if isinstance(node, list):
            return [self.resolve(v, (*path, i)) for i, v in enumerate(node)]
        if isinstance(node, str):
            return self._string(node, path)
        return node

    def _mapping(self, node: dict[Any, Any], path: tuple[str | int, ...]) -> dict[str, Any]:
        file = self.file
        out: dict[str, Any] = {}
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(file, key_path((*path, str(key))), "keys must be strings")
            out[key] = self.resolve(value, (*path, key))
        for file_key, secret_key in _SECRET_FILE_KEYS.items():
            if file_key in out:
                if secret_key in out:
                    raise ConfigError(file, key_path((*path, file_key)),
                                      f"give either {secret_key} or {file_key}, not both")
                secret_file = out.pop(file_key)
                out[secret_key] = "not-read"
                if self._reads(path) and (*path, file_key) not in self._unread_paths:
                    self._pending.append((out, secret_key, secret_file, (*path, file_key)))
            elif isinstance(out.get(secret_key), str) and secret_key in node and "${" not in str(node[secret_key]):
                self.inline_secrets.append(key_path((*path, secret_key)))
        return out

    def _reads(self, path: tuple[str | int, ...]) -> bool:
        """Whether the secrets at ``path`` are read."""
        return self.read_secrets and (self.secrets_of is None or path[:1] == (self.secrets_of,))

    def _string(self, node: str, path: tuple[str | int, ...]) -> str:
        def substitute(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in self.env:
                return self.env[name]
            if (self.lenient or not self._reads(path)) and path and path[-1] in _CREDENTIAL_KEYS:
                self._unread_paths.add(path)
                self.unread.append(f"{key_path(path)} (${{{name}}} is not set)")
                return m.group(0)
            raise ConfigError(self.file, key_path(path),
                              f"environment variable {name} is not set (referenced as ${{{name}}})")

        value = _ENV_RE.sub(substitute, node)
        if _PLACEHOLDER_RE.search(value):
            self.placeholders.append((key_path(path), value))
        return value


def _read_secret_file(value: Any, path: tuple[str | int, ...], file: str, base: Path) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(file, key_path(path), "expected the path of a file holding the secret")
    secret_path = Path(value)
    if not secret_path.is_absolute():
        secret_path = base / secret_path
    try:
        text = secret_path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(file, key_path(path),
                          f"cannot read {secret_path}: {exc.strerror or exc}; check the path and that the "
                          "relay's user may read it") from None
    if not text:
        raise ConfigError(file, key_path(path), f"{secret_path} is empty")
    return text
