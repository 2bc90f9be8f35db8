"""How the ledger keeps numbers out of a dump: a keyed hash to look them up, encryption to
get them back.

``BLOCKFILTER_OPTOUT_KEY`` holds one or more secrets, newest first, comma-separated. Each
secret gives two keys through HKDF (so one secret cannot be misused for both jobs): a BLAKE2b
key for the lookup hash and a Fernet key for the number itself. A number is looked up by its
hash under *every* configured secret, and decrypted by whichever one sealed it
(:class:`cryptography.fernet.MultiFernet`); :meth:`Sealer.rotate` re-seals under the newest.
So a key is rotated by putting the new secret first, running ``blockfilter optout rotate``,
then dropping the old one: no opt-out is lost on the way.

The key is its own setting, never derived from the Kaleyra API key: a leaked API key must not
also open the compliance records, and a rotated API key must not lose them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets as _secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError

KEY_SETTING = "BLOCKFILTER_OPTOUT_KEY"
#: The shortest secret accepted: 32 characters of ``keygen`` output carry 192 bits.
MIN_SECRET_LENGTH = 32
_HASH_PERSON = b"bf-optout-num"
_REF_PERSON = b"bf-optout-ref"
HASH_SIZE = 16


def generate_secret() -> str:
    """A new secret for ``BLOCKFILTER_OPTOUT_KEY`` (``blockfilter optout keygen``)."""
    return _secrets.token_urlsafe(32)


@dataclass(frozen=True)
class _Key:
    key_id: str
    hash_key: bytes
    fernet: Fernet


def _derive(secret: str) -> _Key:
    material = HKDF(
        algorithm=hashes.SHA256(), length=64, salt=b"blockfilter-optout", info=b"v1"
    ).derive(secret.encode("utf-8"))
    hash_key, fernet_key = material[:32], material[32:]
    # A fingerprint to tell keys apart in the store; it gives nothing of the key away.
    key_id = hashlib.blake2b(b"key-id", key=hash_key, digest_size=6).hexdigest()
    return _Key(key_id, hash_key, Fernet(base64.urlsafe_b64encode(fernet_key)))


class Sealer:
    """Hashes and encrypts numbers with the configured secrets (newest first).

    :raises ConfigError: no secret, or one shorter than :data:`MIN_SECRET_LENGTH`.
    """

    def __init__(self, secrets: str | list[str]) -> None:
        items = secrets if isinstance(secrets, list) else secrets.split(",")
        items = [s.strip() for s in items if s.strip()]
        if not items:
            raise ConfigError(
                f"{KEY_SETTING} is not set: the opt-out ledger needs a key of its own "
                "(`blockfilter optout keygen` makes one)"
            )
        short = [i for i, s in enumerate(items, 1) if len(s) < MIN_SECRET_LENGTH]
        if short:
            raise ConfigError(
                f"{KEY_SETTING}: secret {short[0]} is shorter than {MIN_SECRET_LENGTH} "
                "characters (`blockfilter optout keygen` makes one)"
            )
        self._keys = [_derive(s) for s in items]
        self._multi = MultiFernet([k.fernet for k in self._keys])
        self.key_ids = tuple(k.key_id for k in self._keys)

    def __repr__(self) -> str:
        return f"Sealer(keys={len(self._keys)})"

    @property
    def current_key_id(self) -> str:
        return self._keys[0].key_id

    def hashes(self, e164: str) -> list[bytes]:
        """The lookup hash of ``e164`` under every key, newest first."""
        data = e164.encode("ascii")
        return [
            hashlib.blake2b(
                data, key=k.hash_key, digest_size=HASH_SIZE, person=_HASH_PERSON
            ).digest()
            for k in self._keys
        ]

    def hash(self, e164: str) -> bytes:
        """The lookup hash under the newest key (what new events are stored under)."""
        return hashlib.blake2b(
            e164.encode("ascii"),
            key=self._keys[0].hash_key,
            digest_size=HASH_SIZE,
            person=_HASH_PERSON,
        ).digest()

    def hash_all(self, numbers: list[str]) -> dict[bytes, str]:
        """hash -> number, under every key, for a lookup of many numbers at once."""
        found: dict[bytes, str] = {}
        blake2b = hashlib.blake2b
        for key in self._keys:
            hash_key = key.hash_key
            for number in numbers:
                digest = blake2b(
                    number.encode("ascii"),
                    key=hash_key,
                    digest_size=HASH_SIZE,
                    person=_HASH_PERSON,
                ).digest()
                found[digest] = number
        return found

    def ref_hashes(self, ref: str) -> list[bytes]:
        """The idempotency hash of a reference (a message id...) under every key."""
        data = ref.encode("utf-8")
        return [
            hashlib.blake2b(
                data, key=k.hash_key, digest_size=HASH_SIZE, person=_REF_PERSON
            ).digest()
            for k in self._keys
        ]

    def encrypt(self, e164: str) -> str:
        return self._keys[0].fernet.encrypt(e164.encode("ascii")).decode("ascii")

    def decrypt(self, token: str) -> str:
        """The number sealed in ``token``.

        :raises ConfigError: none of the configured keys sealed it (a key was dropped before
            ``blockfilter optout rotate`` re-sealed its events).
        """
        try:
            return self._multi.decrypt(token.encode("ascii")).decode("ascii")
        except InvalidToken:
            raise ConfigError(
                f"an opt-out was sealed with a key no longer in {KEY_SETTING}; put the old "
                "key back (after the new one) and run `blockfilter optout rotate`"
            ) from None

    def rotate(self, token: str) -> str:
        """``token`` sealed anew under the newest key."""
        try:
            return self._multi.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken:
            self.decrypt(token)  # raises the explanation
            raise
