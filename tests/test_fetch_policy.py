"""The media URI policy: schemes, confined roots, hosts, addresses, redirects, caps.

http tests talk only to a server on 127.0.0.1 started here; nothing leaves the machine.
"""
from __future__ import annotations

import http.server
import os
import threading
import time

import pytest

from encoders.media import FetchPolicy, MediaError, check_address, fetch_bytes
from pipeline.config import catalog_root
from schemas.dead_letter import Reason


def _reason(uri, policy):
    with pytest.raises(MediaError) as err:
        fetch_bytes(uri, policy)
    return err.value.reason


@pytest.fixture()
def tree(tmp_path):
    """root/ (allowed) with a file, a subfolder, a symlink out, a FIFO; outside/ with a secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "ok.bin").write_bytes(b"fine")
    (outside / "secret.txt").write_bytes(b"secret")
    os.symlink(outside / "secret.txt", root / "link.jpg")
    os.symlink(root / "sub" / "ok.bin", root / "inner-link.bin")
    os.mkfifo(root / "pipe.jpg")
    return root, outside, FetchPolicy(allowed_roots=(str(root),))


def test_confined_local_reads(tree):
    root, _, policy = tree
    assert fetch_bytes(str(root / "sub" / "ok.bin"), policy) == b"fine"
    assert fetch_bytes("file://" + str(root / "sub" / "ok.bin"), policy) == b"fine"
    assert fetch_bytes(str(root / "inner-link.bin"), policy) == b"fine"  # a link that stays inside is fine


@pytest.mark.parametrize("rel", ["sub/../../outside/secret.txt", "link.jpg", "../outside/secret.txt"])
def test_traversal_and_symlink_escapes_are_forbidden(tree, rel):
    root, _, policy = tree
    assert _reason(os.path.join(str(root), rel), policy) is Reason.FORBIDDEN_URI


def test_absolute_path_outside_roots_and_etc_passwd(tree):
    _, outside, policy = tree
    assert _reason(str(outside / "secret.txt"), policy) is Reason.FORBIDDEN_URI
    assert _reason("/etc/passwd", policy) is Reason.FORBIDDEN_URI
    assert _reason("file:///etc/passwd", policy) is Reason.FORBIDDEN_URI


def test_fifo_is_refused_without_blocking(tree):
    root, _, policy = tree
    start = time.monotonic()
    assert _reason(str(root / "pipe.jpg"), policy) is Reason.FORBIDDEN_URI
    assert time.monotonic() - start < 2


def test_root_prefix_is_not_a_string_prefix(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root-evil").mkdir()
    (tmp_path / "root-evil" / "x.bin").write_bytes(b"x")
    policy = FetchPolicy(allowed_roots=(str(tmp_path / "root"),))
    assert _reason(str(tmp_path / "root-evil" / "x.bin"), policy) is Reason.FORBIDDEN_URI


def test_schemes():
    assert _reason("ftp://host/a.jpg", FetchPolicy()) is Reason.FORBIDDEN_URI
    assert _reason("s3://bucket/a.jpg", FetchPolicy(allowed_schemes=("file",))) is Reason.FORBIDDEN_URI
    assert _reason("/etc/hostname", FetchPolicy(allowed_schemes=("gs",))) is Reason.FORBIDDEN_URI
    assert _reason("https://example.invalid/a.jpg", FetchPolicy()) is Reason.FORBIDDEN_URI  # http off


def test_remote_roots_and_dotdot():
    policy = FetchPolicy(allowed_roots=("gs://bucket/catalog",))
    assert _reason("gs://bucket/catalog/../private/a.jpg", policy) is Reason.FORBIDDEN_URI
    assert _reason("gs://bucket/catalog-other/a.jpg", policy) is Reason.FORBIDDEN_URI
    assert _reason("gs://other/a.jpg", policy) is Reason.FORBIDDEN_URI


@pytest.mark.parametrize("kwargs, match", [
    ({"allowed_schemes": ("https",)}, "allow_http"),
    ({"allowed_schemes": ("GS",)}, "lower-case"),
    ({"allowed_roots": ("/data/../etc",)}, "'..'"),
    ({"allowed_hosts": ("evil.com/x",)}, "host name"),
    ({"max_bytes": 0}, "positive"),
])
def test_policy_validation_names_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FetchPolicy(**kwargs)


def test_default_root_is_the_catalog_folder_tree():
    assert catalog_root("/data/cat/*.parquet") == "/data/cat"
    assert catalog_root("/data/cat/part-*.parquet") == "/data/cat"
    assert catalog_root("/data/**/x.parquet") == "/data"
    assert catalog_root("gs://b/cat/x.parquet") == "gs://b/cat"
    assert FetchPolicy().with_default_root("/x").allowed_roots == ("/x",)
    assert FetchPolicy(allowed_roots=("/y",)).with_default_root("/x").allowed_roots == ("/y",)


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.5", "169.254.1.1", "::1",
                                "fe80::1", "fc00::1", "100.64.0.1", "0.0.0.0", "::ffff:127.0.0.1"])
def test_non_global_addresses_are_refused(ip):
    with pytest.raises(MediaError) as err:
        check_address(ip, FetchPolicy(allow_http=True), "http://x/")
    assert err.value.reason is Reason.FORBIDDEN_URI


@pytest.mark.parametrize("ip", ["169.254.169.254", "fd00:ec2::254", "100.100.100.200"])
def test_metadata_endpoints_are_refused_even_when_private_is_allowed(ip):
    with pytest.raises(MediaError, match="metadata"):
        check_address(ip, FetchPolicy(allow_http=True, allow_private_hosts=True), "http://x/")


def test_public_address_passes():
    check_address("93.184.216.34", FetchPolicy(allow_http=True), "http://x/")  # no connection is made


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        if status == "slow":
            self.send_response(200)
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
            return
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the client hanging up on /slow is the point of that test


@pytest.fixture()
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.routes = {
        "/a.jpg": (200, {}, b"image bytes"),
        "/big.jpg": (200, {}, b"y" * 5000),
        "/to-a": (302, {"Location": "/a.jpg"}, b""),
        "/to-metadata": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/to-other-host": (301, {"Location": "http://localhost:1/x.jpg"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/slow": ("slow", {}, b""),
        "/gone": (410, {}, b""),
        "/error": (500, {}, b""),
    }
    yield base
    httpd.shutdown()
    httpd.server_close()


def _local_http(**kw):
    return FetchPolicy(allow_http=True, allow_private_hosts=True, timeout_s=5, **kw)


def test_http_to_loopback_needs_allow_private_hosts(server):
    assert _reason(f"{server}/a.jpg", FetchPolicy(allow_http=True)) is Reason.FORBIDDEN_URI
    assert fetch_bytes(f"{server}/a.jpg", _local_http()) == b"image bytes"


def test_http_redirects_are_followed_and_rechecked(server):
    assert fetch_bytes(f"{server}/to-a", _local_http()) == b"image bytes"
    assert _reason(f"{server}/to-metadata", _local_http()) is Reason.FORBIDDEN_URI
    assert _reason(f"{server}/to-file", _local_http()) is Reason.FORBIDDEN_URI
    only_ip = _local_http(allowed_hosts=("127.0.0.1",))
    assert fetch_bytes(f"{server}/to-a", only_ip) == b"image bytes"
    assert _reason(f"{server}/to-other-host", only_ip) is Reason.FORBIDDEN_URI
    assert _reason(f"{server}/loop", _local_http()) is Reason.FETCH_FAILED


def test_http_host_list_is_checked_before_any_lookup():
    policy = FetchPolicy(allow_http=True, allowed_hosts=(".media.example",))
    assert _reason("https://evil.example.net/a.jpg", policy) is Reason.FORBIDDEN_URI
    assert _reason("https://user:pw@cdn.media.example/a.jpg", policy) is Reason.FORBIDDEN_URI


def test_http_status_caps_and_timeouts(server):
    assert _reason(f"{server}/nope", _local_http()) is Reason.MISSING_MEDIA
    assert _reason(f"{server}/gone", _local_http()) is Reason.MISSING_MEDIA
    assert _reason(f"{server}/error", _local_http()) is Reason.FETCH_FAILED
    assert _reason(f"{server}/big.jpg", _local_http(max_bytes=1000)) is Reason.TOO_LARGE
    # 50 bytes trickled over 2.5 s: each read is quick, the whole fetch is not
    policy = FetchPolicy(allow_http=True, allow_private_hosts=True, timeout_s=0.5)
    start = time.monotonic()
    assert _reason(f"{server}/slow", policy) is Reason.FETCH_TIMEOUT
    assert time.monotonic() - start < 2.0


def test_http_connection_refused_is_fetch_failed():
    assert _reason("http://127.0.0.1:1/a.jpg", _local_http()) is Reason.FETCH_FAILED


@pytest.mark.parametrize("uri", ["javascript:alert(1)", "data:image/png;base64,iVBORw0KGgo=", "mailto:a@b.example",
                                 "JavaScript:void(0)", "vbscript:msgbox", "ftp:a.jpg", "img:1.jpg"])
def test_unknown_schemes_are_forbidden_never_relative_paths(tmp_path, uri):
    from encoders.media import resolve_uri, uri_scheme

    assert uri_scheme(uri) == uri.split(":", 1)[0].lower()
    assert resolve_uri(uri, str(tmp_path)) == uri  # never joined to the catalog folder
    (tmp_path / uri.split("/")[-1]).touch()  # even a same-named local file is not read
    policy = FetchPolicy(allowed_roots=(str(tmp_path),))
    with pytest.raises(MediaError) as e:
        fetch_bytes(resolve_uri(uri, str(tmp_path)), policy)
    assert e.value.reason is Reason.FORBIDDEN_URI and "allowed schemes" in e.value.detail


def test_plain_paths_and_file_uris_have_no_foreign_scheme(tmp_path):
    from encoders.media import resolve_uri, uri_scheme

    assert uri_scheme("images/a.jpg") == "" and uri_scheme("/abs/a:b.jpg") == "" and uri_scheme("./x:1.jpg") == ""
    assert uri_scheme("C:/a.jpg") == ""  # one letter is a drive, not a scheme
    (tmp_path / "x:1.jpg").write_bytes(b"ok")
    policy = FetchPolicy(allowed_roots=(str(tmp_path),))
    assert fetch_bytes(resolve_uri("./x:1.jpg", str(tmp_path)), policy) == b"ok"
    assert fetch_bytes("file:" + str(tmp_path / "x:1.jpg"), policy) == b"ok"
    assert fetch_bytes("file://" + str(tmp_path / "x:1.jpg"), policy) == b"ok"


@pytest.fixture(params=["libc", "python"])
def resolver(request, monkeypatch):
    """real_path through realpath(3), and through its os.path.realpath fallback."""
    from encoders import media

    if request.param == "python":
        monkeypatch.setattr(media, "_C_REALPATH", None)
    elif media._C_REALPATH is None:
        pytest.skip("no realpath(3) in this C library")
    return media.real_path


def test_real_path_is_os_path_realpath_in_every_case(tree, resolver, monkeypatch):
    root, outside, _ = tree
    os.symlink(root / "loop-a", root / "loop-b")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(outside, root / "out-dir")
    monkeypatch.chdir(root / "sub")
    cases = [str(root / "sub" / "ok.bin"), str(root / "link.jpg"), str(root / "inner-link.bin"),
             str(root / "out-dir" / "secret.txt"), str(root / "out-dir" / ".." / "sub" / "ok.bin"),
             str(root / "sub" / ".." / ".." / "outside" / "secret.txt"), str(root / "missing" / "x.jpg"),
             str(root / "loop-a"), str(root / "loop-a" / "x.jpg"), "ok.bin", "../link.jpg", ".", "/",
             str(root / "sub" / "ok.bin") + "/", str(root) + "//sub/./ok.bin", "caf\u00e9/\udcff.jpg"]
    for path in cases:
        assert resolver(path) == os.path.realpath(path), path
    with pytest.raises(ValueError):  # a NUL byte is not cut off silently: the path is refused as before
        resolver(str(root / "sub" / "ok.bin") + "\0../../outside/secret.txt")


def test_policy_holds_with_either_resolver(tree, resolver):
    root, outside, policy = tree
    assert fetch_bytes(str(root / "inner-link.bin"), policy) == b"fine"
    for rel in ("sub/../../outside/secret.txt", "link.jpg", "../outside/secret.txt"):
        assert _reason(os.path.join(str(root), rel), policy) is Reason.FORBIDDEN_URI
    assert _reason(str(outside / "secret.txt"), policy) is Reason.FORBIDDEN_URI
    assert _reason(str(root / "missing.jpg"), policy) is Reason.MISSING_MEDIA
