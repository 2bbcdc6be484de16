"""Which video sources a stream may read: the operator's source policy.

A client names a source; the service then reads it with the server's own network position and
file permissions. Without a policy that is a file reader (``/etc/passwd``) and a request
forger (``http://127.0.0.1:30000/flush_cache``) for anyone who can create a stream. The policy
decides, before anything is opened, and again before every reconnect:

- ``schemes``: URL schemes allowed for network sources (default rtsp, rtsps, http, https).
- ``hosts``: entries a network source's host must match: a host name or glob (``*``,
  ``*.cams.example.com``), an IP address or CIDR (``10.20.0.0/16``, ``[fd00::/8]``), each with
  an optional port (``127.0.0.1:8554``, ``cam.example.com:554``). The host name is resolved
  and *every* address must be allowed: a name entry allows public addresses only (plus the
  private networks 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7 with ``allow_private``);
  loopback, link-local (cloud metadata at 169.254.169.254), unspecified, multicast and other
  reserved addresses pass only through an explicit IP/CIDR entry. Default ``("*",)``: any host
  with public addresses.
- ``media_root``: local files (plain paths and ``file://`` URLs) must lie inside this folder
  after resolving symlinks (relative paths are relative to it); None (default) refuses every
  local file. A refused path answers the same whether or not it exists (no existence oracle);
  only inside the root does a missing file say so.

A refusal is a :class:`SourcePolicyError` (HTTP 400) naming the rule: ``url``, ``scheme``,
``host``, ``address`` or ``media_root``.

What the policy cannot see, and what the readers do about it (streaming.sources):

- HTTP redirects: ffmpeg would follow them to any host, so it is told not to
  (``max_redirects=0``); the service follows them itself, checking each hop against the policy.
- Playlists (HLS, DASH, concat) name further URLs ffmpeg would fetch unchecked: network sources
  are opened with ffmpeg protocol and demuxer whitelists that exclude them.
- DNS may answer differently between the check and ffmpeg's own lookup (rebinding); the check
  runs again before every (re)connect, which narrows but does not close that window. ffmpeg's
  RTSP client follows RTSP 3xx redirects at DESCRIBE without asking; only an egress firewall
  closes those two gaps fully (see the README's deployment section).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import unquote, urljoin, urlsplit

from .sources import BadSourceError, SourceSpec, sanitize_url

__all__ = [
    "SourcePolicy",
    "SourcePolicyError",
    "HostEntry",
    "NETWORK_SCHEMES",
    "DEFAULT_SCHEMES",
    "RULES",
    "follow_redirects",
]

NETWORK_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")
DEFAULT_SCHEMES = ("rtsp", "rtsps", "http", "https")
DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "http": 80, "https": 443}
RULES = ("url", "scheme", "host", "address", "media_root")
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_PATTERN = re.compile(r"^[a-z0-9*._-]+$")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Resolver = Callable[[str, int], Sequence[str]]


class SourcePolicyError(BadSourceError):
    """The source policy refuses a source. ``rule`` is one of :data:`RULES`."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"source refused by the source policy (rule '{rule}'): {message}")


@dataclass(frozen=True)
class HostEntry:
    """One ``hosts`` entry: a host name glob or an IP network, with an optional port."""

    text: str
    pattern: Optional[str] = None
    network: Optional[Union[ipaddress.IPv4Network, ipaddress.IPv6Network]] = None
    port: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> "HostEntry":
        raw = text.strip().lower()
        port: Optional[int] = None
        if raw.startswith("["):
            close = raw.find("]")
            if close < 0:
                raise ValueError(f"source policy host entry {text!r}: unbalanced '['")
            address, rest = raw[1:close], raw[close + 1:]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"source policy host entry {text!r}: expected ':PORT' after ']'")
                port = _parse_port(rest[1:], text)
        elif raw.count(":") == 1:
            address, port_text = raw.split(":")
            port = _parse_port(port_text, text)
        else:
            address = raw  # a name, an IPv4 address or network, or a bare IPv6 address or network
        try:
            return cls(text=text, network=ipaddress.ip_network(address, strict=False), port=port)
        except ValueError:
            pass
        if not address or not _HOST_PATTERN.match(address):
            raise ValueError(
                f"source policy host entry {text!r} is neither a host name or glob (letters, digits, '.', '-', '*'), "
                "an IP address nor a CIDR; add ':PORT' to restrict the port, '[v6]:PORT' for IPv6"
            )
        return cls(text=text, pattern=address.rstrip("."), port=port)

    def port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port


def _parse_port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"source policy host entry {entry!r}: port {text!r} is not in 1..65535")
    return int(text)


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _address_class(address: IPAddress) -> str:
    """``public``, ``private`` (RFC 1918 / ULA / CGNAT), ``loopback``, ``link_local`` or
    ``reserved`` (unspecified, multicast, documentation, benchmark, ...)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return _address_class(address.ipv4_mapped)
        if address in _NAT64:  # NAT64 reaches the embedded IPv4 address
            return _address_class(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link_local"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "reserved"
    if any(address in network for network in _PRIVATE_NETWORKS if network.version == address.version):
        return "private"
    return "public" if address.is_global else "reserved"


@dataclass(frozen=True)
class SourcePolicy:
    """The operator's rules for sources (see the module docstring).

    Attributes:
        schemes: allowed network URL schemes, a subset of :data:`NETWORK_SCHEMES`.
        hosts: allowed host entries (:class:`HostEntry` syntax).
        allow_private: name entries may resolve to private-network addresses too.
        media_root: the folder local files must lie in; None refuses local files.
        trusted_caller: set only by :meth:`local_user` (the CLI's ``run`` on one's own
            machine); the HTTP API refuses to serve with such a policy.
        resolver: ``(host, port) -> addresses``; the system resolver unless a test injects one.
    """

    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    hosts: tuple[str, ...] = ("*",)
    allow_private: bool = False
    media_root: Optional[str] = None
    trusted_caller: bool = False
    resolver: Resolver = field(default=_system_resolver, compare=False, repr=False)

    def __post_init__(self) -> None:
        schemes = tuple(s.lower() for s in self.schemes)
        unknown = [s for s in schemes if s not in NETWORK_SCHEMES]
        if unknown:
            raise ValueError(
                f"source policy schemes {unknown} are not network schemes; valid: {list(NETWORK_SCHEMES)} "
                "(local files are governed by media_root)"
            )
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "hosts", tuple(self.hosts))
        object.__setattr__(self, "_entries", tuple(HostEntry.parse(h) for h in self.hosts))
        if self.media_root is not None:
            if not os.path.isdir(self.media_root):
                raise ValueError(f"source policy media_root={self.media_root!r} is not a directory")
            object.__setattr__(self, "media_root", os.path.realpath(self.media_root))

    # ----------------------------------------------------------------- construction

    @classmethod
    def local_user(cls) -> "SourcePolicy":
        """Everything the local user could read anyway: every file, every host and scheme."""
        return cls(schemes=NETWORK_SCHEMES, hosts=("*", "0.0.0.0/0", "::/0"), allow_private=True,
                   media_root=os.path.abspath(os.sep), trusted_caller=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "source policy") -> "SourcePolicy":
        valid = ("schemes", "hosts", "allow_private", "media_root")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"{origin}: unknown keys {unknown}; valid: {list(valid)}")
        kwargs: dict[str, Any] = {}
        for name in ("schemes", "hosts"):
            if name in data:
                if not isinstance(data[name], list) or not all(isinstance(v, str) for v in data[name]):
                    raise ValueError(f"{origin}: {name} must be a list of strings, got {data[name]!r}")
                kwargs[name] = tuple(data[name])
        if "allow_private" in data:
            if not isinstance(data["allow_private"], bool):
                raise ValueError(f"{origin}: allow_private must be true or false, got {data['allow_private']!r}")
            kwargs["allow_private"] = data["allow_private"]
        if data.get("media_root") is not None:
            kwargs["media_root"] = str(data["media_root"])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str) -> "SourcePolicy":
        """Read a TOML file with the keys ``schemes``, ``hosts``, ``allow_private``, ``media_root``."""
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"cannot read source policy file {path!r}: {error}") from None
        return cls.from_dict(data, origin=path)

    def describe(self) -> str:
        root = self.media_root if self.media_root is not None else "none (local files refused)"
        return (f"schemes={list(self.schemes)} hosts={list(self.hosts)} allow_private={self.allow_private} "
                f"media_root={root}")

    # ----------------------------------------------------------------- checks

    def check(self, source: str) -> SourceSpec:
        """The :class:`SourceSpec` to open for ``source`` (a local file as its real path), or
        :class:`SourcePolicyError` / :class:`BadSourceError`."""
        if not isinstance(source, str) or not source.strip():
            raise BadSourceError("source must be a non-empty string (a file path or an rtsp/http URL)")
        if _UNSAFE_CHARACTERS.search(source):
            raise SourcePolicyError("url", "the source contains whitespace, control characters or backslashes")
        parts = urlsplit(source)
        scheme = parts.scheme.lower()
        if not scheme or len(scheme) == 1:  # a plain path (a drive letter on Windows)
            return self._check_file(source, source)
        if scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise SourcePolicyError("url", f"file URL {sanitize_url(source)!r} names a host; only local files are read")
            return self._check_file(unquote(parts.path), source)
        return self.check_url(source)

    def check_url(self, url: str) -> SourceSpec:
        """Check a network URL (a source, or a redirect target)."""
        if _UNSAFE_CHARACTERS.search(url):
            raise SourcePolicyError("url", "the URL contains whitespace, control characters or backslashes")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        shown = sanitize_url(url)
        if scheme not in self.schemes:
            raise SourcePolicyError("scheme", f"scheme {scheme!r} of {shown!r} is not allowed; allowed: {list(self.schemes)}")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise SourcePolicyError("url", f"{shown!r} has an invalid port") from None
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise SourcePolicyError("url", f"{shown!r} has no host")
        self._check_host(host, port)
        return SourceSpec(url=url, kind="pyav", is_live=scheme in ("rtsp", "rtsps", "rtmp"))

    def _check_host(self, host: str, port: int) -> None:
        entries: tuple[HostEntry, ...] = getattr(self, "_entries")
        names = [e for e in entries if e.pattern is not None and e.port_matches(port) and fnmatch.fnmatchcase(host, e.pattern)]
        networks = [e for e in entries if e.network is not None and e.port_matches(port)]
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # Without a matching name entry only the network entries can admit the host; whatever
        # its addresses (or none), the refusal is then the same 'host' one.
        refusal = self._address_refusal(host) if names else SourcePolicyError(
            "host", f"{shown} is not in the allowed hosts {list(self.hosts)}")
        if not names and not networks:
            raise refusal
        addresses = self._resolve(host, port)
        if not addresses:
            raise refusal
        for address in addresses:
            if any(address.version == e.network.version and address in e.network for e in networks):
                continue
            kind = _address_class(address)
            if names and (kind == "public" or (kind == "private" and self.allow_private)):
                continue
            raise refusal

    def _address_refusal(self, host: str) -> SourcePolicyError:
        # One message for "resolves to a refused address" and "does not resolve", so the
        # policy is no DNS oracle for internal names.
        return SourcePolicyError(
            "address",
            f"host {host!r} does not resolve to an allowed address (name entries allow public addresses"
            f"{' and private networks' if self.allow_private else ''}; loopback, link-local and other "
            "addresses need an explicit IP or CIDR entry)",
        )

    def _resolve(self, host: str, port: int) -> list[IPAddress]:
        """The host's addresses; empty when it does not resolve."""
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        try:
            return [ipaddress.ip_address(a.split("%")[0]) for a in self.resolver(host, port)]
        except (OSError, UnicodeError, ValueError):
            return []

    def _check_file(self, path: str, source: str) -> SourceSpec:
        if self.media_root is None:
            raise SourcePolicyError("media_root", "local files are not allowed (the operator configured no media root)")
        root = self.media_root
        try:
            candidate = path if os.path.isabs(path) else os.path.join(root, path)
            real = os.path.realpath(candidate)
        except (ValueError, OSError):
            raise SourcePolicyError("url", "the path cannot be resolved") from None
        if os.path.commonpath([root, real]) != root:
            raise SourcePolicyError("media_root", f"local file {path!r} is outside the media root")
        if not os.path.isfile(real):
            raise BadSourceError(f"video file {path!r} does not exist in the media root")
        return SourceSpec(url=real, kind="file", is_live=False)


def follow_redirects(url: str, policy: SourcePolicy, timeout_s: float = 5.0, max_hops: int = 5) -> str:
    """The URL an http(s) source ends at, every hop checked against ``policy``.

    ffmpeg is then told to follow no redirect itself (``max_redirects=0``), so a server that
    redirects only the second time is refused rather than followed. Raises
    :class:`SourcePolicyError` for a disallowed hop, :class:`BadSourceError` for a redirect loop.
    """
    import requests

    current = url
    for _ in range(max_hops + 1):
        try:
            with requests.get(current, allow_redirects=False, stream=True, timeout=timeout_s) as response:
                location = response.headers.get("Location") if response.is_redirect else None
        except requests.RequestException:
            return current  # unreachable: the reader reports it with its own (sanitised) error
        if location is None:
            return current
        target = urljoin(current, location)
        try:
            policy.check_url(target)
        except SourcePolicyError as error:
            raise SourcePolicyError(error.rule, f"{sanitize_url(current)!r} redirects to a refused location: "
                                    f"{str(error).split(': ', 1)[1]}") from None
        current = target
    raise BadSourceError(f"{sanitize_url(url)!r} redirects more than {max_hops} times")
