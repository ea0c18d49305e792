"""vlmlab.serve.media: the server's intake of untrusted images. Data URIs (the bad-input corpus of
tests/helpers/bad_images.py), http(s) URLs against a local server (allow-lists, address checks,
redirects, limits, deadline, TLS by name), and file:// URLs confined to one folder."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from helpers.bad_images import CORPUS, SIZE, cmyk_jpeg, data_uri, encode, gray16_png, noise, png, png_header_only
from vlmlab.errors import ConfigError, InputError
from vlmlab.serve.media import MediaError, MediaPolicy, load_image_url
from vlmlab.vision import load_image

OK_PNG = png()


def refused(url, policy: MediaPolicy = MediaPolicy()) -> str:
    """The message of the MediaError that `url` raises."""
    with pytest.raises(MediaError) as info:
        load_image_url(url, policy)
    assert isinstance(info.value, InputError)
    return str(info.value)


@pytest.fixture
def no_connections(monkeypatch):
    """Any attempt to open a socket connection or resolve a name fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a connection or lookup was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)


def fake_dns(monkeypatch, table: dict[str, list[str]]) -> list[str]:
    """socket.getaddrinfo answering from `table`; returns the list of names looked up."""
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                for ip in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


# ---------------------------------------------------------------------------------------------
# Data URIs


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus(name):
    url, expected = CORPUS[name]
    if expected is None:
        image = load_image_url(url)
        assert image.mode == "RGB" and image.size == SIZE
    else:
        assert expected in refused(url).lower()


@pytest.mark.parametrize("payload", [cmyk_jpeg(), gray16_png()], ids=["cmyk", "gray16"])
def test_odd_modes_convert_like_load_image(payload):
    """CMYK and 16-bit images are valid: converted exactly as the CLI's load_image does."""
    np.testing.assert_array_equal(np.asarray(load_image_url(data_uri(payload))), np.asarray(load_image(payload)))


def test_png_round_trip_pixel_exact():
    image = noise(seed=5)
    b64 = base64.b64encode(encode(image, "PNG")).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME-style lines are tolerated
    for url in (f"data:image/png;base64,{b64}", f"DATA:Image/PNG;name=x.png;base64,{wrapped}\n"):
        out = load_image_url(url)
        assert out.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    url = data_uri(encode(noise(), "JPEG", exif=exif.tobytes()), "image/jpeg")
    assert load_image_url(url).size == (SIZE[1], SIZE[0])


def test_oversized_payload_refused_before_decoding():
    policy = MediaPolicy(max_image_bytes=1000)
    # 1,500 bytes of zeros (not an image) and 2,000 non-base64 characters: the size is refused
    # first, so neither the decoder nor the base64 check ever sees them.
    for payload in ("A" * 2000, "!" * 2000):
        msg = refused(f"data:image/png;base64,{payload}", policy)
        assert "1,500 bytes" in msg and "1,000 bytes (max_image_bytes)" in msg
    big = encode(noise((64, 64)), "PNG")
    assert len(big) > 1000 and "max_image_bytes" in refused(data_uri(big), policy)
    assert load_image_url(data_uri(OK_PNG), MediaPolicy(max_image_bytes=len(OK_PNG))).size == SIZE


def test_pixel_limit_from_header():
    assert "too many pixels: 24x16 = 384, more than the limit of 100 (max_image_pixels)" in refused(
        data_uri(OK_PNG), MediaPolicy(max_image_pixels=100))
    # a header claiming 200x200 over almost no pixel data: refused by size, never decoded ("truncated")
    msg = refused(data_uri(png_header_only(200, 200)), MediaPolicy(max_image_pixels=10_000))
    assert "too many pixels: 200x200 = 40,000" in msg and "before decoding" in msg


@pytest.mark.parametrize("url, expected", [
    (None, "expected a url string, got nonetype"),
    (b"data:image/png;base64,", "expected a url string, got bytes"),
    ("   ", "empty url"),
    ("C:\\images\\cat.png", "is not a url"),
    ("cat.png", "is not a url"),
    ("javascript:alert(1)", "unsupported url scheme 'javascript'"),
    ("gopher://example.com/1", "unsupported url scheme 'gopher'"),
    ("data:image/;base64,AAAA", "is not an image type"),
    ("data:;base64,AAAA", "'' is not an image type"),
    ("data:image/png;base64,iVBORw0KGgo=é", "invalid base64"),
    ("data:image/png;base64,iVBORw0KGgo", "invalid base64"),  # bad padding
])
def test_malformed_urls(url, expected):
    assert expected in refused(url).lower()


def test_policy_validation():
    for kwargs, field in [({"allowed_networks": ("10.0.0.0/33",)}, "allowed_networks"),
                          ({"allowed_networks": ("intranet",)}, "allowed_networks"),
                          ({"max_image_bytes": 0}, "max_image_bytes"), ({"url_timeout_s": -1}, "url_timeout_s"),
                          ({"max_redirects": -1}, "max_redirects"), ({"image_formats": ("HEIC",)}, "image_formats"),
                          ({"allowed_hosts": (None,)}, "allowed_hosts")]:
        with pytest.raises(ConfigError, match=field):
            MediaPolicy(**kwargs)
    policy = MediaPolicy(allowed_hosts=("Images.Example.COM.", "*.cdn.example.com", "[::1]"))
    assert policy.allowed_hosts == ("images.example.com", "*.cdn.example.com", "::1")
    assert all(policy.host_allowed(h) for h in ("images.example.com", "a.cdn.example.com", "a.b.cdn.example.com",
                                                "::1"))
    assert not any(policy.host_allowed(h) for h in ("cdn.example.com", "evilcdn.example.com", "example.com", "1"))
    assert MediaPolicy(allowed_hosts=("*",)).host_allowed("anything.at.all")
    assert not MediaPolicy().host_allowed("example.com")


# ---------------------------------------------------------------------------------------------
# http(s) URLs against a local server


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        port, path = self.server.server_port, self.path
        self.server.seen.append((path, self.headers.get("Host")))
        redirects = {"/to-localhost": f"http://localhost:{port}/ok.png",
                     "/to-metadata": "http://169.254.169.254/latest/meta-data/",
                     "/to-file": "file:///etc/passwd", "/relative": "ok.png", "/loop": "/loop"}
        if path in redirects:
            self.reply(302, b"", Location=redirects[path])
        elif path == "/ok.png":
            self.reply(200, OK_PNG, **{"Content-Type": "image/png"})
        elif path == "/html":
            self.reply(200, b"<html><body>login</body></html>", **{"Content-Type": "text/html"})
        elif path == "/big":  # declares 10 MB, sends little
            self.reply(200, b"\0" * 100, **{"Content-Length": str(10_000_000)})
        elif path == "/big-undeclared":  # no Content-Length: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.write_slowly(b"\0" * 50_000, pause=0)
        elif path == "/slow":
            time.sleep(3)
            self.reply(200, OK_PNG)
        elif path == "/drip":  # one byte every 0.2 s: no single read times out
            self.send_response(200)
            self.send_header("Content-Length", str(len(OK_PNG)))
            self.end_headers()
            self.write_slowly(OK_PNG[:50], pause=0.2)
        else:
            self.reply(404, b"not found")

    def reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def write_slowly(self, body: bytes, pause: float) -> None:
        try:
            for i in range(0, len(body), 1 if pause else 4096):
                self.wfile.write(body[i : i + (1 if pause else 4096)])
                self.wfile.flush()
                time.sleep(pause)
        except OSError:  # the client gave up
            pass

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads, block_on_close = True, False

    def handle_error(self, request, client_address) -> None:
        pass  # clients that give up early (the point of several tests) are not errors here


def serve(tls: ssl.SSLContext | None = None) -> Server:
    """A threaded HTTP(S) server on 127.0.0.1 running Handler; stop with .shutdown()."""
    server = Server(("127.0.0.1", 0), Handler)
    server.seen = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def web():
    server = serve()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def local():
    """A policy under which the test server (127.0.0.1 only) may be fetched."""
    return MediaPolicy(allow_urls=True, allowed_hosts=("127.0.0.1",), allowed_networks=("127.0.0.1/32",),
                       url_timeout_s=1.0, max_image_bytes=10_000)


def at(web, path: str) -> str:
    return f"http://127.0.0.1:{web.server_port}{path}"


def test_urls_disabled_by_default(web, no_connections):
    assert "http(s) image urls are disabled" in refused(at(web, "/ok.png")).lower()
    assert "disabled" in refused(f"https://127.0.0.1:{web.server_port}/ok.png", MediaPolicy(allowed_hosts=("*",)))


def test_host_not_allowed(web, no_connections):
    policy = MediaPolicy(allow_urls=True, allowed_hosts=("images.example.com",))
    assert "host '127.0.0.1' is not an allowed host" in refused(at(web, "/ok.png"), policy)
    assert "not an allowed host" in refused(at(web, "/ok.png"), MediaPolicy(allow_urls=True))


def test_loopback_refused_without_allowed_network(web, no_connections):
    msg = refused(at(web, "/ok.png"), MediaPolicy(allow_urls=True, allowed_hosts=("*",)))
    assert "127.0.0.1 is a loopback address" in msg


@pytest.mark.parametrize("host, kind", [
    ("169.254.169.254", "link-local"), ("[fe80::1]", "link-local"), ("[::1]", "loopback"),
    ("[::ffff:127.0.0.1]", "loopback"), ("[::ffff:169.254.169.254]", "link-local"),
    ("[64:ff9b::a9fe:a9fe]", "link-local"), ("[2002:a00:1::]", "private"),  # NAT64 and 6to4 forms
    ("0.0.0.0", "unspecified"), ("10.1.2.3", "private"), ("192.168.0.1", "private"),
    ("100.64.0.1", "non-public"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"),
])
def test_non_public_addresses_refused_without_connecting(host, kind, no_connections):
    start = time.monotonic()
    msg = refused(f"http://{host}/latest/meta-data/", MediaPolicy(allow_urls=True, allowed_hosts=("*",)))
    assert f"a {kind} address" in msg and time.monotonic() - start < 1


def test_any_bad_resolved_address_refuses(monkeypatch):
    asked = fake_dns(monkeypatch, {"images.example.com": ["93.184.216.34", "10.0.0.7"],
                                   "decimal.example.com": ["2130706433"]})
    policy = MediaPolicy(allow_urls=True, allowed_hosts=("*.example.com",))
    msg = refused("http://IMAGES.example.com./cat.png", policy)
    assert "host 'images.example.com' resolves to 10.0.0.7, a private address" in msg
    assert "cannot resolve host 'nowhere.example.com'" in refused("http://nowhere.example.com/x.png", policy)
    assert asked == ["images.example.com", "nowhere.example.com"]


def test_fetch_ok_and_by_checked_address(web, local, monkeypatch):
    image = load_image_url(at(web, "/ok.png"), local)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(load_image(OK_PNG)))
    assert load_image_url(at(web, "/relative"), local).size == SIZE  # relative Location
    # A name: looked up once, connected to by the checked address, Host header keeps the name.
    asked = fake_dns(monkeypatch, {"images.test": ["127.0.0.1"]})
    policy = MediaPolicy(allow_urls=True, allowed_hosts=("images.test",), allowed_networks=("127.0.0.0/8",))
    assert load_image_url(f"http://images.test:{web.server_port}/ok.png", policy).size == SIZE
    assert asked == ["images.test"] and web.seen[-1] == ("/ok.png", f"images.test:{web.server_port}")


def test_redirects_rechecked(web, local):
    assert "redirected to http://localhost:" in refused(at(web, "/to-localhost"), local)
    assert "host 'localhost' is not an allowed host" in refused(at(web, "/to-localhost"), local)
    assert "host '169.254.169.254' is not an allowed host" in refused(at(web, "/to-metadata"), local)
    both = dataclasses.replace(local, allowed_hosts=("127.0.0.1", "169.254.169.254"))
    assert "169.254.169.254 is a link-local address" in refused(at(web, "/to-metadata"), both)
    assert "only http and https urls can be fetched, not 'file'" in refused(at(web, "/to-file"), local).lower()
    web.seen.clear()
    assert "too many redirects (more than 3, max_redirects)" in refused(at(web, "/loop"), local)
    assert len(web.seen) == 4  # the first request and 3 redirects followed


def test_limits_and_statuses(web, local):
    assert "10,000,000 bytes (content-length), more than the limit of 10,000" in refused(at(web, "/big"), local).lower()
    assert "more than the limit of 10,000 bytes" in refused(at(web, "/big-undeclared"), local)
    assert "http 404 not found" in refused(at(web, "/404"), local).lower()
    assert "(content-type: text/html) is not an image" in refused(at(web, "/html"), local).lower()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = closed.getsockname()[1]
    closed.close()
    assert "cannot fetch the image (connectionrefusederror" in refused(f"http://127.0.0.1:{port}/x.png", local).lower()


@pytest.mark.parametrize("path", ["/slow", "/drip"])
def test_deadline_covers_the_whole_fetch(web, local, path):
    start = time.monotonic()
    assert "timed out after 1 s (url_timeout_s)" in refused(at(web, path), local)
    assert time.monotonic() - start < 3


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 'images.test' (made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    return folder / "cert.pem", folder / "key.pem"


def test_https_verifies_the_name_while_connecting_to_the_checked_address(tls_files, monkeypatch):
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = serve(context)
    try:
        fake_dns(monkeypatch, {"images.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
        policy = MediaPolicy(allow_urls=True, allowed_hosts=("images.test", "other.test"),
                             allowed_networks=("127.0.0.1/32",), url_timeout_s=5.0)
        url = f"https://images.test:{server.server_port}/ok.png"
        assert "certificate verify failed" in refused(url, policy).lower()  # not trusted yet
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's default trust store, read per context
        assert load_image_url(url, policy).size == SIZE
        msg = refused(f"https://other.test:{server.server_port}/ok.png", policy)
        assert "certificate verify failed" in msg.lower() and "other.test" in msg  # wrong name for the cert
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------------------------------
# file:// URLs


@pytest.fixture
def files(tmp_path):
    """root/ with inside.png and a symlink escaping to ../secret.png (a valid image outside)."""
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "inside.png").write_bytes(OK_PNG)
    (tmp_path / "secret.png").write_bytes(OK_PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    return root


def test_file_urls_off_without_root(files):
    assert "file:// urls are disabled" in refused((files / "inside.png").as_uri()).lower()


def test_file_urls_under_root(files):
    policy = MediaPolicy(files_root=files)
    assert load_image_url((files / "inside.png").as_uri(), policy).size == SIZE
    assert load_image_url(f"file://localhost{files}/sub/../inside.png", policy).size == SIZE  # stays inside
    outside = "is outside the folder this server reads images from"
    assert outside in refused("file:///etc/passwd", policy)
    assert outside in refused(f"file://{files}/../secret.png", policy)
    assert outside in refused(f"file://{files}/sub/%2e%2e/%2e%2e/secret.png", policy)
    assert outside in refused((files / "escape.png").as_uri(), policy)
    assert "missing.png: no such file" in refused((files / "missing.png").as_uri(), policy)
    assert "not a regular file" in refused((files / "sub").as_uri(), policy)
    assert "names a host ('example.com')" in refused(f"file://example.com{files}/inside.png", policy)
    assert "is not a usable path" in refused(f"file://{files}/a%00b.png", policy)
    (files / "notes.png").write_text("hello")
    assert "notes.png is not an image" in refused((files / "notes.png").as_uri(), policy)
    small = MediaPolicy(files_root=files, max_image_bytes=100)
    assert "more than the limit of 100 (max_image_bytes)" in refused((files / "inside.png").as_uri(), small)
