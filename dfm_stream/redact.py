"""The one URL redaction of dfm-stream: every URL shown to a person goes through :func:`safe_url`.

Redis URLs, camera source URLs (RTSP, HTTP, ...), ``--help`` defaults, log lines, error messages,
``repr``s and stored camera descriptions all use it, so a password never leaks through one place
that forgot. It masks

* the password of ``user:password@host`` (with or without a scheme: ``u:pw@host:6379`` too), and
* the value of secret query parameters (``?password=``, ``?pass=``, ``?token=``, ...),

keeps everything else byte for byte (``host:port`` without a scheme, unix socket paths, file
paths, ``synthetic:...``), and never raises: it is called while reporting other errors.
"""

from __future__ import annotations

import re

MASK = "***"

SECRET_PARAMS = frozenset(
    {
        "password",
        "pass",
        "passwd",
        "pwd",
        "token",
        "access_token",
        "auth",
        "auth_token",
        "secret",
        "api_key",
        "apikey",
        "key",
        "sig",
        "signature",
    }
)
"""Query parameter names (case-insensitive) whose values are secrets."""

_QUERY_PARAM = re.compile(r"(^|[&;])([^=&;#]*)=([^&;#]*)")


def safe_url(url: object) -> str:
    """Return ``url`` with its password and secret query values replaced by ``***``; never raises."""
    try:
        text = url if isinstance(url, str) else str(url)
        return _mask_query(_mask_userinfo(text))
    except Exception:  # a redaction must never turn one error into another
        return "<url hidden>"


def _mask_userinfo(text: str) -> str:
    """Mask ``password`` in ``[scheme://]user:password@host...``; leave ``user@host`` as it is."""
    start = text.find("://")
    start = 0 if start < 0 else start + 3
    end = len(text)
    for stop in "/?#":
        found = text.find(stop, start)
        if found >= 0:
            end = min(end, found)
    authority = text[start:end]
    if "@" not in authority:  # an unescaped ? or # inside the password: mask up to the '@' anyway
        slash = text.find("/", start)
        end = len(text) if slash < 0 else slash
        authority = text[start:end]
    userinfo, at, hostport = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{text[:start]}{user}:{MASK}@{hostport}{text[end:]}"


def _mask_query(text: str) -> str:
    """Mask the values of secret parameters in the query string (``?password=...&token=...``)."""
    qmark = text.find("?")
    if qmark < 0:
        return text
    hashmark = text.find("#", qmark)
    end = len(text) if hashmark < 0 else hashmark
    query = text[qmark + 1 : end]

    def mask(m: re.Match[str]) -> str:
        if m.group(2).strip().lower() in SECRET_PARAMS and m.group(3):
            return f"{m.group(1)}{m.group(2)}={MASK}"
        return m.group(0)

    return f"{text[: qmark + 1]}{_QUERY_PARAM.sub(mask, query)}{text[end:]}"


def help_text(url: str) -> str:
    """Return ``safe_url(url)`` escaped for an argparse help string (``%`` doubled)."""
    return safe_url(url).replace("%", "%%")
