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


def _unparseable_userinfo(url: str) -> bool:
    """Whether the part after `scheme://` holds an `@` that `urlsplit` will not see as the
    end of the user info: a password with `/`, `?` or `#` (unencoded) ends the netloc
    early, and the password then shows up as part of the host, path or fragment."""
    _, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return False
    netloc_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    return "@" not in rest[:netloc_end]


def redact_url(url: str) -> str:
    """The URL with its password (if any, in the netloc or the query) and API keys in its
    query replaced by `***`; unparseable input is masked whole rather than risked."""
    if _unparseable_userinfo(url):
        # everything up to the last @ may be secret: keep only the scheme and the host
        scheme, _, rest = url.partition("://")
        return f"{scheme}://{MASK}@{rest.rpartition('@')[2]}"
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

