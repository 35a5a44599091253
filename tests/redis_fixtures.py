"""Real Redis servers for tests, on free 127.0.0.1 ports, nothing persisted, killed at
teardown. The `redis_server` fixture in conftest.py wraps `RedisServer`; tests that
need an outage call `kill()` and `restart()` (same port, empty data).

Fixtures defined here (import them into a test module): `redis_cluster`, one
3-master + 3-replica Redis Cluster per session (`loadtest/redis_cluster.py`), and
`tls_redis`, a TLS-only server with an ACL user and the default user off."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadtest.redis_cluster import RedisClusterServers, answers_ping
from symram_vllm.serving.engine_process import free_port

START_TIMEOUT_S = 10.0


def key(i: int, salt: str = "") -> bytes:
    """A chain key (32 bytes) for tests: the i-th of a `salt` family."""
    return hashlib.blake2b(f"{salt}/{i}".encode(), digest_size=32).digest()


def keys(n: int, salt: str = "", start: int = 0) -> list[bytes]:
    return [key(i, salt) for i in range(start, start + n)]


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0,
               step: float = 0.005) -> bool:
    """Poll `predicate` until true or `timeout`; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir = workdir
        self.binary = binary
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> RedisServer:
        """Start on `port` (a fresh free one by default); retried once on a port race."""
        for attempt in range(3):
            self.port = port or free_port()
            cmd = [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--protected-mode", "yes", "--loglevel", "warning",
            ]
            with self.log.open("ab") as log:
                self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and self.process.poll() is None:
                if answers_ping(self.port):
                    return self
                time.sleep(0.02)
            self.kill()
            if port is not None and attempt == 0:
                time.sleep(0.5)  # the old socket may still be closing
        raise RuntimeError(f"redis-server did not start; log: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: the abrupt outage (no shutdown, no reply to in-flight commands)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> RedisServer:
        """Kill (if running) and start again on the same port, with no data."""
        self.kill()
        return self.start(self.port)


# -- TLS + ACL -------------------------------------------------------------------------------
TLS_USER = "symram"
TLS_PASSWORD = "s3cret-symram-pass"


def make_test_certificates(workdir: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost (and an unrelated CA),
    generated with `cryptography`; returns their PEM paths."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("symram test CA")
    _, other_cert = ca("some other CA")
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(name("localhost")).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = {
        "ca": workdir / "ca.pem", "other_ca": workdir / "other-ca.pem",
        "cert": workdir / "server.pem", "key": workdir / "server.key",
    }
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["other_ca"].write_bytes(other_cert.public_bytes(pem))
    paths["cert"].write_bytes(server_cert.public_bytes(pem))
    write_key(server_key, paths["key"])
    return paths


class TLSRedisServer(RedisServer):
    """redis-server speaking only TLS, with the default user off and one ACL user
    (TLS_USER / TLS_PASSWORD) allowed everything."""

    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__(workdir, binary)
        self.certs = make_test_certificates(workdir)

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> TLSRedisServer:
        import redis

        self.port = port or free_port()
        c = self.certs
        cmd = [
            self.binary, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(c["cert"]), "--tls-key-file", str(c["key"]),
            "--tls-ca-cert-file", str(c["ca"]), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
            "--loglevel", "warning",
            "--user", "default", "off",
            "--user", TLS_USER, "on", f">{TLS_PASSWORD}", "~*", "&*", "+@all",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, ssl=True,
                             ssl_ca_certs=str(c["ca"]), username=TLS_USER,
                             password=TLS_PASSWORD, socket_timeout=0.5,
                             socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.02)
        finally:
            client.close()
        self.kill()
        raise RuntimeError(f"TLS redis-server did not start; log: {self.log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterServers]:
    """One real 3-master + 3-replica Redis Cluster for the whole session."""
    binary, cli = redis_server_binary(), shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("redis-server / redis-cli are not installed (apt-get install redis-server)")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"), binary, cli).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory) -> Iterator[TLSRedisServer]:
    """A real redis-server speaking TLS only, with an ACL user and the default user off."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = TLSRedisServer(tmp_path_factory.mktemp("tls-redis"), binary).start()
    try:
        yield server
    finally:
        server.kill()
