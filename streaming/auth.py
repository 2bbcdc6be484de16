"""Operator API keys and stream tokens: how callers of the stream service prove who they are.

Two kinds of credential, both sent as ``Authorization: Bearer <credential>``:

- an operator API key ``fck_<key_id>_<secret>`` belongs to one tenant; it creates, lists,
  inspects, questions, stops and deletes that tenant's streams (never another tenant's);
- a stream token ``fst_<secret>`` (returned once when a stream is created) grants that one
  stream: inspect, chunks, memory, ask, conversations, stop, delete.

Nothing secret is stored: an API key is kept as ``(key_id, tenant, sha256(secret))`` in the
metadata store (``flashcache-stream keys create``) or in an operator-managed key file
(``serve --api-keys FILE``), a stream token as ``sha256(token)``. The secrets are 256-bit
random strings, so a plain SHA-256 cannot be brute-forced (a slow password hash buys nothing
here); comparisons are constant-time (``hmac.compare_digest``). The ``key_id`` is public: it
names a key in listings and revocations and locates its hash without comparing secrets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # the store imports this module for ApiKeyRecord
    from .store import MetadataStore

__all__ = [
    "API_KEY_PREFIX",
    "STREAM_TOKEN_PREFIX",
    "ApiKeyRecord",
    "Principal",
    "InvalidApiKey",
    "Authenticator",
    "new_api_key",
    "new_stream_token",
    "parse_api_key",
    "hash_token",
    "token_matches",
    "validate_tenant",
    "load_key_file",
    "key_file_line",
]

API_KEY_PREFIX = "fck_"
STREAM_TOKEN_PREFIX = "fst_"
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class InvalidApiKey(PermissionError):
    """An API key was presented but is unknown, revoked or wrong (the message never holds it)."""


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a secret (stream token or API key secret)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: Optional[str], token_hash: str) -> bool:
    """Constant-time check of a presented secret against a stored hash."""
    if not token or not token_hash:
        return False
    return hmac.compare_digest(hash_token(token), token_hash)


def validate_tenant(tenant: str) -> str:
    if not isinstance(tenant, str) or not _TENANT.match(tenant):
        raise ValueError(
            f"tenant={tenant!r} must be 1-64 characters of letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return tenant


@dataclass(frozen=True)
class ApiKeyRecord:
    """What is stored about an operator API key (never the key itself)."""

    key_id: str
    tenant: str
    secret_hash: str
    created_at: float = 0.0
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ApiKeyRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Principal:
    """An authenticated operator: the tenant its API key belongs to."""

    tenant: str
    key_id: str


def new_api_key(tenant: str, label: str = "") -> tuple[str, ApiKeyRecord]:
    """A fresh key ``fck_<key_id>_<secret>`` and the record to store. Show the key once."""
    validate_tenant(tenant)
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = ApiKeyRecord(key_id=key_id, tenant=tenant, secret_hash=hash_token(secret), created_at=time.time(), label=label)
    return f"{API_KEY_PREFIX}{key_id}_{secret}", record


def new_stream_token() -> str:
    return STREAM_TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_api_key(key: str) -> Optional[tuple[str, str]]:
    """``(key_id, secret)`` of a well-formed API key, else None."""
    if not key.startswith(API_KEY_PREFIX):
        return None
    parts = key[len(API_KEY_PREFIX):].split("_", 1)
    if len(parts) != 2 or not _KEY_ID.match(parts[0]) or len(parts[1]) < 32:
        return None
    return parts[0], parts[1]


def key_file_line(record: ApiKeyRecord) -> str:
    """One line of an ``--api-keys`` file: JSON of the record (hash only)."""
    return json.dumps(record.to_dict(), sort_keys=True)


def load_key_file(path: str) -> dict[str, ApiKeyRecord]:
    """Read an ``--api-keys`` file: one JSON :class:`ApiKeyRecord` per line, ``#`` comments.

    Raises ValueError naming the file and line of anything malformed (a plaintext key in the
    file is refused: the file must hold hashes only).
    """
    records: dict[str, ApiKeyRecord] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if API_KEY_PREFIX in line and parse_api_key(line.split()[0]) is not None:
                raise ValueError(f"{path}:{number} holds a plaintext API key; the file must hold hashed records "
                                 "(create keys with `flashcache-stream keys create --file PATH`)")
            try:
                record = ApiKeyRecord.from_dict(json.loads(line))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a JSON API key record ({error})") from None
            if not _KEY_ID.match(record.key_id) or not re.fullmatch(r"[0-9a-f]{64}", record.secret_hash):
                raise ValueError(f"{path}:{number}: key_id must be 12 hex digits and secret_hash a SHA-256 hex digest")
            validate_tenant(record.tenant)
            records[record.key_id] = record
    return records


class Authenticator:
    """Checks operator API keys against the store's keys and an optional key file.

    Args:
        store: the metadata store (keys created with ``flashcache-stream keys create``).
        key_file: an ``--api-keys`` file of hashed records, read at construction.
    """

    def __init__(self, store: "MetadataStore", key_file: Optional[str] = None):
        self.store = store
        self.key_file = key_file
        self._file_keys = load_key_file(key_file) if key_file else {}

    def has_keys(self) -> bool:
        return bool(self._file_keys) or bool(self.store.list_api_keys())

    def authenticate(self, key: str) -> Principal:
        """The key's tenant; :class:`InvalidApiKey` for a malformed, unknown or wrong key."""
        parsed = parse_api_key(key)
        if parsed is None:
            raise InvalidApiKey("malformed API key (expected fck_<key id>_<secret>)")
        key_id, secret = parsed
        record = self._file_keys.get(key_id) or self.store.get_api_key(key_id)
        # Compare even for an unknown id so both paths cost the same.
        expected = record.secret_hash if record is not None else "0" * 64
        if not token_matches(secret, expected) or record is None:
            raise InvalidApiKey(f"invalid or revoked API key (key id {key_id})")
        return Principal(tenant=record.tenant, key_id=key_id)


def default_key_file_mode(path: str) -> None:
    """Key files hold hashes only, but listing who has keys is still the operator's business."""
    try:
        os.chmod(path, 0o600)
    except OSError:
        pass
