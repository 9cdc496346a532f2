"""API keys: one key (`--api-key`) or a TOML file of named keys with their limits (`--api-keys-file`).

A key file has one table per key (docs/security.md)::

    [keys.team-a]
    key_sha256 = "..."          # or key = "..."
    requests_per_minute = 60
    tokens_per_minute = 20000   # prompt + generated tokens
    max_concurrent = 4          # streams at once
    priority = 0                # lower is served first; this key's requests' default

Keys are kept as SHA-256 digests and compared in constant time (every key is compared, so the time
says nothing about which one nearly matched). The file is read again when it changes; a file that
became malformed is refused with the error logged, and the keys loaded before stay in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from llmserve.engine.config import INT32_MAX, INT32_MIN

log = logging.getLogger("llmserve.gateway")

# Seconds between two looks at the key file's modification time.
RELOAD_CHECK_INTERVAL_S = 1.0

Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]


class KeysFileError(ValueError):
    """A key file that cannot be used: the message names the file and what is wrong in it."""


class KeyEntry(BaseModel):
    """One table of the key file. A limit left out is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Annotated[str, StringConstraints(min_length=1)] | None = None
    key_sha256: Sha256Hex | None = None
    requests_per_minute: Annotated[int, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[int, Field(gt=0)] | None = None
    max_concurrent: Annotated[int, Field(gt=0)] | None = None
    priority: Annotated[int, Field(ge=INT32_MIN, le=INT32_MAX)] = 0

    @model_validator(mode="after")
    def _one_key(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key or key_sha256")
        return self

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.key_sha256) if self.key_sha256 else sha256(self.key)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: Annotated[dict[str, KeyEntry], Field(min_length=1)]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the key's name and its limits."""

    name: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    priority: int = 0


def sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "; ".join(problems)


def load_keys_file(path: str | os.PathLike) -> dict[bytes, Principal]:
    """digest -> Principal; KeysFileError naming the file and the problem."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise KeysFileError(f"cannot read the API key file {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"the API key file {path} is not valid TOML: {exc}") from exc
    try:
        parsed = KeysFile.model_validate(data)
    except ValidationError as exc:
        raise KeysFileError(f"the API key file {path} is malformed: {_describe(exc)}") from exc
    principals: dict[bytes, Principal] = {}
    for name, entry in parsed.keys.items():
        if entry.digest in principals:
            raise KeysFileError(f"the API key file {path} is malformed: keys.{name} has the same key as "
                                f"keys.{principals[entry.digest].name}")
        principals[entry.digest] = Principal(name, entry.requests_per_minute, entry.tokens_per_minute,
                                             entry.max_concurrent, entry.priority)
    return principals


class KeyStore:
    """The keys a gateway accepts: `authenticate(presented)` is the Principal, or None for no match."""

    def __init__(self, principals: dict[bytes, Principal], path: str | os.PathLike | None = None) -> None:
        self._principals = principals
        self._path = Path(path) if path is not None else None
        self._mtime = self._stat()
        self._checked_at = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def single(cls, key: str) -> KeyStore:
        if not key:
            raise ValueError("the API key must not be empty")
        return cls({sha256(key): Principal("default")})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> KeyStore:
        return cls(load_keys_file(path), path)

    def _stat(self) -> float | None:
        try:
            return self._path.stat().st_mtime_ns if self._path is not None else None
        except OSError:
            return None

    def reload_if_changed(self) -> None:
        """Read the file again when its modification time changed (looked at once a second at most)."""
        if self._path is None or time.monotonic() - self._checked_at < RELOAD_CHECK_INTERVAL_S:
            return
        with self._lock:
            self._checked_at = time.monotonic()
            mtime = self._stat()
            if mtime == self._mtime:
                return
            self._mtime = mtime
            try:
                self._principals = load_keys_file(self._path)
            except KeysFileError as exc:
                log.error("%s; the keys loaded before stay in force", exc)
                return
            log.info("reloaded the API key file %s: %d keys", self._path, len(self._principals))

    def authenticate(self, presented: str | None) -> Principal | None:
        self.reload_if_changed()
        digest = sha256(presented or "")
        found = None
        for known, principal in self._principals.items():  # all of them: constant time per key
            if hmac.compare_digest(known, digest):
                found = principal
        return found if presented else None
