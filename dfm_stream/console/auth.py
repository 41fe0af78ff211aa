"""Who may use the console: a users file with password hashes, two roles, sessions and CSRF tokens.

The users file is JSON written by ``dfm-stream console add-user``::

    {"users": {"alice": {"role": "operator", "hash": "$argon2id$v=19$..."}}}

Passwords are hashed with argon2id (argon2-cffi); the file holds no plain password. Roles:
``viewer`` (read only) and ``operator`` (acknowledge, false alarm, assign, rollback). The session
is a cookie signed by Starlette's ``SessionMiddleware`` (itsdangerous) holding the user name and
the CSRF token; the role is looked up in the users file on every request, so removing a user or
changing a role takes effect at once. Without a users file nobody logs in and the console is read
only.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from dfm_stream.errors import ConsoleError
from dfm_stream.keys import valid_name

ROLES = ("viewer", "operator")
CSRF_FIELD = "csrf_token"
"""The form field (or ``X-CSRF-Token`` header) every state-changing request must carry."""
MIN_PASSWORD = 8

_hasher = PasswordHasher()
_DUMMY_HASH = _hasher.hash("not a password of anyone")


@dataclass(frozen=True)
class User:
    """A console user as a request sees it (``anonymous`` when nobody is logged in)."""

    name: str
    role: str

    @property
    def can_act(self) -> bool:
        """True for operators: they may acknowledge, mark false alarms, assign and roll back."""
        return self.role == "operator"

    @property
    def logged_in(self) -> bool:
        """True for a user from the users file (not the anonymous visitor)."""
        return self.name != ""


ANONYMOUS = User("", "viewer")


def read_users(path: Path) -> dict[str, dict[str, str]]:
    """Return ``name -> {"role", "hash"}`` from a users file; ConsoleError when it is unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ConsoleError(f"cannot read the console users file {path}: {e}") from e
    users = data.get("users") if isinstance(data, dict) else None
    if not isinstance(users, dict):
        raise ConsoleError(f'console users file {path}: expected {{"users": {{NAME: {{role, hash}}}}}}')
    for name, entry in users.items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES or not entry.get("hash"):
            raise ConsoleError(f"console users file {path}: user {name!r} needs a role {ROLES} and a hash")
    return users


def add_user(path: Path, name: str, role: str, password: str) -> bool:
    """Write (or replace) ``name`` in the users file with an argon2 hash; return True if it was new."""
    if not valid_name(name):
        raise ConsoleError(f"user name {name!r}: use 1-64 letters, digits, '_', '.' or '-'")
    if role not in ROLES:
        raise ConsoleError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise ConsoleError(f"the password must have at least {MIN_PASSWORD} characters")
    users = read_users(path)
    new = name not in users
    users[name] = {"role": role, "hash": _hasher.hash(password)}
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"users": users}, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return new


class Users:
    """The users file of a running console, re-read when it changes on disk."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._users: dict[str, dict[str, str]] = {}
        if path is not None and not path.is_file():
            raise ConsoleError(
                f"console users file {path} does not exist: create it with"
                " `dfm-stream console add-user --users FILE --name NAME --role operator`"
            )
        self._reload()

    @property
    def enabled(self) -> bool:
        """False when the console runs without a users file (read only for everyone)."""
        return self.path is not None

    def _reload(self) -> dict[str, dict[str, str]]:
        if self.path is None:
            return {}
        with self._lock:
            try:
                mtime = self.path.stat().st_mtime
            except OSError:
                self._users, self._mtime = {}, None
                return {}
            if mtime != self._mtime:
                self._users, self._mtime = read_users(self.path), mtime
            return self._users

    def role_of(self, name: str) -> str | None:
        """Return the role of ``name``, or None when it is not (or no longer) in the file."""
        entry = self._reload().get(name)
        return entry["role"] if entry else None

    def check(self, name: str, password: str) -> User | None:
        """Return the user when the password matches; None otherwise (same work either way)."""
        entry = self._reload().get(name)
        try:
            _hasher.verify(entry["hash"] if entry else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return User(name, entry["role"]) if entry else None


def session_user(session: dict[str, Any], users: Users) -> User:
    """Return the logged-in user of a session (anonymous when none, or when removed from the file)."""
    name = session.get("user")
    if not isinstance(name, str) or not users.enabled:
        return ANONYMOUS
    role = users.role_of(name)
    return User(name, role) if role else ANONYMOUS


def csrf_token(session: dict[str, Any]) -> str:
    """Return the session's CSRF token, creating it on first use."""
    token = session.get("csrf")
    if not isinstance(token, str) or len(token) < 32:
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def csrf_ok(session: dict[str, Any], submitted: str | None) -> bool:
    """Return True when ``submitted`` equals the session's CSRF token (constant-time comparison)."""
    expected = session.get("csrf")
    if not isinstance(expected, str) or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


def load_secret(path: Path | None) -> str:
    """Return the cookie signing key: from ``path``, env ``DFM_CONSOLE_SECRET``, or a random one."""
    if path is not None:
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConsoleError(f"cannot read the console secret file {path}: {e}") from e
        if len(secret) < 16:
            raise ConsoleError(f"console secret file {path}: the secret must have at least 16 characters")
        return secret
    return os.environ.get("DFM_CONSOLE_SECRET") or secrets.token_urlsafe(32)
