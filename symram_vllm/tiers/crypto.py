"""Encryption and authentication of pages at rest: AES-256-GCM, keys from HKDF.

KV pages are the prompt in another encoding (matching layer-0 V against the public
weights recovers the tokens), so a page on disk or in Redis is as sensitive as the
prompt, and a page that decrypts is trusted to be the KV of its key. Hence an AEAD,
not a checksum: a page is sealed with

* a data key derived with HKDF-SHA256 from the master key and the tier namespace
  (the model signature digest), so pages of another model never open;
* a fresh 96-bit random nonce per write (2^32 writes per data key keep the chance of
  a nonce collision under 2^-32: at 500 writes a second that is 270 years);
* associated data that binds the page to its chain key, rank, position, codec and
  lengths (``page_format.sealed_aad``, ``redis_tier``), so a page copied or renamed to
  another block's key, or re-headed with recomputed checksums, fails to open.

Tenants: vLLM folds a request's ``cache_salt`` into the first block hash, so the
chain key of every page already depends on the tenant's salt, and the AAD binds a
page to its chain key: tenant B's request can never be served tenant A's page. Data
keys are per namespace, not per salt, because the tiers see only chain keys
(``docs/security.md`` says what that means for an attacker).

The key id (8 bytes of HKDF output, not the key) is stored in each page header, so a
page written under another master key is recognised as such (a miss) instead of
being reported as forged.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

logger = logging.getLogger(__name__)

EncryptionMode = Literal["off", "optional", "required"]
KEY_ENV = "SYMRAM_ENCRYPTION_KEY"
MASTER_KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
_INFO_DATA = b"symram pages v1\0"
_INFO_KEY_ID = b"symram key id v1"


class EncryptionConfigError(ValueError):
    """The encryption settings cannot be honoured; the message names the input and fix."""


class PageAuthError(ValueError):
    """A sealed page did not open: forged, damaged, or sealed for another key."""


def _hkdf(master: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(master)


class PageCipher:
    """AES-256-GCM under one namespace's data key.

    ``required``: plaintext pages are refused (``encryption: required``); otherwise
    they are still read (``optional``, for pages written before a key was set).
    """

    def __init__(self, master_key: bytes, namespace: bytes, *, required: bool = False) -> None:
        if len(master_key) != MASTER_KEY_BYTES:
            raise EncryptionConfigError(
                f"the encryption master key must be {MASTER_KEY_BYTES} bytes, got "
                f"{len(master_key)}"
            )
        self.required = required
        self.key_id = _hkdf(master_key, _INFO_KEY_ID, KEY_ID_BYTES)
        self._aead = AESGCM(_hkdf(master_key, _INFO_DATA + bytes(namespace), MASTER_KEY_BYTES))

    @staticmethod
    def new_nonce() -> bytes:
        return os.urandom(NONCE_BYTES)

    def seal_into(self, nonce: bytes, aad: bytes, plaintext: memoryview, out: memoryview) -> None:
        """Write ciphertext || tag (len(plaintext) + TAG_BYTES bytes) into `out`."""
        self._aead.encrypt_into(nonce, plaintext, aad, out[: plaintext.nbytes + TAG_BYTES])

    def open_into(self, nonce: bytes, aad: bytes, sealed: memoryview, out: memoryview) -> None:
        """Decrypt ciphertext || tag into `out` (len(sealed) - TAG_BYTES bytes); raises
        PageAuthError if the page does not authenticate (`out` is then garbage)."""
        try:
            self._aead.decrypt_into(nonce, sealed, aad, out[: sealed.nbytes - TAG_BYTES])
        except InvalidTag:
            raise PageAuthError("the page does not authenticate under this key") from None

    def seal(self, nonce: bytes, aad: bytes, plaintext: memoryview) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, aad: bytes, sealed: memoryview) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise PageAuthError("the page does not authenticate under this key") from None


def parse_master_key(text: bytes, source: str) -> bytes:
    """A 32-byte key given raw, as 64 hex digits, or as base64 (whitespace ignored)."""
    if len(text) == MASTER_KEY_BYTES:
        return text
    compact = b"".join(text.split())
    if len(compact) == 2 * MASTER_KEY_BYTES:
        try:
            return binascii.unhexlify(compact)
        except binascii.Error:
            pass
    try:
        decoded = base64.b64decode(compact, validate=True)
    except binascii.Error:
        decoded = b""
    if len(decoded) == MASTER_KEY_BYTES:
        return decoded
    raise EncryptionConfigError(
        f"{source} does not hold a {MASTER_KEY_BYTES}-byte key (give 64 hex digits, base64 "
        f"of 32 bytes, or 32 raw bytes); make one with "
        f"`python -c 'import os; print(os.urandom(32).hex())'`"
    )


def read_key_file(path: Path) -> bytes:
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise EncryptionConfigError(
            f"encryption_key_file {path} cannot be read ({exc}); fix the path or its "
            "permissions"
        ) from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "symram: encryption key file %s is readable by group or others (mode %o); "
            "chmod 600 it", path, stat.S_IMODE(st.st_mode),
        )
    return parse_master_key(data, f"encryption_key_file {path}")


def master_key(key_file: Path | None, key: str | None) -> bytes | None:
    """The master key from a file (preferred) or a value (the config's ``encryption_key``,
    normally set through $SYMRAM_ENCRYPTION_KEY); None when neither is set."""
    if key_file is not None:
        return read_key_file(Path(key_file))
    if key:
        return parse_master_key(key.encode(), f"${KEY_ENV} (encryption_key)")
    return None


def page_cipher(
    mode: EncryptionMode, key_file: Path | None, key: str | None, namespace: bytes
) -> PageCipher | None:
    """The cipher the tiers use for `namespace`, or None for plaintext pages.

    Raises EncryptionConfigError when the settings cannot be honoured: ``required``
    without a key, or a key that is named but unreadable or malformed (starting with
    plaintext pages instead would be a silent downgrade)."""
    if mode == "off":
        return None
    found = master_key(key_file, key)
    if found is None:
        if mode == "required":
            raise EncryptionConfigError(
                "encryption is 'required' but no key is configured: set encryption_key_file "
                f"(a file holding 32 random bytes, hex or base64) or ${KEY_ENV}, or set "
                "encryption to 'optional' or 'off'"
            )
        logger.info("symram: no encryption key set; pages at rest are plaintext (files 0600)")
        return None
    return PageCipher(found, namespace, required=mode == "required")
