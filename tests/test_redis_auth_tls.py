"""Redis with a password, and with TLS (`rediss://`), end to end: a real redis-server
started with `--requirepass` (and, for TLS, `--tls-port` with a throw-away CA made by the
openssl CLI), the gateway on uvicorn, and a real `alto worker` process, both configured
by URL only. A wrong password (or an untrusted server certificate) gives a clear error,
and the password never appears in an HTTP answer, in the gateway's log, or in the
worker's output."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from bench.procs import start_redis, stop_process
from tests.gateway_fixtures import *  # noqa: F403
from tests.gateway_fixtures import REPO, LiveServer, free_port, pipelines
from tests.waiting import eventually_sync
from workers.settings import Settings

pytestmark = pytest.mark.redis

PASSWORD = "Pa55-alto-s3cret-7f3a"  # noqa: S105 - a test server's password
WRONG = "wr0ng-alto-guess-91c2"
ALTO = Path(sys.executable).parent / "alto"
FANOUT = REPO / "tests" / "gateway_pipelines" / "fanout.yaml"


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int
    ca: Path | None = None

    def url(self, password: str, *, tls: bool = False, ca: bool = True) -> str:
        if not tls:
            return f"redis://:{password}@127.0.0.1:{self.port}/0"
        query = f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca}" if ca else ""
        return f"rediss://:{password}@localhost:{self.port}/0{query}"


def _start_redis(port: int, args: list[str], ping: redis.Redis) -> subprocess.Popen[bytes]:
    try:
        return start_redis(port, args=args, client=ping, capture=True)
    except RuntimeError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def password_redis() -> Iterator[RedisServer]:
    port = free_port()
    client = redis.Redis(port=port, password=PASSWORD, socket_timeout=1)
    proc = _start_redis(port, ["--requirepass", PASSWORD], client)
    client.close()
    try:
        yield RedisServer(proc, port)
    finally:
        stop_process(proc)


def _redis_has_tls() -> bool:
    binary = shutil.which("redis-server")
    if binary is None or shutil.which("openssl") is None:
        return False
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    return "libssl" in out


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if not _redis_has_tls():
        pytest.skip("this redis-server is built without TLS (or openssl is missing)")
    d = tmp_path_factory.mktemp("tls")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "1", "-subj", "/CN=alto-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost")
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    port = free_port()
    client = redis.Redis(host="localhost", port=port, password=PASSWORD, ssl=True,
                         ssl_ca_certs=str(d / "ca.crt"), socket_timeout=1)
    proc = _start_redis(
        port,
        ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(d / "server.crt"),
         "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.crt"),
         "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        client,
    )
    client.close()
    try:
        yield RedisServer(proc, port, d / "ca.crt")
    finally:
        stop_process(proc)


def _worker(url: str) -> subprocess.Popen[str]:
    """`alto worker` for the one stage of `fanout`, configured by ALTO_REDIS_URL (not a
    flag: a password on a command line is visible to every user of the machine)."""
    env = {**os.environ, "ALTO_REDIS_URL": url, "ALTO_HEARTBEAT_MS": "100",
           "COLUMNS": "200"}
    return subprocess.Popen(
        [str(ALTO), "worker", "--pipeline", str(FANOUT), "--stage", "fan"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(proc: subprocess.Popen[str], *, terminate: bool) -> tuple[int, str]:
    if terminate and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out


def _gateway(url: str) -> LiveServer:
    from app.main import create_app

    app = create_app(Settings(redis_url=url, run_ttl_s=600), pipelines("fanout"))
    return LiveServer(app).start()


def _end_to_end(url: str, check_ttl: redis.Redis) -> None:
    server = _gateway(url)
    worker = _worker(url)
    try:
        ready = eventually_sync(
            lambda: httpx.get(f"{server.url}/readyz").status_code == 200 or
            worker.poll() is not None, timeout=30)
        assert ready and worker.poll() is None, _finish(worker, terminate=True)[1]
        r = httpx.post(f"{server.url}/v1/pipelines/fanout/runs", json={"input": "w:3"},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["units"] == ["w#0", "w#1", "w#2"]
        run = r.headers["x-alto-run"]
        ttl = check_ttl.ttl(f"alto:run:{run}:events")
        assert 0 < ttl <= 600  # the finished run's state expires
    finally:
        server.stop()
        code, out = _finish(worker, terminate=True)
    assert code == 0, out
    assert PASSWORD not in out


def test_password_url_works_for_gateway_and_worker(password_redis: RedisServer) -> None:
    direct = redis.Redis(port=password_redis.port, password=PASSWORD)
    try:
        _end_to_end(password_redis.url(PASSWORD), direct)
    finally:
        direct.close()


def test_wrong_password_is_a_clear_error_without_the_password(
    password_redis: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    url = password_redis.url(WRONG)
    code, out = _finish(_worker(url), terminate=False)
    assert code == 1
    assert "cannot reach Redis" in out and "AuthenticationError" in out
    assert "***" in out and WRONG not in out and PASSWORD not in out

    caplog.set_level(logging.WARNING)
    server = _gateway(url)
    try:
        r = httpx.post(f"{server.url}/v1/pipelines/fanout/runs", json={"input": "w:1"},
                       timeout=30)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "transport_unavailable" and "AuthenticationError" in err["message"]
        assert "retry-after" in r.headers
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["ping"] is False
        for text in (r.text, ready.text):
            assert WRONG not in text and PASSWORD not in text
    finally:
        server.stop()
    assert "cannot reach Redis at redis://:***@" in caplog.text
    assert WRONG not in caplog.text and PASSWORD not in caplog.text


def test_tls_url_works_for_gateway_and_worker(tls_redis: RedisServer) -> None:
    direct = redis.Redis(host="localhost", port=tls_redis.port, password=PASSWORD, ssl=True,
                         ssl_ca_certs=str(tls_redis.ca))
    try:
        _end_to_end(tls_redis.url(PASSWORD, tls=True), direct)
    finally:
        direct.close()


def test_tls_without_a_trusted_ca_is_refused_clearly(tls_redis: RedisServer) -> None:
    """The server's certificate is verified: without the CA that signed it the worker
    refuses to talk (and says why), and a plain-text client cannot talk to the TLS port."""
    code, out = _finish(_worker(tls_redis.url(PASSWORD, tls=True, ca=False)), terminate=False)
    assert code == 1 and "cannot reach Redis" in out
    assert "certificate" in out.lower() and PASSWORD not in out
    plain = f"redis://:{PASSWORD}@127.0.0.1:{tls_redis.port}/0"
    code, out = _finish(_worker(plain), terminate=False)
    assert code == 1 and "cannot reach Redis" in out and PASSWORD not in out


@pytest.mark.parametrize("url", [
    "redis://:Ab/c@d#e@127.0.0.1:16392/0",  # / and # end urlsplit's netloc early
    "redis://:sec#ret@127.0.0.1:16392/0",
    "rediss://user:se?cret@h:6379/0",
    "redis://user:12/x@host:6379/0",  # `user:12` reads as a well-formed host and port
    "rediss://user:12#x@host:6379/0",
])
def test_a_password_urlsplit_cannot_read_is_masked_too(url: str) -> None:
    """A Secret's raw password pasted into the URL (the chart's $(REDIS_PASSWORD)) with an
    unencoded /, ? or #: the password looked like host or path to urlsplit and was
    printed in clear by every 'invalid ALTO_REDIS_URL' message (QA)."""
    from workers.redact import redact_url

    shown = redact_url(url)
    secret = url.split("://", 1)[1].rpartition("@")[0]
    assert secret not in shown and "***" in shown
    assert shown.endswith(url.rpartition("@")[2])  # the host stays readable


def test_an_unparseable_password_is_masked_in_cli_errors() -> None:
    url = "redis://:Ab/c@d#e@127.0.0.1:16392/0"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "status", "-p",
                           str(REPO / "tests" / "toy" / "dead.yaml"), "--redis-url", url],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Ab/c@d#e" not in out and "Ab" not in out.split("@")[0]


@pytest.mark.parametrize(("url", "shown"), [
    # an @ in the path or query of a well-formed URL is no user info (a reviewer's table)
    ("http://host/p?next=user@example.com&api_key=SECRET",
     "http://host/p?next=user@example.com&api_key=***"),
    ("https://x.openai.azure.com/openai/deployments/d@v1/chat?api-key=SECRET",
     "https://x.openai.azure.com/openai/deployments/d@v1/chat?api-key=***"),
    ("redis://host:6379/0?x=a@b", "redis://host:6379/0?x=a@b"),
    ("http://host/path@foo", "http://host/path@foo"),
    ("redis://user:pa/ss@[::1]:6379/0", "redis://***@[::1]:6379/0"),
    # a broken user info, and a secret in the query behind it: both masked
    ("redis://:p/w@host/0?password=S3CRET", "redis://***@host/0?password=***"),
    # a password whose part before the / is all digits: `user:12` looks like host:port
    ("redis://user:12/x@host:6379/0", "redis://***@host:6379/0"),
    ("redis://user:12/x@host:6379/0?api_key=K", "redis://***@host:6379/0?api_key=***"),
])
def test_redaction_of_urls_with_an_at_sign(url: str, shown: str) -> None:
    from workers.redact import redact_url

    assert redact_url(url) == shown
