"""Local users' passwords: stored as scrypt hashes, verified off the event loop, cached safely.

Format: ``scrypt$<log2 N>$<r>$<p>$<salt b64>$<hash b64>``. scrypt is in the standard library
(hashlib, OpenSSL), so no extra dependency; parameters are stored with the hash so they can be raised
later without invalidating existing hashes.

Verification costs ~50 ms of CPU by design. Legacy apps log in on every message, so a successful
verification is remembered as an HMAC of (user, hash, password) under a per-process random key: a
later login with the same password skips scrypt, a changed password or a changed hash in the config
never matches the cache, and the cache never holds the password itself.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from collections import OrderedDict

_DEFAULT_LOG_N = 15
_DEFAULT_R = 8
_DEFAULT_P = 1
_MAXMEM = 128 * 1024 * 1024


def hash_password(password: str, *, log_n: int = _DEFAULT_LOG_N, r: int = _DEFAULT_R, p: int = _DEFAULT_P) -> str:
    """A new scrypt hash of ``password`` with a random salt."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=2**log_n, r=r, p=p, maxmem=_MAXMEM, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${log_n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time check of ``password`` against a stored hash. Malformed hashes never match."""
    try:
        scheme, log_n, r, p, salt_b64, hash_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
        digest = hashlib.scrypt(
            password.encode("utf-8"), salt=salt, n=2 ** int(log_n), r=int(r), p=int(p),
            maxmem=_MAXMEM, dklen=len(expected),
        )
    except (ValueError, TypeError, OverflowError, MemoryError):
        return False
    return hmac.compare_digest(digest, expected)


class VerifiedCache:
    """Remembers recent successful verifications without storing passwords.

    The key is HMAC-SHA256(process key, user NUL stored-hash NUL password): it changes when either
    the password or the configured hash changes, so a reload that changes a password takes effect
    at once. Bounded LRU.
    """

    def __init__(self, size: int = 1024) -> None:
        self._key = secrets.token_bytes(32)
        self._size = size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def _fingerprint(self, user: str, encoded: str, password: str) -> bytes:
        material = b"\0".join(s.encode("utf-8", "surrogateescape") for s in (user, encoded, password))
        return hmac.new(self._key, material, hashlib.sha256).digest()

    def hit(self, user: str, encoded: str, password: str) -> bool:
        fp = self._fingerprint(user, encoded, password)
        with self._lock:
            if fp in self._seen:
                self._seen.move_to_end(fp)
                return True
            return False

    def add(self, user: str, encoded: str, password: str) -> None:
        fp = self._fingerprint(user, encoded, password)
        with self._lock:
            self._seen[fp] = None
            self._seen.move_to_end(fp)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)
