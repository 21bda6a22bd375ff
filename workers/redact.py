"""Keep secrets out of logs and error messages.

A Redis URL may carry a password (`redis://:pw@host:6379/0`, `rediss://user:pw@...`):
anything that prints or logs a URL prints `redact_url(url)` instead, and error messages
about connections name the exception class and its text (redis-py never puts the
password there) rather than the connection's parameters.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"


# a query parameter whose name holds one of these is masked (api-key, subscription-key,
# client_secret, access_token, sig, auth, ...)
_SECRET_PARTS = ("password", "passwd", "key", "token", "secret", "sig", "auth")


def _mask_query(query: str) -> str:
    """`password=...` (redis-py reads it from the query too) and API keys masked."""
    if not query:
        return query
    pairs = [p.partition("=") for p in query.split("&")]
    def secret(name: str) -> bool:
        plain = unquote(name).lower()
        return any(part in plain for part in _SECRET_PARTS)

    return "&".join(f"{k}={MASK}" if eq and secret(k) else f"{k}{eq}{v}" for k, eq, v in pairs)


_REDIS_SCHEMES = ("redis", "rediss")


def _broken_authority(url: str) -> bool:
    """Whether an `@` after the netloc `urlsplit` found is really the end of a user info
    whose password holds an unencoded `/`, `?` or `#`: those end the netloc early, so the
    password reads as host, port, path or fragment. Only when the netloc so found is no
    authority at all (no host name, or a port that is not a number), or when a Redis URL
    has an `@` in its path or fragment; an `@` in the path or query of another well-formed
    URL (an e-mail address, a model version), or in a Redis URL's query, is left alone."""
    parts = urlsplit(url)
    if not parts.netloc or "@" in parts.netloc or "@" not in url.partition("://")[2]:
        return False
    if parts.scheme in _REDIS_SCHEMES and "@" in parts.path + parts.fragment:
        # a Redis URL's path is its db number and it has no fragment: an @ there ends a
        # user info whose password's first part before the / or # reads as a port
        # (`redis://user:12/x@host:6379/0`: `user:12` is a well-formed host and port)
        return True
    try:
        return not parts.hostname or (parts.port is None and ":" in parts.netloc)
    except ValueError:  # a port that is not a number: part of a password
        return True


def redact_url(url: str) -> str:
    """The URL with its password (if any, in the netloc or the query) and API keys in its
    query replaced by `***`; unparseable input is masked whole rather than risked."""
    if _broken_authority(url):
        # everything up to the last @ is user info: masked whole; the rest is read normally
        scheme, _, rest = url.partition("://")
        return redact_url(f"{scheme}://{MASK}@{rest.rpartition('@')[2]}")
    try:
        parts = urlsplit(url)
        query = _mask_query(parts.query)
        if query != parts.query:
            parts = parts._replace(query=query)
            url = urlunsplit(parts)
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

