"""https downloads against a local TLS server whose certificate comes from a throw-away CA (trustme).

The same request handler as tests/fetch_server.py, served over TLS: the certificate is checked (an unknown CA is
a ``tls_error``, never retried), connections are kept alive, redirects between https and http are re-checked,
and the size cap and magic-byte checks hold over TLS as over plain http.
"""

from __future__ import annotations

import ssl
import threading
from pathlib import Path

import pytest
from fetch_server import CAP, Server, _image_bytes, _QuietServer, _State

from ccclip_widgets.fetch import Fetcher

trustme = pytest.importorskip("trustme")


class _TLSServer(_QuietServer):
    def __init__(self, context: ssl.SSLContext, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.context = context

    def get_request(self):  # handshake in the handler thread, so a refused certificate blocks nothing
        sock, addr = super().get_request()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def _tls(ca) -> Server:
    from fetch_server import _Handler

    class Handler(_Handler):
        def setup(self) -> None:
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError):
                self.request.close()
                raise
            super().setup()

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    httpd = _TLSServer(context, ("127.0.0.1", 0), Handler)
    httpd.state = _State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield Server(f"https://127.0.0.1:{httpd.server_address[1]}", httpd.state)  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def tls(_tls: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    _tls.state.reset()
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "CCCLIP_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return _tls


def _fetcher(tmp_path: Path, **kw) -> Fetcher:
    options = {"cache": tmp_path / "dl", "timeout": 5.0, "retries": 1, "backoff": 0.01, "max_bytes": CAP}
    return Fetcher(**{**options, **kw})


def test_https_downloads_verify_the_certificate_and_keep_connections_alive(
    tls: Server, ca_file: Path, tmp_path: Path
) -> None:
    with _fetcher(tmp_path, ca_certs=ca_file, workers=1) as f:
        results = f.fetch_many([tls.url(f"/good/t{i}.jpg") for i in range(4)], show_progress=False)
    for url, result in results.items():
        assert result.ok, result.detail
        assert result.path.read_bytes() == _image_bytes(url.rsplit("/", 1)[1])[0]
    assert tls.state.connections == 1  # one TLS handshake for four images


def test_an_untrusted_certificate_is_a_tls_error_and_not_retried(tls: Server, tmp_path: Path) -> None:
    with _fetcher(tmp_path, retries=3) as f:  # the system's CAs do not know the test CA
        result = f.fetch(tls.url("/good/untrusted.jpg"))
    assert result.reason == "tls_error" and result.attempts == 1, result.detail
    assert "certificate" in result.detail and tls.url("/good/untrusted.jpg") in result.detail
    assert tls.state.total == 0  # no request was sent over the unverified connection
    assert f.cache.lookup(tls.url("/good/untrusted.jpg")) is None


def test_https_bad_answers_keep_their_reasons(tls: Server, ca_file: Path, tmp_path: Path) -> None:
    with _fetcher(tmp_path, ca_certs=ca_file) as f:
        assert f.fetch(tls.url("/redirect.jpg")).final_url == tls.url("/good/redirected.jpg")
        assert f.fetch(tls.url("/endless.jpg")).reason == "too_large_image"
        assert f.fetch(tls.url("/fake.jpg")).reason == "not_an_image"
        assert f.fetch(tls.url("/to-file.jpg")).reason == "unsupported_url_scheme"
        assert f.fetch(tls.url("/flaky.jpg")).attempts == 2
    assert tls.state.endless_closed.wait(10), "the client kept reading the endless body over TLS"
