"""Loading a config file: read the YAML, resolve it (:mod:`relay.config.resolve`), make file paths
relative to the file, validate it into :class:`relay.config.settings.Settings`; every problem one
ConfigError naming the file, the key and the fix. Warnings about the file are kept for the service
to log."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from relay.config.problems import KeyedError, config_error
from relay.config.resolve import Resolver
from relay.config.settings import Settings
from relay.errors import ConfigError


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None, *,
                  read_secrets: bool = True, unread_credentials: list[str] | None = None,
                  secrets_of: str | None = None) -> Settings:
    """Read, resolve and validate a config file. Raises ConfigError naming file and key.

    ``read_secrets=False``: for commands that use no credential (see :class:`Resolver`);
    ``secrets_of="fleet"``: read only the secrets of that section. A list
    passed as ``unread_credentials`` makes a credential key with an unset ``${VAR}`` no error: it is
    left unread and named in the list."""
    file = str(path)
    env = os.environ if env is None else env
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read the config file: {exc.strerror or exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(file, "", f"not valid YAML{line}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(file, "", "expected a mapping of sections (listen, apps, mailboxes, ...)")
    base = Path(path).resolve().parent
    load_warnings.clear()  # warnings are about the file just loaded
    # read_secrets=False: commands that need no credential (exchange-setup, queue, health) work on an
    # admin's machine, or from a root shell, without the secret files and without CREDENTIALS_DIRECTORY.
    resolver = Resolver(file, base, env, read_secrets=read_secrets,
                         lenient_credentials=unread_credentials is not None, secrets_of=secrets_of)
    resolved = resolver.resolve(raw)
    if resolver.placeholders:
        # All of them at once: the admin edits the file once, not once per placeholder.
        lines = [f"{value!r} is a placeholder from the example config: put the real value here"
                 for _, value in resolver.placeholders]
        problem = lines[0] + "".join(f"\n{file}: {key}: {line}"
                                     for (key, _), line in zip(resolver.placeholders[1:], lines[1:], strict=True))
        raise ConfigError(file, resolver.placeholders[0][0], problem)
    resolver.read_secret_files()
    if unread_credentials is not None:
        unread_credentials.extend(resolver.unread)
    _relative_paths(resolved, base)
    settings = settings_from_dict(resolved, file)
    if resolver.inline_secrets:
        _warn_if_readable(Path(path), resolver.inline_secrets)
    return settings


#: warnings produced while loading (e.g. world-readable file with inline secrets); the service logs them.
load_warnings: list[str] = []


def _warn_if_readable(path: Path, keys: list[str]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        load_warnings.append(
            f"{path} holds an inline secret ({', '.join(keys)}) and is readable by group/others: "
            f"chmod 600 {path}, or move the secret to a *_file or ${{ENV}} reference"
        )


def settings_from_dict(data: Mapping[str, Any], file: str = "<config>") -> Settings:
    """Validate an already-resolved mapping (used by load_settings and by the demo)."""
    try:
        return Settings.model_validate(data)
    except KeyedError as exc:
        raise ConfigError(file, exc.key, exc.problem) from None
    except ValidationError as exc:
        raise config_error(exc, file, Settings) from None


def _relative_paths(settings_dict: dict[str, Any], base: Path) -> None:
    """File paths in the config are relative to the config file's folder."""
    def fix(node: Any, key: str) -> Any:
        if isinstance(node, str) and key.endswith(("_file", "path")) and not os.path.isabs(node):
            return str(base / node)
        if isinstance(node, dict):
            return {k: fix(v, k) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v, key) for v in node]
        return node

    for k, v in list(settings_dict.items()):
        settings_dict[k] = fix(v, k)

