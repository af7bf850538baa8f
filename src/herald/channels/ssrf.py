"""Webhook target safety: refuse URLs that reach this host, private networks or cloud metadata.

Three layers, because each alone has a gap:

- ``check_url(url, allow=…)`` (``resolve=True``) when an endpoint is registered, so its owner
  gets a clear 422 naming the URL;
- ``check_url(url, allow=…, resolve=False)`` before every request, because aiohttp never asks
  the resolver about IP-literal hosts;
- ``GuardedResolver`` inside the HTTP connector, so the address that was checked is the address
  connected to: a name that resolved to a public address at registration and to 10.0.0.5 now
  (DNS rebinding) is still refused.

An address is blocked unless it is globally routable unicast; operators may allow networks
(``HERALD_WEBHOOK__ALLOW_NETWORKS``), e.g. ``127.0.0.0/8`` for tests or ``10.0.0.0/8`` for a
receiver on the internal network. Refusals never say which address a name resolved to: that
would map the internal network for whoever registers endpoints.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import re
import socket
from collections.abc import Sequence
from typing import TypeAlias

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from herald.errors import ConfigError, UnsafeUrlError

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_BLOCKED_NETWORKS: tuple[Network, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8",  # "this network"; 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # carrier-grade NAT (RFC 6598)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, incl. the cloud metadata service 169.254.169.254
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. the broadcast address 255.255.255.255
        "2001::/23",  # IETF protocol assignments: Teredo 2001::/32 (hides its IPv4 client), ORCHID, …
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation (RFC 9637)
        "fc00::/7",  # unique local (private)
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
# Only 2000::/3 is allocated for global unicast; everything else in IPv6 (ULA, link-local,
# multicast, NAT64 local use, SRv6, discard, …) is refused unless it merely carries an IPv4.
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
# IPv6 spellings of an IPv4 destination; such an address is exactly as safe as the IPv4 it carries.
_IPV4_CARRIERS: tuple[ipaddress.IPv6Network, ...] = (
    ipaddress.IPv6Network("::ffff:0:0/96"),  # IPv4-mapped
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (deprecated); also :: and ::1
    ipaddress.IPv6Network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
    ipaddress.IPv6Network("64:ff9b::/96"),  # NAT64 well-known prefix
)

_LOOPBACK: tuple[Address, ...] = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))
_METADATA: tuple[Address, ...] = (ipaddress.IPv4Address("169.254.169.254"),)
# Names that mean this host or a cloud metadata service whatever DNS says; each is judged by the
# addresses it stands for, so an operator who allows those networks may use the name too.
_SPECIAL_NAMES: dict[str, tuple[Address, ...]] = {
    "localhost": _LOOPBACK,
    "localhost.localdomain": _LOOPBACK,
    "ip6-localhost": _LOOPBACK[1:],
    "ip6-loopback": _LOOPBACK[1:],
    "metadata": _METADATA,
    "metadata.google.internal": _METADATA,
    "instance-data": _METADATA,
}

# Hosts made only of these may be a legacy IPv4 spelling (2130706433, 0x7f.1, 0177.0.0.1, 127.1).
_NUMERIC_HOST = re.compile(r"[0-9a-fx.]+")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_SHOWN_CHARS = 200


def parse_allow(networks: Sequence[str]) -> list[Network]:
    """The operator's allow-list as networks; host bits are ignored (``10.1.2.3/8`` = ``10.0.0.0/8``)."""
    parsed: list[Network] = []
    for net in networks:
        try:
            parsed.append(ipaddress.ip_network(net, strict=False))
        except ValueError as exc:
            raise ConfigError(f"HERALD_WEBHOOK__ALLOW_NETWORKS: not a network, got {net!r}") from exc
    return parsed


def is_blocked(ip: Address, allow: Sequence[Network]) -> bool:
    """Whether a connection to ``ip`` must be refused: not global unicast and not in ``allow``.

    IPv6 addresses that carry an IPv4 (mapped, compatible, NAT64) are judged by that IPv4;
    6to4 addresses are refused when the IPv4 they embed is. Answers are cached: the check runs
    before every request and ``is_global`` walks the IANA tables (about 0.2 ms a call).
    """
    return _is_blocked(ip, tuple(allow))


@functools.lru_cache(maxsize=4096)
def _is_blocked(ip: Address, allow: tuple[Network, ...]) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        ip = ipaddress.IPv6Address(int(ip))  # a zone id does not change where the address leads
    if any(ip in net for net in allow if net.version == ip.version):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _IPV4_CARRIERS):
            return _is_blocked(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), allow)
        if ip.sixtofour is not None and _is_blocked(ip.sixtofour, allow):
            return True
        if ip not in _IPV6_GLOBAL_UNICAST:
            return True
    # ``is_global`` adds whatever this Python's copy of the IANA registries also calls non-global.
    return any(ip in net for net in _BLOCKED_NETWORKS) or not ip.is_global


def check_url(url: str, *, allow: Sequence[Network], resolve: bool = True) -> None:
    """Raise ``UnsafeUrlError`` (field ``url``) unless ``url`` is an http(s) URL of a public host.

    Refuses credentials in the URL, IP-literal hosts in any spelling (decimal, octal, hex,
    shortened IPv4; IPv6 with zone ids or an embedded IPv4) outside public unicast, and names
    of this host or of metadata services (``localhost`` counts as 127.0.0.1 and ::1, so allowing
    it takes both networks). With ``resolve`` the host is looked up with the blocking
    ``socket.getaddrinfo`` (run it in a thread from async code) and refused if it does not
    resolve or if ANY of its addresses is blocked.
    """
    try:
        parsed = URL(url)
    except (TypeError, ValueError) as exc:
        raise _refusal("is not a valid URL", url) from exc
    if parsed.scheme not in ("http", "https"):
        raise _refusal("must be http(s)", url)
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise _refusal("must not contain credentials", _without_credentials(parsed))
    host = (parsed.raw_host or "").rstrip(".")  # "127.0.0.1." is still 127.0.0.1
    if not host:
        raise _refusal("has no host", url)
    address = _ip_literal(host, url)
    if address is not None:
        if is_blocked(address, allow):
            raise _refusal("host is not a public address", url)
        return
    if not _NAME.fullmatch(host):
        raise _refusal("host is not a valid name", url)
    special = _SPECIAL_NAMES.get(host, _LOOPBACK if host.endswith(".localhost") else None)
    if special is not None and any(is_blocked(ip, allow) for ip in special):
        raise _refusal("host names this machine or a metadata service", url)
    if resolve:
        _check_resolved(host, parsed.port, allow, url)


class BlockedAddressError(OSError):
    """Every address a name resolved to is blocked. An ``OSError`` because that is what aiohttp
    expects from a resolver: it arrives wrapped as ``ClientConnectorDNSError.os_error``."""


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that only returns addresses ``is_blocked`` lets through.

    Blocked addresses are dropped, so the connector can only ever connect to vetted ones; if
    none is left, ``BlockedAddressError`` fails the connection. Build it inside a running loop
    (aiohttp's resolvers bind to it). ``close()`` closes the wrapped resolver, and a connector
    handed a resolver does not close it, so its owner must.
    """

    def __init__(self, *, allow: Sequence[Network], resolver: AbstractResolver | None = None) -> None:
        self._allow = list(allow)
        self._resolver = resolver if resolver is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        allowed = [result for result in results if not _is_blocked_text(result["host"], self._allow)]
        if not allowed:
            raise BlockedAddressError(errno.EACCES, "host resolves only to refused (non-public) addresses")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()


def _ip_literal(host: str, url: str) -> Address | None:
    """The address ``host`` spells, in any form the C library accepts, or None for a name."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError as exc:
            raise _refusal("host is not a valid IP address", url) from exc
    if _NUMERIC_HOST.fullmatch(host):
        # inet_aton is the parser getaddrinfo uses for numeric hosts, legacy forms included;
        # what it rejects ("cafe.be", "1.2.3.4.5") is not an address to the resolver either.
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _check_resolved(host: str, port: int | None, allow: Sequence[Network], url: str) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _refusal("host does not resolve", url) from exc
    if not infos or any(_is_blocked_text(str(info[4][0]), allow) for info in infos):
        raise _refusal("host resolves to a non-public address", url)


def _is_blocked_text(text: str, allow: Sequence[Network]) -> bool:
    try:
        return is_blocked(ipaddress.ip_address(text), allow)
    except ValueError:
        return True  # a resolver answer we cannot read is not one we can vouch for


def _without_credentials(parsed: URL) -> str:
    return str(parsed.with_user(None)).replace("://", "://***@", 1)


def _refusal(problem: str, shown: str) -> UnsafeUrlError:
    if len(shown) > _SHOWN_CHARS:
        shown = shown[: _SHOWN_CHARS - 1] + "…"
    return UnsafeUrlError(f"url: {problem}, got {shown!r}", field="url")
