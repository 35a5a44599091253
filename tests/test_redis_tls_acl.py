"""Redis with TLS and an ACL user, for the directory and the page tier, against a real
redis-server the test starts with TLS only, the default user off and one ACL user
(certificates made with `cryptography`). Misconfiguration is a clear, typed error at
start; the factory then serves with the in-process directory."""

from __future__ import annotations

import hashlib
import logging
import time

import pytest
from redis_fixtures import TLS_PASSWORD, TLS_USER, tls_redis  # noqa: F401 - fixture

from symram_vllm.directory import EmbeddedDirectory, make_directory, open_fleet_directory
from symram_vllm.directory.redis_directory import RedisDirectory, RedisDirectoryOptions
from symram_vllm.directory.redis_settings import RedisSettings
from symram_vllm.keys import BlockKey
from symram_vllm.redis_link import LinkOptions, RedisAuthError, RedisLink, RedisTLSError
from symram_vllm.tiers.redis_tier import RedisPageTier, RedisPageTierOptions

pytestmark = pytest.mark.timeout(60)

SIG = hashlib.blake2b(b"tls-signature", digest_size=32).digest()


def chain(i: int) -> bytes:
    return hashlib.blake2b(f"tls/{i}".encode(), digest_size=32).digest()


# 2 s timeouts (the product's redis.socket_timeout_s): a TLS handshake and AUTH from a
# busy host must not read as an outage (or a timeout where an auth error is expected).
ROOMY = {"socket_timeout_s": 2.0, "connect_timeout_s": 2.0}


def secure(server, **overrides) -> LinkOptions:
    kw = {"tls_ca_file": str(server.certs["ca"]), "username": TLS_USER, "password": TLS_PASSWORD,
          **ROOMY}
    kw.update(overrides)
    return LinkOptions(**kw)


def directory(server, link: LinkOptions, url: str | None = None) -> RedisDirectory:
    return RedisDirectory(url or server.url, namespace=SIG, instance_id="a",
                          options=RedisDirectoryOptions(link=link))


def test_directory_over_tls_with_an_acl_user(tls_redis):  # noqa: F811
    d = directory(tls_redis, secure(tls_redis))
    try:
        keys = [chain(i) for i in range(6)]
        d.add(keys[:4], "dram")
        assert d.longest_prefix(keys) == 4
        assert d.stats()["available"] == 1.0
    finally:
        d.close()


def test_credentials_and_ca_in_the_url(tls_redis):  # noqa: F811
    url = (f"rediss://{TLS_USER}:{TLS_PASSWORD}@127.0.0.1:{tls_redis.port}/0"
           f"?ssl_ca_certs={tls_redis.certs['ca']}")
    # Credentials and CA from the URL alone; only the timeouts from options.
    d = RedisDirectory(url, namespace=SIG, instance_id="b",
                       options=RedisDirectoryOptions(link=LinkOptions(**ROOMY)))
    try:
        d.add([chain(100)], "dram")
        assert d.longest_prefix([chain(100)]) == 1
    finally:
        d.close()


def test_wrong_password_is_a_clear_error_at_start(tls_redis):  # noqa: F811
    start = time.monotonic()
    with pytest.raises(RedisAuthError) as err:
        RedisLink(tls_redis.url, options=secure(tls_redis, password="wrong-password"))
    assert time.monotonic() - start < 2.0
    message = str(err.value)
    assert "rejected symram's credentials" in message and "redis.password" in message
    assert "wrong-password" not in message
    assert isinstance(err.value, ValueError)  # callers that catch ValueError turn it off


def test_no_credentials_is_an_auth_error(tls_redis):  # noqa: F811
    with pytest.raises(RedisAuthError):
        RedisLink(tls_redis.url, options=secure(tls_redis, username=None, password=None))


def test_untrusted_server_certificate_is_a_tls_error(tls_redis):  # noqa: F811
    with pytest.raises(RedisTLSError, match="tls_ca_file"):
        RedisLink(tls_redis.url,
                  options=secure(tls_redis, tls_ca_file=str(tls_redis.certs["other_ca"])))


def test_plain_text_to_a_tls_port_is_not_mistaken_for_a_working_redis(tls_redis):  # noqa: F811
    link = RedisLink(f"redis://127.0.0.1:{tls_redis.port}/0",
                     options=LinkOptions(socket_timeout_s=0.3, connect_timeout_s=0.3,
                                         username=TLS_USER, password=TLS_PASSWORD))
    try:
        assert not link.available  # an outage (breaker open), never "connected"
    finally:
        link.close()


def test_factory_serves_without_the_directory_on_a_wrong_password(tls_redis, caplog):  # noqa: F811
    options = RedisDirectoryOptions(link=secure(tls_redis, password="nope-nope"))
    with caplog.at_level(logging.ERROR, logger="symram_vllm.directory"):
        d = make_directory(tls_redis.url, namespace=SIG, instance_id="a", options=options)
    assert isinstance(d, EmbeddedDirectory)
    assert any("shared directory off" in r.getMessage() and "credentials" in r.getMessage()
               for r in caplog.records)
    assert all("nope-nope" not in r.getMessage() for r in caplog.records)


def test_settings_section_drives_tls_and_acl(tls_redis):  # noqa: F811
    settings = RedisSettings(tls_ca_file=tls_redis.certs["ca"], username=TLS_USER,
                             password=TLS_PASSWORD, socket_timeout_s=2.0, connect_timeout_s=2.0)
    d = open_fleet_directory(tls_redis.url, namespace=SIG, instance_id="c", settings=settings)
    try:
        assert d.inner.shared and isinstance(d.inner, RedisDirectory)
        d.register([chain(7)], "dram")
        d.end_step()
        deadline = time.monotonic() + 10
        while d.inner.longest_prefix([chain(7)]) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        d.close()
    assert "s3cret" not in repr(settings)  # a SecretStr never shows in logs or dumps


def test_page_tier_over_tls_with_an_acl_user(tls_redis):  # noqa: F811
    options = RedisPageTierOptions(link=secure(tls_redis))
    tier = RedisPageTier(tls_redis.url, namespace=SIG, capacity_bytes=1 << 20, options=options)
    try:
        key = BlockKey(chain(1), 0)
        assert tier.set(key, b"x" * 1000)
        assert tier.get(key) == b"x" * 1000
    finally:
        tier.close()


def test_page_tier_with_a_wrong_password_fails_at_start(tls_redis):  # noqa: F811
    options = RedisPageTierOptions(link=secure(tls_redis, password="bad-bad-bad"))
    with pytest.raises(RedisAuthError):
        RedisPageTier(tls_redis.url, namespace=SIG, capacity_bytes=1 << 20, options=options)


def test_settings_reject_missing_tls_files(tmp_path):
    with pytest.raises(ValueError, match="tls_ca_file"):
        RedisSettings(tls_ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="go together"):
        RedisSettings(tls_cert_file=tmp_path / "c.pem")


def test_settings_pass_the_client_certificate_and_hostname_check_to_the_link(tmp_path):
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_text("cert")
    key.write_text("key")
    with pytest.raises(ValueError, match="go together"):
        RedisSettings(tls_key_file=key)
    link = RedisSettings(tls_cert_file=cert, tls_key_file=key,
                         tls_check_hostname=False).link_options()
    assert (link.tls_cert_file, link.tls_key_file) == (str(cert), str(key))
    assert link.tls_check_hostname is False
    assert RedisSettings().link_options().tls_check_hostname is True


def test_settings_check_ttls_and_build_every_option_object():
    with pytest.raises(ValueError, match="fleet_answer_ttl_s"):
        RedisSettings(lease_ttl_s=1, fleet_answer_ttl_s=2)
    with pytest.raises(ValueError, match="entry_ttl_s"):
        RedisSettings(lease_ttl_s=100, entry_ttl_s=10)
    with pytest.raises(ValueError, match="extra"):
        RedisSettings(pasword="typo")  # type: ignore[call-arg]
    s = RedisSettings(cluster=True, pool_size=3, lease_ttl_s=12, batch_interval_s=0.01)
    assert s.link_options().cluster and s.link_options().pool_size == 3
    assert s.link_options(pages=True).socket_timeout_s == s.page_timeout_s
    assert s.directory_options().lease_ttl_s == 12 == s.async_options().lease_ttl_s
    assert s.async_options().interval_s == 0.01
