"""The outbound-URL ("egress") policy: where the gateway may send a request.

Every URL a person can store and the gateway later calls (a budget's webhook, a provider's base
URL) goes through this module twice: when it is saved (``validate_url``, a clear error for the
person saving it) and when the request is made (``send`` for webhooks; ``vet_addresses`` from the
upstream client's connection hook in ``gateway.http``), because DNS can change in between.

The rules (docs/security.md):

- ``https`` only in production; ``http`` too in dev mode (``CHITTYCAN_MODE=dev``) or to a
  destination the operator allowlists.
- No loopback, private (RFC 1918, ULA), link-local, CGNAT, multicast, unspecified, reserved or
  cloud-metadata address, checked on the addresses the name resolves to (with the ``ipaddress``
  module, after ``getaddrinfo``: decimal, octal and IPv4-mapped IPv6 spellings land on the same
  address), in any mode, unless ``CHITTYCAN_EGRESS_ALLOW`` (comma-separated host names, addresses
  and CIDRs) names the host or the address.
- The request connects to the address that was checked (pinned), with the ``Host`` header and
  the TLS SNI still the host name, so a DNS answer that changes between check and connect cannot
  redirect it; redirects are never followed.
- Errors that reach a stored field are one of a few generic classes (``failure_class``), never
  the response body or the socket error, so they cannot be used to map ports.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings
from django.core.exceptions import ValidationError

__all__ = [
    "BLOCKED",
    "EgressBlocked",
    "Policy",
    "Resolver",
    "Target",
    "check_url",
    "failure_class",
    "policy",
    "send",
    "system_resolver",
    "use_resolver",
    "validate_url",
    "vet_addresses",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What a stored error says when the policy refused the destination.
BLOCKED = "blocked by egress policy"

#: Cloud metadata names, refused before any lookup (their addresses are link-local or ULA and so
#: refused anyway; the names are refused too in case a resolver maps them elsewhere).
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.internal",
        "instance-data",
        "instance-data.ec2.internal",
    }
)

#: Networks that embed an IPv4 address in an IPv6 one: the embedded address is checked too.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

#: ``(host, port) -> addresses``: resolves a host name (or an address literal) to addresses.
Resolver = Callable[[str, int], list[str]]


class EgressBlocked(OSError):
    """The destination is refused by the egress policy.

    An ``OSError`` so that HTTP clients (aiohttp's connector, httpcore's network backend) treat it
    like any other failure to connect: the upstream call fails over or ends in a clear 502, never
    in a 500.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"{BLOCKED}: {reason}")
        self.reason = reason


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``host`` (an empty list when it does not resolve).

    Like aiohttp's own resolver, only address families this machine has an address of
    (``AI_ADDRCONFIG``), falling back to all of them (a literal ``::1`` on an IPv4-only host)."""
    for flags in (socket.AI_ADDRCONFIG, 0):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
        except (socket.gaierror, UnicodeError):
            continue
        if infos:
            return list(dict.fromkeys(str(info[4][0]) for info in infos))
    return []


_resolver: Resolver = system_resolver


@contextlib.contextmanager
def use_resolver(resolver: Resolver) -> Iterator[None]:
    """Resolve with ``resolver`` while the block runs (tests simulate DNS answers with it)."""
    global _resolver
    previous, _resolver = _resolver, resolver
    try:
        yield
    finally:
        _resolver = previous


def resolve(host: str, port: int) -> list[str]:
    """The current resolver's answer for ``host``."""
    return _resolver(host, port)


@dataclass(frozen=True)
class Policy:
    allow_hosts: frozenset[str]
    allow_nets: tuple[IPNetwork, ...]
    http_allowed: bool

    @classmethod
    def parse(cls, allow: str, *, mode: str) -> Policy:
        """From ``CHITTYCAN_EGRESS_ALLOW`` (``host, address, CIDR, ...``) and ``CHITTYCAN_MODE``."""
        hosts: set[str] = set()
        nets: list[IPNetwork] = []
        for raw in allow.split(","):
            item = raw.strip().lower()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                hosts.add(item.rstrip("."))
        return cls(allow_hosts=frozenset(hosts), allow_nets=tuple(nets), http_allowed=mode == "dev")

    def host_allowed(self, host: str) -> bool:
        return _normal_host(host) in self.allow_hosts

    def address_allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allow_nets)

    def destination_allowed(self, host: str) -> bool:
        """The operator named this host, or the address literal it is."""
        if self.host_allowed(host):
            return True
        address = _literal(host)
        return address is not None and self.address_allowed(address)


_policy: tuple[tuple[str, str, str], Policy] | None = None


def policy() -> Policy:
    """The policy of the current settings (rebuilt when they change, e.g. in tests)."""
    global _policy
    key = (settings.CHITTYCAN_EGRESS_ALLOW, settings.CHITTYCAN_MODE, settings.OLLAMA_BASE_URL)
    cached = _policy
    if cached is not None and cached[0] == key:
        return cached[1]
    allow = settings.CHITTYCAN_EGRESS_ALLOW
    # The dev-mode Ollama is the operator's own setting, not a stored row: its host is allowed.
    try:
        ollama = httpx.URL(settings.OLLAMA_BASE_URL).host if settings.OLLAMA_BASE_URL else ""
    except httpx.InvalidURL:
        ollama = ""
    found = Policy.parse(f"{allow},{ollama}", mode=settings.CHITTYCAN_MODE)
    _policy = (key, found)
    return found


def _normal_host(host: str) -> str:
    return host.strip("[]").lower().rstrip(".")


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _forbidden(address: IPAddress) -> bool:
    """Loopback, private, ULA, link-local (metadata), CGNAT, multicast, unspecified, reserved."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_v4(address)
        if inner is not None and _forbidden(inner):
            return True
        if address.scope_id:
            return True  # fe80::1%eth0 and the like
    return (
        not address.is_global
        or address.is_multicast
        or address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_reserved
        or address.is_unspecified
    )


def vet_addresses(host: str, addresses: Iterable[str], found: Policy | None = None) -> list[str]:
    """``addresses`` (what ``host`` resolved to) if every one may be reached, else ``EgressBlocked``.

    An allowlisted host name passes whatever it resolves to; otherwise each address must be public
    or inside an allowlisted network. One forbidden answer refuses them all (a name that also
    resolves to an internal address is not trusted with the others)."""
    found = found or policy()
    out = list(addresses)
    if not out:
        raise EgressBlocked("the host does not resolve")
    if found.host_allowed(host):
        return out
    for text in out:
        address = _literal(text)
        if address is None:
            raise EgressBlocked("an address that is not an IP address")
        if _forbidden(address) and not found.address_allowed(address):
            raise EgressBlocked("a loopback, private, link-local or metadata address")
    return out


@dataclass(frozen=True)
class Target:
    """A URL that passed the policy, with the addresses its host resolved to (to pin)."""

    url: httpx.URL
    host: str
    port: int
    addresses: list[str]


def _parse(url: str, found: Policy) -> tuple[httpx.URL, str, int]:
    """The URL's scheme and host checked (no lookup); ``EgressBlocked`` or ``ValueError``."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError("not a valid URL") from exc
    host = _normal_host(parsed.host)
    if parsed.scheme not in ("http", "https") or not host:
        raise ValueError("not an http(s) URL with a host")
    if parsed.scheme == "http" and not found.http_allowed and not found.destination_allowed(host):
        raise EgressBlocked("https is required (http only in dev mode or to an allowlisted host)")
    if (host in METADATA_HOSTS or host.endswith(".metadata.google.internal")) and not found.host_allowed(host):
        raise EgressBlocked("a cloud metadata host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed, host, port


def check_url(url: str, *, require_resolution: bool = True) -> Target:
    """Check ``url`` against the policy now, resolving its host. Raises ``EgressBlocked`` (refused)
    or ``ValueError`` (not an http(s) URL). With ``require_resolution=False`` a host that does not
    resolve passes (with no addresses): what saving does, as the send-time check runs anyway."""
    found = policy()
    parsed, host, port = _parse(url, found)
    addresses = resolve(host, port)
    if not addresses and not require_resolution:
        return Target(parsed, host, port, [])
    return Target(parsed, host, port, vet_addresses(host, addresses, found))


def validate_url(url: str) -> None:
    """For forms, serializers and services: a Django ``ValidationError`` naming what is wrong.

    A host that does not resolve now is accepted (the check runs again when the request is sent);
    one that resolves to a forbidden address, an http URL in production or a metadata host is not.
    """
    if not url:
        return
    try:
        check_url(url, require_resolution=False)
    except EgressBlocked as exc:
        raise ValidationError(
            "This URL is not allowed: %(reason)s. An operator can allow a destination with "
            "CHITTYCAN_EGRESS_ALLOW (docs/security.md).",
            code="egress",
            params={"reason": exc.reason},
        ) from None
    except ValueError as exc:
        raise ValidationError(
            "Enter a valid http(s) URL: %(reason)s.", code="invalid", params={"reason": str(exc)}
        ) from None


def failure_class(exc: BaseException | None = None, response: httpx.Response | None = None) -> str:
    """What a stored error may say about a failed delivery: a class, never details."""
    if response is not None:
        return f"HTTP {response.status_code}"
    if isinstance(exc, EgressBlocked):
        return BLOCKED
    if isinstance(exc, httpx.ConnectTimeout | httpx.ConnectError):
        return "connection failed"  # refused or unanswered alike: a closed port looks like a filtered one
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timed out"  # connected, then no answer in time
    if isinstance(exc, httpx.HTTPError | OSError):
        return "connection failed"
    if isinstance(exc, ValueError):
        return "invalid URL"
    return "failed"


def _host_header(url: httpx.URL) -> str:
    host = url.host if ":" not in url.host else f"[{url.host}]"
    return host if url.port is None else f"{host}:{url.port}"


def send(
    method: str,
    url: str,
    *,
    content: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Response:
    """Send one request under the policy, connected to a vetted address (pinned).

    The host is resolved and checked now; the connection goes to the checked address while the
    ``Host`` header and the TLS SNI (and certificate check) stay the host name. No redirect is
    followed, no proxy from the environment is used and the response body is not read. Raises
    ``EgressBlocked`` or ``ValueError`` when the policy refuses, ``httpx.HTTPError`` when no
    address answers."""
    target = check_url(url)
    sent_headers = {"Host": _host_header(target.url), **(headers or {})}
    extensions: dict[str, Any] = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    last: httpx.HTTPError | None = None
    with httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False, transport=transport) as client:
        for address in target.addresses:
            request = client.build_request(
                method,
                target.url.copy_with(host=address),
                content=content,
                headers=sent_headers,
                extensions=extensions,
            )
            try:
                response = client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last = exc  # the next address, if the name has several
                continue
            response.close()  # the body is never read: only the status counts
            return response
    assert last is not None
    raise last
