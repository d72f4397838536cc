"""API keys, stored hashed in Redis next to the library.

A key is shown once, at creation; Redis keeps only its SHA-256. Each key has a name and scopes:
``admin`` (change the library: upload, delete, compose, retrain the router; implies the others),
``read`` (listings, details, downloads, metrics) and ``inference``. Creating a key locks the library for
good (``locked``): revoking the last key does not open it again, and neither does a Redis that forgot it
(flushed, restored): the data dir remembers too (adapter_store/high_water.py).

A key may be limited to a namespace: it then reaches only skills named ``NAMESPACE/…`` (and the base
model), and none of the operations that span the whole library (server/edge/auth.py says which).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis
from pydantic import BaseModel

from adapter_store.high_water import HighWater
from adapter_store.validation import NAME_RE
from lora.errors import ConflictError, NotFoundError

SCOPES = ("admin", "read", "inference")
KEY_PREFIX = "mk-"  # every key made here starts so (tells a key from an OpenAI client's placeholder)


class KeyInfo(BaseModel):
    name: str
    scopes: list[str]
    created: float
    prefix: str  # the first characters of the key, to tell keys apart in listings
    namespace: str | None = None  # limited to skills named "namespace/…"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, client: redis.Redis, prefix: str = "mosaic", high_water: HighWater | None = None) -> None:
        self.r = client
        self.high_water = high_water  # the data dir's memory that keys were made (None: Redis's alone)
        self.k_hashes = f"{prefix}:keys:by-hash"  # sha256 -> name
        self.k_info = f"{prefix}:keys:info"  # name -> KeyInfo JSON (+ hash)
        self.k_locked = f"{prefix}:keys:locked"  # set when the first key is created; never unset

    def create(self, name: str, scopes: list[str], namespace: str | None = None) -> tuple[str, KeyInfo]:
        if not NAME_RE.match(name):
            raise ValueError(f"key name {name!r} is not allowed (letters, digits, '.', '_', '-')")
        if namespace is not None and not NAME_RE.match(namespace):
            raise ValueError(f"namespace {namespace!r} is not allowed (letters, digits, '.', '_', '-')")
        bad = sorted(set(scopes) - set(SCOPES))
        if bad or not scopes:
            raise ValueError(f"scopes must be among {list(SCOPES)}, got {scopes!r}")
        key = KEY_PREFIX + secrets.token_hex(24)
        info = KeyInfo(name=name, scopes=sorted(set(scopes)), created=time.time(), prefix=key[:7], namespace=namespace)

        def write(pipe: redis.client.Pipeline) -> None:
            if pipe.hexists(self.k_info, name):
                raise ConflictError(f"a key named {name!r} exists; revoke it first")
            pipe.multi()
            pipe.hset(self.k_hashes, _digest(key), name)
            pipe.hset(self.k_info, name, json.dumps({**info.model_dump(), "hash": _digest(key)}))
            pipe.set(self.k_locked, "1")

        self.r.transaction(write, self.k_info)  # another key created or revoked meanwhile: check again
        if self.high_water is not None:
            self.high_water.saw_keys()
        return key, info

    def list(self) -> list[KeyInfo]:
        return sorted((KeyInfo.model_validate_json(v) for v in self.r.hvals(self.k_info)), key=lambda k: k.name)

    def any(self) -> bool:
        return bool(self.r.hlen(self.k_info))

    def locked(self) -> bool:
        """Whether a key was ever created here (the library then stays closed to requests without one), as
        Redis or the data dir remembers."""
        if self.high_water is not None and self.high_water.keys_seen:
            return True
        if self.locked_in_redis():
            if self.high_water is not None:
                self.high_water.saw_keys()
            return True
        return False

    def locked_in_redis(self) -> bool:
        if self.r.exists(self.k_locked):
            return True
        if self.r.hlen(self.k_info):  # keys made before the flag existed
            self.lock()
            return True
        return False

    def lock(self) -> None:
        """Record in Redis that keys were made (the data dir remembered it, Redis had forgotten)."""
        self.r.set(self.k_locked, "1")

    def revoke(self, name: str) -> KeyInfo:
        raw = self.r.hget(self.k_info, name)
        if raw is None:
            raise NotFoundError(f"no key named {name!r}", param="name")
        doc = json.loads(raw)
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hdel(self.k_hashes, doc["hash"])
            pipe.hdel(self.k_info, name)
            pipe.execute()
        return KeyInfo.model_validate(doc)

    def lookup(self, key: str) -> KeyInfo | None:
        """The key's record (scopes, namespace), or None when it is unknown or revoked."""
        name = self.r.hget(self.k_hashes, _digest(key))
        if name is None:
            return None
        raw = self.r.hget(self.k_info, name)
        return KeyInfo.model_validate_json(raw) if raw else None

    def scopes(self, key: str) -> list[str] | None:
        """The key's scopes, or None when it is unknown or revoked."""
        info = self.lookup(key)
        return info.scopes if info else None
