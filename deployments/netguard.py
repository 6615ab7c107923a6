"""Outbound HTTP on a user's behalf (input-image URLs, webhooks) without becoming a proxy into our
own network: the host is resolved once, every address it resolves to must be public (unless
private targets are allowed), and the connection goes to that checked address — a second DNS
answer cannot swap in an internal one. Redirects are followed by hand and checked the same way;
bodies are capped in bytes and the whole exchange in time."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx


class TargetRefused(ValueError):
    """The URL may not be fetched (scheme, address, size, time or HTTP status); the message says why."""

    def __init__(self, message: str, too_large: bool = False, transient: bool = False):
        super().__init__(message)
        self.too_large = too_large
        self.transient = transient  # may not hold a moment later (a DNS server that did not answer)


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Anything but a public unicast address: private, loopback, link-local (cloud metadata),
    shared (CGNAT), reserved, unspecified and multicast; IPv4-mapped IPv6 judged as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


MAX_HOST = 253  # DNS: a name of at most 253 characters, in labels of at most 63
MAX_LABEL = 63


def check_url(url: str) -> str:
    """The URL's host if it is an http(s) URL with a host that DNS could name; else TargetRefused
    saying what is wrong (no network access: for validating requests)."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port raises here
    except ValueError as e:
        raise TargetRefused(f"not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("only http and https URLs with a host are allowed")
    if parts.username or parts.password:
        raise TargetRefused("URLs with credentials are not allowed")
    host = parts.hostname
    try:
        ipaddress.ip_address(host.strip("[]"))
        return host
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise TargetRefused("the host is not a valid domain name (IDNA)") from None
    labels = ascii_host.rstrip(".").split(".")
    if len(ascii_host) > MAX_HOST or any(not 0 < len(label) <= MAX_LABEL for label in labels):
        raise TargetRefused(
            f"the host is not a valid domain name (at most {MAX_HOST} characters, labels of 1-{MAX_LABEL})"
        )
    return host


def resolve(url: str, allow_private: bool = False) -> tuple[str, str]:
    """(host, checked IP address) for an http(s) URL; TargetRefused when it may not be reached."""
    host = check_url(url)
    parts = urlsplit(url)
    try:
        infos = socket.getaddrinfo(
            host, parts.port or (443 if parts.scheme == "https" else 80), type=socket.SOCK_STREAM
        )
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:  # "temporary failure in name resolution": not an answer
            raise TargetRefused(f"cannot resolve host {host!r} now: {e.strerror}", transient=True) from None
        raise TargetRefused(f"cannot resolve host {host!r}") from None
    except (OSError, UnicodeError):
        raise TargetRefused(f"cannot resolve host {host!r}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise TargetRefused(f"cannot resolve host {host!r}")
    if not allow_private and any(_forbidden(ip) for ip in addresses):
        raise TargetRefused("must not point to a private, loopback or link-local address")
    return host, str(addresses[0])


def is_private_target(url: str) -> bool:
    """True when the URL may not be reached without allowing private targets."""
    try:
        resolve(url)
    except TargetRefused:
        return True
    return False


def pinned(url: str, allow_private: bool) -> tuple[str, dict, dict]:
    """(URL with the checked IP as host, Host header, httpx extensions keeping TLS on the name)."""
    host, ip = resolve(url, allow_private)
    parts = urlsplit(url)
    netloc = f"[{ip}]" if ":" in ip else ip
    if parts.port:
        netloc += f":{parts.port}"
    headers = {"Host": parts.netloc.rsplit("@", 1)[-1]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return urlunsplit(parts._replace(netloc=netloc)), headers, extensions


async def fetch(
    url: str, max_bytes: int, timeout_s: float, allow_private: bool = False, max_redirects: int = 3
) -> bytes:
    """GET `url` (following up to `max_redirects` checked redirects): the body, at most `max_bytes`."""

    async def go() -> bytes:
        target = url
        async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            for _ in range(max_redirects + 1):
                address, headers, extensions = await asyncio.to_thread(pinned, target, allow_private)  # DNS
                request = client.build_request("GET", address, headers=headers, extensions=extensions)
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        target = urljoin(target, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise TargetRefused(f"HTTP {response.status_code} from the URL")
                    length = response.headers.get("content-length", "")
                    if length.isdigit() and int(length) > max_bytes:
                        raise TargetRefused(f"larger than {max_bytes} bytes", too_large=True)
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise TargetRefused(f"larger than {max_bytes} bytes", too_large=True)
                    return bytes(body)
                finally:
                    await response.aclose()
        raise TargetRefused(f"more than {max_redirects} redirects")

    try:
        return await asyncio.wait_for(go(), timeout_s)
    except TimeoutError:
        raise TargetRefused(f"no complete answer within {timeout_s:g} s") from None
    except httpx.HTTPError as e:
        raise TargetRefused(f"cannot fetch: {type(e).__name__}") from None
