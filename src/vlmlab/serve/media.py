"""The server's intake of untrusted images: an OpenAI `image_url.url` to a decoded RGB image.

Every image a client sends is hostile until proven otherwise. `load_image_url` accepts base64
data URIs, and, only where the operator enables them in `MediaPolicy`, http(s) URLs (host
allow-list, no private / loopback / link-local targets, redirects re-checked hop by hop, one
overall deadline, a byte cap) and file:// URLs under one folder. Pixels are counted from the
header before anything is decoded; SVG, animated images and formats outside the policy's list
are refused. Each refusal is a `MediaError` whose message says what was wrong.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import threading
import time
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, Callable
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmlab.errors import ConfigError, ImageError
from vlmlab.vision.preprocess import decoding_errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FORMAT_NAMES = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP", "GIF": "GIF"}  # how messages spell them
REDIRECTS = (301, 302, 303, 307, 308)
NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")  # two letters at least: "C:" is a Windows drive
_IMAGE_MIME = re.compile(r"image/[a-z0-9][a-z0-9.+-]*")


class MediaError(ImageError):
    """An image_url the server refuses: malformed, not an image, over a limit, or a forbidden source."""


@dataclass(frozen=True)
class MediaPolicy:
    """The limits of image intake; the defaults accept base64 data URIs only.

    `allowed_hosts` holds exact host names, "*.example.com" (any subdomain, not example.com
    itself) or "*" (any host). Addresses that are not public are refused whatever the host,
    unless they lie in one of `allowed_networks` (CIDRs). `image_formats` are Pillow format names.
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    allow_urls: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    url_timeout_s: float = 10.0
    max_redirects: int = 3
    files_root: Path | None = None
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF")

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"MediaPolicy.{name} must be a positive integer, got {value!r}")
        if isinstance(self.max_redirects, bool) or not isinstance(self.max_redirects, int) or self.max_redirects < 0:
            raise ConfigError(f"MediaPolicy.max_redirects must be an integer >= 0, got {self.max_redirects!r}")
        if isinstance(self.url_timeout_s, bool) or not isinstance(self.url_timeout_s, (int, float)) \
                or not self.url_timeout_s > 0:
            raise ConfigError(
                f"MediaPolicy.url_timeout_s must be a positive number of seconds, got {self.url_timeout_s!r}")
        hosts = tuple(_normal_host(_text(h, "allowed_hosts")) for h in self.allowed_hosts)
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "allowed_networks", tuple(self.allowed_networks))
        self.networks()  # validates the CIDRs
        Image.init()
        known = set(Image.registered_extensions().values())
        formats = tuple(_text(f, "image_formats").upper() for f in self.image_formats)
        unknown = [f for f in formats if f not in known]
        if unknown or not formats:
            raise ConfigError(
                f"MediaPolicy.image_formats must name Pillow image formats, got {list(self.image_formats)!r}")
        object.__setattr__(self, "image_formats", formats)
        if self.files_root is not None:
            object.__setattr__(self, "files_root", Path(self.files_root))

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """`allowed_networks` parsed; a malformed CIDR is a ConfigError naming it."""
        try:
            return [ipaddress.ip_network(_text(n, "allowed_networks"), strict=False) for n in self.allowed_networks]
        except ValueError as e:
            raise ConfigError(f"MediaPolicy.allowed_networks: {e} (expected CIDRs such as 10.0.0.0/8)") from None

    def host_allowed(self, host: str) -> bool:
        """Whether `host` (already lowercase, no brackets, no trailing dot) matches `allowed_hosts`."""
        return any(p == "*" or p == host or (p.startswith("*.") and host.endswith(p[1:])) for p in self.allowed_hosts)

    def formats_hint(self) -> str:
        """'PNG, JPEG, WebP or GIF': the accepted formats, for messages."""
        names = [FORMAT_NAMES.get(f, f) for f in self.image_formats]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"MediaPolicy.{field} must hold strings, got {value!r}")
    return value


def _normal_host(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def _show(url: str, limit: int = 120) -> str:
    """A URL as messages quote it: whole if short, else its start."""
    return url if len(url) <= limit else url[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Entry point


def load_image_url(url: str, policy: MediaPolicy = MediaPolicy()) -> Image.Image:
    """An OpenAI `image_url.url` (data URI, http(s) URL, file:// URL) -> decoded RGB image, within
    the policy's limits. Every refusal is a MediaError naming what was wrong."""
    if not isinstance(url, str):
        raise MediaError(f"image_url: expected a URL string, got {type(url).__name__}")
    url = url.strip()
    if not url:
        raise MediaError("image_url: empty URL; send the image as a data URI (data:image/png;base64,...)")
    scheme, colon, _ = url.partition(":")
    if not colon or not _SCHEME.fullmatch(scheme):
        raise MediaError(
            f"image_url: {_show(url)!r} is not a URL; send the image as a data URI (data:image/png;base64,...)")
    scheme = scheme.lower()
    if scheme == "data":
        return _from_data_uri(url, policy)
    if scheme in ("http", "https"):
        data, content_type = _fetch(url, policy)
        return _decode(data, policy, f"image_url: {_show(url)}",
                       f"image_url: {_show(url)}: the response (Content-Type: {content_type}) is not an image")
    if scheme == "file":
        path, data = _read_file_url(url, policy)
        return _decode(data, policy, f"image_url: file {path}", f"image_url: file {path} is not an image")
    raise MediaError(
        f"image_url: unsupported URL scheme {scheme!r}; use a data URI (data:image/png;base64,...) "
        "or an http(s) URL where the server allows them"
    )


# ---------------------------------------------------------------------------------------------
# Data URIs


def _from_data_uri(url: str, policy: MediaPolicy) -> Image.Image:
    """data:image/<subtype>[;param=value...];base64,<payload> -> image, size-checked before decoding."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise MediaError("image_url: data URI has no comma between its header and its data "
                         "(expected data:image/png;base64,...)")
    mime, *params = [p.strip().lower() for p in header.split(";")]
    if not params or params[-1] != "base64":
        raise MediaError(f"image_url: data URI must be base64-encoded (data:{mime or 'image/png'};base64,...), "
                         f"its header is {_show(header, 60)!r}")
    if mime == "image/svg+xml":
        raise MediaError(
            f"image_url: data URI: SVG is a vector format and is not supported; send {policy.formats_hint()}")
    if not _IMAGE_MIME.fullmatch(mime):
        raise MediaError(f"image_url: data URI MIME type {_show(mime, 60)!r} is not an image type; "
                         f"expected image/png, image/jpeg, image/webp or image/gif")
    payload = "".join(payload.split())  # base64 wrapped over lines is common
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > policy.max_image_bytes:
        raise MediaError(f"image_url: data URI holds about {size:,} bytes of image data, more than the limit of "
                         f"{policy.max_image_bytes:,} bytes (max_image_bytes)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"image_url: invalid base64 in data URI ({e})") from None
    return _decode(data, policy, "image_url: data URI",
                   f"image_url: data URI says {mime} but the data is not an image")


# ---------------------------------------------------------------------------------------------
# Decoding


def _decode(data: bytes, policy: MediaPolicy, name: str, not_image: str) -> Image.Image:
    """Bytes -> RGB image as `vision.preprocess.load_image` makes it, opened once: pixels counted
    from the header, SVG / animated / unlisted formats refused before any pixel is decoded."""
    if not data:
        raise MediaError(f"{name}: empty (0 bytes), not an image")
    if len(data) > policy.max_image_bytes:
        raise MediaError(
            f"{name}: {len(data):,} bytes, more than the limit of {policy.max_image_bytes:,} (max_image_bytes)")
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<") and b"<svg" in head):
        raise MediaError(f"{name}: SVG is a vector format and is not supported; send {policy.formats_hint()}")
    try:
        with decoding_errors(name, policy.max_image_pixels):
            return _open_rgb(data, policy, name, not_image)
    except MediaError:
        raise
    except ImageError as e:  # decoding_errors' message ("truncated or corrupt ...") as a MediaError
        raise MediaError(str(e)) from None


def _open_rgb(data: bytes, policy: MediaPolicy, name: str, not_image: str) -> Image.Image:
    limit = policy.max_image_pixels
    try:
        image = Image.open(io.BytesIO(data), formats=policy.image_formats)
    except Image.DecompressionBombError:
        raise MediaError(f"{name}: too many pixels, more than the limit of {limit:,} (max_image_pixels), "
                         "refused as a possible decompression bomb before decoding") from None
    except UnidentifiedImageError:
        raise MediaError(_unsupported(data, policy, name, not_image)) from None
    with image:
        width, height = image.size
        if width * height > limit or width <= 0 or height <= 0:
            raise MediaError(f"{name}: too many pixels: {width}x{height} = {width * height:,}, more than the "
                             f"limit of {limit:,} (max_image_pixels), refused before decoding")
        # MPO (camera JPEGs with extra pictures) keeps its primary picture, as JPEG readers do.
        if image.format != "MPO" and getattr(image, "is_animated", False):
            raise MediaError(f"{name}: animated images are not supported ({image.n_frames} frames); "
                             f"send a single frame as {policy.formats_hint()}")
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


def _unsupported(data: bytes, policy: MediaPolicy, name: str, not_image: str) -> str:
    """The message for bytes outside the policy's formats: the format's name if Pillow knows it."""
    try:
        with Image.open(io.BytesIO(data)) as other:  # header only, to name the format
            found = other.format
    except Exception:  # unrecognised, or a bomb: either way not one we take
        found = None
    if found:
        return f"{name}: {found} images are not supported; send {policy.formats_hint()}"
    return f"{not_image} (no image format recognised)"


# ---------------------------------------------------------------------------------------------
# file:// URLs


def _read_file_url(url: str, policy: MediaPolicy) -> tuple[str, bytes]:
    """The bytes of a file:// URL's file, which must lie (symlinks resolved) under `files_root`."""
    if policy.files_root is None:
        raise MediaError("image_url: file:// URLs are disabled on this server; "
                         "send the image as a data URI (data:image/png;base64,...)")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"image_url: file URL {_show(url)!r} names a host ({parts.netloc!r}); use file:///path")
    shown = unquote(parts.path)
    try:
        path = Path(shown).resolve()
        inside = path.is_relative_to(policy.files_root.resolve())
    except (OSError, ValueError, RuntimeError) as e:  # null bytes, symlink loops
        raise MediaError(f"image_url: file {_show(shown)!r} is not a usable path ({e})") from None
    if not Path(shown).is_absolute() or not inside:
        raise MediaError(f"image_url: file {_show(shown)} is outside the folder this server reads images from")
    if not path.exists():
        raise MediaError(f"image_url: file {_show(shown)}: no such file")
    if not path.is_file():
        raise MediaError(f"image_url: file {_show(shown)}: not a regular file")
    try:
        size = path.stat().st_size
        if size > policy.max_image_bytes:
            raise MediaError(f"image_url: file {_show(shown)}: {size:,} bytes, more than the limit of "
                             f"{policy.max_image_bytes:,} (max_image_bytes)")
        with open(path, "rb") as fh:
            return _show(shown), fh.read(policy.max_image_bytes + 1)
    except OSError as e:
        raise MediaError(f"image_url: file {_show(shown)}: cannot read it ({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# http(s) URLs


class _Deadline:
    """One clock for a whole fetch, redirects included."""

    def __init__(self, seconds: float, url: str) -> None:
        self.seconds, self.url, self.end = seconds, url, time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.error()
        return left

    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def error(self) -> MediaError:
        return MediaError(f"image_url: {_show(self.url)}: timed out after {self.seconds:g} s (url_timeout_s)")


def _fetch(url: str, policy: MediaPolicy) -> tuple[bytes, str]:
    """GET an http(s) URL under the policy: every hop's scheme, host and addresses are checked,
    the connection goes to the checked address (no second DNS lookup), redirects are followed
    by hand. Returns the body and its Content-Type."""
    if not policy.allow_urls:
        raise MediaError("image_url: http(s) image URLs are disabled on this server; "
                         "send the image as a data URI (data:image/png;base64,...)")
    deadline = _Deadline(policy.url_timeout_s, url)
    where = f"image_url: {_show(url)}"
    for _ in range(policy.max_redirects + 1):
        parts, host, port = _check_url(url, policy, where)
        addresses = _resolve(host, port, policy, where, deadline)
        status, headers, body = _get(parts, host, port, addresses, policy, where, deadline)
        if status not in REDIRECTS:
            return body, headers.get("Content-Type", "none")
        location = headers.get("Location")
        if not location:
            raise MediaError(f"{where}: HTTP {status} redirect without a Location header")
        url = urljoin(url, location.strip())
        where = f"image_url: {_show(deadline.url)} redirected to {_show(url)}"
    raise MediaError(
        f"image_url: {_show(deadline.url)}: too many redirects (more than {policy.max_redirects}, max_redirects)")


def _check_url(url: str, policy: MediaPolicy, where: str) -> tuple[SplitResult, str, int]:
    """(split URL, host, port) of an http(s) URL whose scheme and host the policy allows."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"{where}: only http and https URLs can be fetched, not {parts.scheme.lower() or 'no'!r} URLs")
    if parts.username is not None or parts.password is not None:
        raise MediaError(f"{where}: URLs with credentials (user@host) are not accepted")
    host = _normal_host(parts.hostname or "")
    if not host:
        raise MediaError(f"{where}: the URL has no host")
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise MediaError(f"{where}: host {host!r} is not a valid host name") from None
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as e:
        raise MediaError(f"{where}: invalid port ({e})") from None
    if not policy.host_allowed(host):
        raise MediaError(f"{where}: host {host!r} is not an allowed host for image URLs on this server")
    return parts, host, port


def _resolve(host: str, port: int, policy: MediaPolicy, where: str, deadline: _Deadline) -> list[IPAddress]:
    """The host's addresses, all of them public or inside `allowed_networks`; DNS within the deadline."""
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        infos = _within(deadline, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        if isinstance(infos, OSError):
            raise MediaError(f"{where}: cannot resolve host {host!r} ({infos})") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not addresses:
            raise MediaError(f"{where}: host {host!r} has no address")
    networks = policy.networks()
    for ip in addresses:
        kind = _forbidden(ip, networks)
        if kind:
            named = f"{ip} is" if str(ip) == host else f"host {host!r} resolves to {ip},"
            raise MediaError(f"{where}: {named} a {kind} address; image URLs may only reach public addresses")
    return addresses


def _within(deadline: _Deadline, work: Callable[[], Any]) -> Any:
    """`work()` in a daemon thread, waited for until the deadline (getaddrinfo has no timeout).
    An OSError it raises is returned, not raised."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(work())
        except OSError as e:
            box.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline.left())
    if not box:
        raise deadline.error()
    return box[0]


def _forbidden(ip: IPAddress, networks: list) -> str | None:
    """What makes `ip` unreachable for image URLs ('loopback', 'link-local', ...), or None.

    IPv6 forms that carry an IPv4 address (mapped, NAT64, 6to4, Teredo) are judged by that address."""
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [e for e in (ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None) if e]
        if ip in NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if any(candidate in net for candidate in (ip, *embedded) for net in networks):
        return None
    for candidate in embedded or [ip]:
        for kind, flag in (("unspecified", candidate.is_unspecified), ("loopback", candidate.is_loopback),
                           ("link-local", candidate.is_link_local), ("multicast", candidate.is_multicast),
                           ("reserved", candidate.is_reserved), ("private", candidate.is_private),
                           ("non-public", not candidate.is_global)):
            if flag:
                return kind
    return None


def _get(parts: SplitResult, host: str, port: int, addresses: list[IPAddress], policy: MediaPolicy, where: str,
         deadline: _Deadline) -> tuple[int, Message, bytes]:
    """One GET to a checked address (Host header and TLS SNI keep the name), body capped at
    max_image_bytes; a watchdog closes the socket when the deadline passes, so a server that
    sends one byte at a time cannot hold the request."""
    https = parts.scheme.lower() == "https"
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    conn = cls(host, port, timeout=deadline.left())

    opened: list[socket.socket] = []  # for the watchdog: http.client drops conn.sock once the response owns it

    def connect(_address, timeout, _source=None) -> socket.socket:
        """Open the socket to the first checked address that answers; no name lookup here."""
        error: OSError = OSError("no address")
        for ip in addresses:
            sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM)
            opened.append(sock)
            try:
                sock.settimeout(min(timeout, deadline.left()))
                sock.connect((str(ip), port))
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error

    conn._create_connection = connect  # http.client's hook for opening the socket
    watchdog = threading.Timer(deadline.left(), _shutdown, (opened,))
    watchdog.daemon = True
    watchdog.start()
    target = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe="/?&=%:@!$'()*+,;~")
    try:
        conn.request("GET", target, headers={"Accept": "image/*", "User-Agent": "vlmlab"})
        response = conn.getresponse()
        status, headers = response.status, response.msg
        if status in REDIRECTS:
            return status, headers, b""
        if status != 200:
            raise MediaError(f"{where}: the server answered HTTP {status} {response.reason}".rstrip())
        declared = headers.get("Content-Length", "")
        if declared.strip().isdigit() and int(declared) > policy.max_image_bytes:
            raise MediaError(f"{where}: the image is {int(declared):,} bytes (Content-Length), more than the limit "
                             f"of {policy.max_image_bytes:,} (max_image_bytes)")
        body = bytearray()
        while len(body) <= policy.max_image_bytes:
            chunk = response.read(min(1 << 16, policy.max_image_bytes + 1 - len(body)))
            if not chunk:
                break
            body += chunk
        if len(body) > policy.max_image_bytes:
            raise MediaError(f"{where}: the image is more than the limit of {policy.max_image_bytes:,} bytes "
                             "(max_image_bytes)")
        if deadline.passed():  # the watchdog may have cut the body short
            raise deadline.error()
        return status, headers, bytes(body)
    except MediaError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        if deadline.passed() or isinstance(e, TimeoutError):
            raise deadline.error() from None
        raise MediaError(f"{where}: cannot fetch the image ({type(e).__name__}: {e})") from None
    finally:
        watchdog.cancel()
        conn.close()


def _shutdown(sockets: list[socket.socket]) -> None:
    """Wake a blocked read: the deadline has passed."""
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
