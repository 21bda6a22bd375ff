"""Keep secrets out of logs and error messages.

A Redis URL may carry a password (`redis://:pw@host:6379/0`, `rediss://user:pw@...`):
anything that prints or logs a URL prints `redact_url(url)` instead, and error messages
about connections name the exception class and its text (redis-py never puts the
password there) rather than the connection's parameters.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by `***`; unparseable input is
    masked whole rather than risked."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        netloc = f"{user}:{MASK}@{host}{port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    except ValueError:
        return MASK

