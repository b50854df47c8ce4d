"""Signed webhook delivery from the persisted outbox.

Every finished analysis with a `webhook_url` gets an outbox row in the same transaction as
its final status, so a restart loses no notification. The dispatcher POSTs the JSON body
with these headers:

    X-MarrowScope-Event-Id:  outbox row id (stable across retries: deduplicate on it)
    X-MarrowScope-Timestamp: unix seconds when this attempt was signed
    X-MarrowScope-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

Receivers recompute the HMAC with the shared secret (`MS_GATEWAY_WEBHOOK_SECRET`), compare
in constant time and reject timestamps older than a few minutes (replay). Non-2xx answers
and transport errors are retried with exponential backoff (`WEBHOOK_BACKOFF_S * 2**n`,
capped at `WEBHOOK_BACKOFF_MAX_S`) up to `WEBHOOK_MAX_ATTEMPTS`, then the row is `dead`.

Destinations (SSRF): a webhook URL is chosen by whoever holds a submit key, so the gateway
must not become a way into the hospital network or the cloud metadata service. Refused by
default: userinfo in the URL, schemes other than http(s), hosts that are loopback, private,
link-local, shared, multicast or reserved addresses (also in their numeric spellings, which
the URL parser normalises, and inside IPv6 transition addresses: IPv4-mapped and -compatible,
NAT64, 6to4, Teredo) and well-known metadata or local names. `check_url` runs at
submit; `resolve_target` runs again at every send on the addresses the name resolves to now,
and the POST connects to the checked address itself (Host header and TLS SNI keep the name),
so a name that resolves elsewhere a second time (DNS rebinding) gains nothing. Sites whose
LIS is on a private network list its networks in `MS_GATEWAY_WEBHOOK_ALLOW_CIDRS`
(`MS_GATEWAY_ALLOW_PRIVATE_WEBHOOKS=true` allows every non-public address: tests and
development only). URLs in logs are reduced to scheme://host (`redact_url`), httpx's
request log line included.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

BLOCKED_NAMES = frozenset(
    {"localhost", "metadata", "metadata.google.internal", "metadata.goog", "instance-data"}
)
"""Names that reach the machine itself or a cloud metadata service without public DNS."""
BLOCKED_SUFFIXES = (".localhost", ".internal", ".local")


class WebhookRefused(ValueError):
    """The webhook destination is not allowed; the message says why (no secrets in it)."""


_URL = re.compile(r"(?i)\b(https?)://([^\s/?#\"']+)[^\s\"']*")


def redact_url(text: str) -> str:
    """Every URL in `text` reduced to scheme://host[:port]: no userinfo, path or query (they
    can carry credentials or patient identifiers)."""

    def one(m: re.Match) -> str:
        host = m.group(2).rsplit("@", 1)[-1]
        return f"{m.group(1)}://{host}"

    return _URL.sub(one, text)


class RedactUrls(logging.Filter):
    """Logging filter: URLs in the message and its arguments pass through `redact_url`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            record.args = tuple(redact_url(str(a)) if ("://" in str(a)) else a for a in args)
        if isinstance(record.msg, str) and "://" in record.msg:
            record.msg = redact_url(record.msg)
        return True


def install_log_redaction() -> None:
    """Redact URLs in httpx's and httpcore's request logs (idempotent)."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactUrls) for f in logger.filters):
            logger.addFilter(RedactUrls())


def _address(host: str) -> IpAddress | None:
    """The IP address `host` spells, in any form the resolver accepts (127.1, 2130706433,
    0x7f000001, [::1]); None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"(?i)[0-9a-fx.]+", host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


NAT64_PREFIXES = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # RFC 6052 well-known prefix
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # RFC 8215 local-use prefix
)
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: IpAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries to a v4 host: IPv4-mapped, IPv4-compatible,
    NAT64 (a translator on the path connects to the v4 address), 6to4 and Teredo (server and
    client). A probe reached 169.254.169.254 as [64:ff9b::a9fe:a9fe]: such an address is only
    as public as the v4 address inside it."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ()
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return (ip.ipv4_mapped,)
    if ip.sixtofour is not None:
        return (ip.sixtofour,)
    if ip.teredo is not None:
        return ip.teredo
    if any(ip in net for net in NAT64_PREFIXES):
        return (low32,)
    if ip in IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are not v4 addresses
        return (low32,)
    return ()


def _public(ip: IpAddress) -> bool:
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class WebhookPolicy:
    """Which destinations webhooks may reach: public addresses, plus `allow` networks."""

    allow: tuple[IpNetwork, ...] = ()
    allow_private: bool = False
    resolve: Callable[[str, int], Awaitable[list[str]]] | None = field(default=None, compare=False)
    """Resolver (host, port) -> addresses; default the event loop's getaddrinfo."""

    @classmethod
    def from_settings(cls, settings) -> WebhookPolicy:
        return cls(
            allow=parse_cidrs(settings.webhook_allow_cidrs),
            allow_private=settings.allow_private_webhooks,
        )

    def allowed(self, ip: IpAddress) -> bool:
        if any(ip in net for net in self.allow):
            return True
        inner = embedded_ipv4(ip)
        if inner:  # the v4 host decides, whichever v6 spelling reaches it
            return all(self.allowed(v4) for v4 in inner)
        return self.allow_private or _public(ip)

    def check_url(self, url: str) -> tuple[str, str, int]:
        """(scheme, host, port) of an acceptable URL; WebhookRefused otherwise. No DNS."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise WebhookRefused(f"webhook_url must be http or https, not {scheme or 'none'!r}")
        if parts.username is not None or parts.password is not None:
            raise WebhookRefused(
                "webhook_url must not carry credentials (user:password@); webhooks are "
                "authenticated by their HMAC signature"
            )
        host = (parts.hostname or "").rstrip(".").lower()
        if not host:
            raise WebhookRefused("webhook_url has no host")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise WebhookRefused("webhook_url has an invalid port") from None
        ip = _address(host)
        if ip is not None:
            if not self.allowed(ip):
                raise WebhookRefused(
                    f"webhook_url points at a non-public address ({ip}); private, loopback, "
                    "link-local and metadata destinations are refused unless listed in "
                    "MS_GATEWAY_WEBHOOK_ALLOW_CIDRS"
                )
        elif not self.allow_private and (host in BLOCKED_NAMES or host.endswith(BLOCKED_SUFFIXES)):
            raise WebhookRefused(
                f"webhook_url host {host!r} is a local or metadata name and is refused"
            )
        return scheme, host, port

    async def resolve_target(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, address to connect to): the URL checked again and its host
        resolved now, every address checked (a mix of public and private answers is a
        rebinding attempt and refused)."""
        scheme, host, port = self.check_url(url)
        ip = _address(host)
        if ip is not None:
            return scheme, host, port, str(ip)
        if self.resolve is not None:
            found = await self.resolve(host, port)
        else:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
            found = [info[4][0] for info in infos]
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
        if not addresses:
            raise WebhookRefused(f"webhook host {host!r} does not resolve")
        refused = [a for a in addresses if not self.allowed(a)]
        if refused:
            raise WebhookRefused(
                f"webhook host {host!r} resolves to a non-public address ({refused[0]}); "
                "refused unless listed in MS_GATEWAY_WEBHOOK_ALLOW_CIDRS"
            )
        return scheme, host, port, str(addresses[0])


def parse_cidrs(text: str | Iterable[str]) -> tuple[IpNetwork, ...]:
    """`10.20.0.0/16, 192.168.7.12` -> networks; ValueError names a bad entry."""
    items = text.split(",") if isinstance(text, str) else list(text)
    nets = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {item!r} (want e.g. 10.20.0.0/16)") from None
    return tuple(nets)


SIGNATURE_HEADER = "X-MarrowScope-Signature"
TIMESTAMP_HEADER = "X-MarrowScope-Timestamp"
EVENT_HEADER = "X-MarrowScope-Event-Id"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float = 300.0
) -> bool:
    """Receiver-side check (also used by the tests)."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def backoff_s(attempts: int, *, base: float, cap: float) -> float:
    """Delay before the next try after `attempts` failed ones."""
    return min(cap, base * (2 ** max(0, attempts - 1)))


def _pinned_url(url: str, address: str) -> str:
    """`url` with its host replaced by the checked address (the connection goes there)."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def deliver(
    client,
    *,
    url: str,
    body: bytes,
    event_id: str,
    secret: str,
    timeout: float,
    policy: WebhookPolicy | None = None,
) -> tuple[bool, str | None]:
    """One attempt to a destination `policy` allows (default: public addresses only);
    returns (delivered, error). The error never contains the URL's path, query or userinfo."""
    import httpx

    install_log_redaction()
    policy = policy or WebhookPolicy()
    try:
        scheme, host, port, address = await policy.resolve_target(url)
    except WebhookRefused as exc:
        return False, f"refused: {exc}"
    except (OSError, ValueError) as exc:
        return False, redact_url(f"cannot resolve the webhook host: {exc}")
    ts = int(time.time())
    default_port = 443 if scheme == "https" else 80
    headers = {
        "Host": host if port == default_port else f"{host}:{port}",
        "Content-Type": "application/json",
        EVENT_HEADER: event_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body),
    }
    try:
        resp = await client.post(
            _pinned_url(url, address),
            content=body,
            headers=headers,
            timeout=timeout,
            extensions={"sni_hostname": host} if scheme == "https" else None,
        )
    except httpx.HTTPError as exc:
        return False, redact_url(f"{type(exc).__name__}: {exc}")
    if 200 <= resp.status_code < 300:
        return True, None
    return False, f"HTTP {resp.status_code}"
