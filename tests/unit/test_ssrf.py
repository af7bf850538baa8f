"""The SSRF guard: which webhook targets are refused, in every spelling, and the resolver wrapper."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given

from herald.channels import ssrf
from herald.channels.ssrf import BlockedAddressError, GuardedResolver, check_url, is_blocked, parse_allow
from herald.errors import ConfigError, UnsafeUrlError
from tests.strategies import ipv4_in, legacy_ipv4_spellings

NO_ALLOW: list[ssrf.Network] = []


def refusal(url: str, *, allow: Sequence[ssrf.Network] = NO_ALLOW, resolve: bool = False) -> UnsafeUrlError:
    with pytest.raises(UnsafeUrlError) as info:
        check_url(url, allow=allow, resolve=resolve)
    return info.value


@pytest.mark.parametrize(
    "url",
    [
        # loopback, every spelling
        "http://127.0.0.1/",
        "http://127.0.0.1:8080/hook",
        "http://127.0.0.1./",
        "http://127.1/",
        "http://127.0.1/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http://017700000001/",
        "http://0177.0.0.1/",
        "http://0x7f.0.0.1/",
        "http://0X7F.0x0.0.01/",
        "http://0x7f.1/",
        "http://127.000.000.001/",
        "http://%31%32%37.0.0.1/",
        "http://１２７.0.0.1/",  # noqa: RUF001 - fullwidth digits, which IDNA maps to ASCII
        "http://[::1]/",
        "http://[0:0:0:0:0:0:0:1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:7f00:1]/",
        "http://[0:0:0:0:0:ffff:7f00:1]/",
        "http://[::127.0.0.1]/",
        "http://[::ffff:0:127.0.0.1]/",
        "http://[64:ff9b::127.0.0.1]/",
        "http://[2002:7f00:1::1]/",  # 6to4 around 127.0.0.1
        # unspecified and "this network"
        "http://0.0.0.0/",
        "http://0/",
        "http://0.1.2.3/",
        "http://[::]/",
        # private
        "http://10.0.0.1/",
        "http://10.255.255.255/",
        "http://167772161/",
        "http://172.16.0.1/",
        "http://172.31.255.254/",
        "http://192.168.1.1/",
        "http://0xc0a80101/",
        "http://[fc00::1]/",
        "http://[fd12:3456:789a::1]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[64:ff9b::a00:1]/",
        "http://[2002:a00:1::]/",
        # link-local and cloud metadata
        "http://169.254.169.254/latest/meta-data/",
        "http://2852039166/",
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://0251.0376.0251.0376/",
        "http://169.254.43518/",
        "http://[fe80::1]/",
        "http://[fe80::1%25eth0]/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        # carrier-grade NAT
        "http://100.64.0.1/",
        "http://100.127.255.254/",
        # multicast, broadcast, reserved
        "http://224.0.0.1/",
        "http://239.255.255.250/",
        "http://255.255.255.255/",
        "http://4294967295/",
        "http://240.0.0.1/",
        "http://[ff02::1]/",
        "http://[ff0e::1]/",
        # documentation, benchmarking, protocol assignments
        "http://192.0.2.1/",
        "http://198.51.100.7/",
        "http://203.0.113.9/",
        "http://198.18.0.1/",
        "http://198.19.255.255/",
        "http://192.0.0.8/",
        "http://192.88.99.1/",
        "http://[2001:db8::1]/",
        "http://[3fff::1]/",
        "http://[100::1]/",
        "http://[fec0::1]/",
        "http://[64:ff9b:1::a00:1]/",
        "http://[5f00::1]/",
        # Teredo (embeds 127.0.0.1 as server, obfuscated client)
        "http://[2001:0:7f00:1::ffff:fffe]/",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",
        # names of this machine and of metadata services
        "http://localhost/",
        "http://LOCALHOST./",
        "http://localhost:9000/",
        "http://ｌｏｃａｌｈｏｓｔ/",  # noqa: RUF001 - fullwidth letters, which IDNA maps to ASCII
        "http://api.localhost/",
        "http://a.b.localhost/",
        "http://localhost.localdomain/",
        "http://ip6-localhost/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://metadata/",
        "http://instance-data/",
        "https://127.0.0.1/",
    ],
)
def test_non_public_targets_are_refused(url: str) -> None:
    error = refusal(url)

    assert error.field == "url"
    assert error.message.startswith("url: ")
    assert ", got '" in error.message


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/", "must be http(s)"),
        ("file:///etc/passwd", "must be http(s)"),
        ("gopher://example.com:70/", "must be http(s)"),
        ("javascript:alert(1)", "must be http(s)"),
        ("example.com/hook", "must be http(s)"),
        ("", "must be http(s)"),
        ("http:///hook", "has no host"),
        ("http:example.com", "has no host"),
        ("http://./", "has no host"),
        ("http://[::1/", "is not a valid URL"),
        ("http://example.com:99999/", "is not a valid URL"),
        ("http://evil.example\\@127.0.0.1/", "is not a valid URL"),
        ("http://user:pw@example.com/", "must not contain credentials"),
        ("http://user@example.com/", "must not contain credentials"),
        ("http://:pw@example.com/", "must not contain credentials"),
        ("http://a@b@127.0.0.1/", "must not contain credentials"),
        ("http://[::ffff:0177.0.0.1]/", "host is not a valid IP address"),
        ("http://exa mple.com/", "host is not a valid name"),
        ("http://a..b/", "host is not a valid name"),
    ],
)
def test_malformed_urls_are_refused(url: str, problem: str) -> None:
    assert refusal(url).message.startswith(f"url: {problem}, got '")


def test_credentials_are_not_echoed() -> None:
    message = refusal("https://admin:hunter2@example.com/hook").message

    assert "hunter2" not in message
    assert "admin" not in message
    assert message == "url: must not contain credentials, got 'https://***@example.com/hook'"


def test_long_urls_are_cut_in_the_message() -> None:
    message = refusal("ftp://example.com/" + "a" * 1000).message

    assert len(message) < 300


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/",
        "https://93.184.216.34:8443/hook?x=1",
        "http://1572395042/",  # 93.184.216.34 as one decimal number is still public
        "http://8.8.8.8/",
        "http://[2606:4700::1]/",
        "https://[2606:4700:4700::1111]:443/",
        "http://[::ffff:93.184.216.34]/",
        "http://[64:ff9b::5db8:d822]/",  # NAT64 of 93.184.216.34
        "http://[2002:5db8:d822::1]/",  # 6to4 of 93.184.216.34
        "https://hooks.example.com/herald",
        "https://cafe.be/",  # hex letters only, but a name
        "https://under_score.example.com/",
        "https://bücher.example/",
    ],
)
def test_public_targets_are_allowed(url: str) -> None:
    check_url(url, allow=NO_ALLOW, resolve=False)


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://127.0.0.1:8080/", ["127.0.0.0/8"]),
        ("http://127.1/", ["127.0.0.0/8"]),
        ("http://[::ffff:127.0.0.1]/", ["127.0.0.0/8"]),
        ("http://10.1.2.3/", ["10.0.0.0/8"]),
        ("http://10.1.2.3/", ["10.1.2.3/32"]),
        ("http://[fd00::5]/", ["fd00::/8"]),
        ("http://[::1]/", ["::1/128"]),
        ("http://localhost/", ["127.0.0.0/8", "::1/128"]),
        ("http://metadata.google.internal/", ["169.254.169.254/32"]),
    ],
)
def test_allow_list_permits_operator_networks(url: str, allow: list[str]) -> None:
    check_url(url, allow=parse_allow(allow), resolve=False)


@pytest.mark.parametrize(
    ("url", "allow"),
    [
        ("http://10.1.2.3/", ["127.0.0.0/8"]),
        ("http://localhost/", ["127.0.0.0/8"]),  # ::1 is not allowed
        ("http://169.254.169.254/", ["10.0.0.0/8"]),
        ("http://[::1]/", ["127.0.0.0/8"]),
        ("http://[fe80::1]/", ["10.0.0.0/8"]),
    ],
)
def test_allow_list_permits_nothing_else(url: str, allow: list[str]) -> None:
    refusal(url, allow=parse_allow(allow))


def test_parse_allow_ignores_host_bits_and_refuses_garbage() -> None:
    assert parse_allow(["10.1.2.3/8", "::1"]) == [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    with pytest.raises(ConfigError, match="ALLOW_NETWORKS: not a network, got 'nope'"):
        parse_allow(["nope"])


@given(address=ipv4_in(["127.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10"]).flatmap(legacy_ipv4_spellings))
def test_every_legacy_spelling_of_a_blocked_ipv4_is_refused(address: str) -> None:
    refusal(f"http://{address}/")


@given(ip=ipv4_in(["127.0.0.0/8", "10.0.0.0/8", "169.254.0.0/16", "100.64.0.0/10", "192.168.0.0/16"]))
def test_ipv6_spellings_of_a_blocked_ipv4_are_refused(ip: ipaddress.IPv4Address) -> None:
    refusal(f"http://[::ffff:{ip}]/")
    refusal(f"http://[::ffff:{int(ip) >> 16:x}:{int(ip) & 0xFFFF:x}]/")
    refusal(f"http://[64:ff9b::{ip}]/")


@given(ip=ipv4_in(["127.0.0.0/8", "10.0.0.0/8"]).flatmap(legacy_ipv4_spellings))
def test_allowed_networks_hold_in_every_spelling(ip: str) -> None:
    check_url(f"http://{ip}/", allow=parse_allow(["127.0.0.0/8", "10.0.0.0/8"]), resolve=False)


@pytest.mark.parametrize(
    ("address", "blocked"),
    [
        ("127.0.0.1", True),
        ("93.184.216.34", False),
        ("fe80::1%eth0", True),
        ("2606:4700::1", False),
        ("::ffff:93.184.216.34", False),
        ("::ffff:10.0.0.1", True),
        ("2002:a00:1::", True),
    ],
)
def test_is_blocked(address: str, blocked: bool) -> None:
    assert is_blocked(ipaddress.ip_address(address), NO_ALLOW) is blocked


# -- with name resolution -------------------------------------------------------------------


def fake_getaddrinfo(answers: dict[str, list[str]]) -> Any:
    def getaddrinfo(host: str, port: int | None, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port or 0))
            for ip in answers[host]
        ]

    return getaddrinfo


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        fake_getaddrinfo(
            {
                "public.example": ["93.184.216.34", "2606:4700::1"],
                "rebind.example": ["93.184.216.34", "10.0.0.5"],
                "internal.example": ["10.0.0.5"],
                "meta.example": ["169.254.169.254"],
                "v6local.example": ["fe80::1%eth0"],
            }
        ),
    )


@pytest.mark.usefixtures("dns")
def test_a_name_with_only_public_addresses_passes() -> None:
    check_url("https://public.example/hook", allow=NO_ALLOW)


@pytest.mark.usefixtures("dns")
@pytest.mark.parametrize("host", ["rebind.example", "internal.example", "meta.example", "v6local.example"])
def test_a_name_with_any_blocked_address_is_refused_without_naming_it(host: str) -> None:
    message = refusal(f"https://{host}/hook", resolve=True).message

    assert message == f"url: host resolves to a non-public address, got 'https://{host}/hook'"


@pytest.mark.usefixtures("dns")
def test_a_name_that_does_not_resolve_is_refused() -> None:
    assert "does not resolve" in refusal("https://nowhere.example/", resolve=True).message


@pytest.mark.usefixtures("dns")
def test_allowed_networks_apply_to_resolved_names() -> None:
    check_url("https://internal.example/", allow=parse_allow(["10.0.0.0/8"]))


def test_localhost_is_refused_with_real_resolution() -> None:
    refusal("http://localhost:8080/", resolve=True)
    check_url("http://localhost:8080/", allow=parse_allow(["127.0.0.0/8", "::1/128"]), resolve=True)


# -- the resolver guard ---------------------------------------------------------------------


class FakeResolver(AbstractResolver):
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0)
            for ip in self.answers[host]
        ]

    async def close(self) -> None:
        self.closed = True


def guarded_resolve(answers: list[str], allow: Sequence[str] = ()) -> list[str]:
    async def scenario() -> list[str]:
        inner = FakeResolver({"hook.example": answers})
        guard = GuardedResolver(allow=parse_allow(allow), resolver=inner)
        try:
            return [result["host"] for result in await guard.resolve("hook.example", 443)]
        finally:
            await guard.close()
            assert inner.closed

    return asyncio.run(scenario())


def test_resolver_passes_public_addresses() -> None:
    assert guarded_resolve(["93.184.216.34", "2606:4700::1"]) == ["93.184.216.34", "2606:4700::1"]


def test_resolver_drops_blocked_addresses() -> None:
    assert guarded_resolve(["10.0.0.5", "93.184.216.34", "::1"]) == ["93.184.216.34"]


@pytest.mark.parametrize("answers", [["127.0.0.1"], ["10.0.0.5", "169.254.169.254", "fe80::1%eth0"], ["garbage"]])
def test_resolver_refuses_when_nothing_is_left(answers: list[str]) -> None:
    with pytest.raises(BlockedAddressError) as info:
        guarded_resolve(answers)

    assert isinstance(info.value, OSError)
    for answer in answers:
        assert answer not in str(info.value)


def test_resolver_honours_the_allow_list() -> None:
    assert guarded_resolve(["127.0.0.1"], allow=["127.0.0.0/8"]) == ["127.0.0.1"]
