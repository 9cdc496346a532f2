"""Per-key limits: requests and tokens per minute (token buckets), streams at once.

A bucket holds up to one minute's allowance and refills continuously. A request is admitted while
its key has a request left, its token bucket is above zero and it has fewer than `max_concurrent`
streams open. Tokens (prompt and generated, as they stream) are charged after admission and may take
the bucket below zero: a stream is never cut for its own tokens, the key's next request waits until
the bucket is back above zero. Every response of a keyed request carries OpenAI's rate-limit headers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .keys import Principal


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1.5s", "6m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{rest}s"


@dataclass(slots=True)
class TokenBucket:
    capacity: float  # one minute's allowance
    level: float = field(init=False)
    updated: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def rate(self) -> float:  # per second
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) / self.rate)


class RateLimited(Exception):
    """Over a key's limit: the message names the limit; `retry_after` in seconds."""

    def __init__(self, message: str, retry_after: float, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.code = code


class KeyState:
    """One key's buckets and open streams."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.requests = TokenBucket(principal.requests_per_minute) if principal.requests_per_minute else None
        self.tokens = TokenBucket(principal.tokens_per_minute) if principal.tokens_per_minute else None
        self.open_streams = 0

    def update_limits(self, principal: Principal) -> None:
        """A reloaded key file: new limits keep what was used under the old ones."""
        if principal == self.principal:
            return
        for name, limit in (("requests", principal.requests_per_minute), ("tokens", principal.tokens_per_minute)):
            old = getattr(self, name)
            new = TokenBucket(limit) if limit else None
            if new is not None and old is not None:
                new.level = min(new.capacity, old.level)
            setattr(self, name, new)
        self.principal = principal

    def refill(self) -> None:
        now = time.monotonic()
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)

    def check(self) -> None:
        """RateLimited naming the limit the next request would go over."""
        p = self.principal
        if self.requests is not None and self.requests.level < 1:
            raise RateLimited(f"Rate limit reached for key '{p.name}': {p.requests_per_minute} requests per minute "
                              "(requests_per_minute)", self.requests.seconds_until(1), "rate_limit_requests")
        if self.tokens is not None and self.tokens.level <= 0:
            raise RateLimited(f"Rate limit reached for key '{p.name}': {p.tokens_per_minute} tokens per minute "
                              "(tokens_per_minute)", self.tokens.seconds_until(1), "rate_limit_tokens")
        if p.max_concurrent is not None and self.open_streams >= p.max_concurrent:
            raise RateLimited(f"Key '{p.name}' already has {self.open_streams} streams open: at most "
                              f"{p.max_concurrent} at once (max_concurrent)", 1.0, "concurrency_limit")

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for suffix, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            headers[f"x-ratelimit-limit-{suffix}"] = str(int(bucket.capacity))
            headers[f"x-ratelimit-remaining-{suffix}"] = str(max(0, math.floor(bucket.level)))
            headers[f"x-ratelimit-reset-{suffix}"] = duration(bucket.seconds_until(bucket.capacity))
        return headers


class Admission:
    """An admitted request: charge its tokens as they come, release it when its response ends."""

    def __init__(self, state: KeyState) -> None:
        self.state = state
        self.released = False

    @property
    def principal(self) -> Principal:
        return self.state.principal

    def charge(self, tokens: int) -> None:
        if tokens > 0 and self.state.tokens is not None:
            self.state.refill()
            self.state.tokens.level -= tokens

    def headers(self) -> dict[str, str]:
        self.state.refill()
        return self.state.headers()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.open_streams -= 1


class RateLimiter:
    """Every key's state, by key name (so a reloaded key file keeps what each key used)."""

    def __init__(self) -> None:
        self._states: dict[str, KeyState] = {}

    def state(self, principal: Principal) -> KeyState:
        state = self._states.get(principal.name)
        if state is None:
            state = self._states[principal.name] = KeyState(principal)
        else:
            state.update_limits(principal)
        state.refill()
        return state

    def admit(self, principal: Principal) -> Admission:
        """Count one request and one open stream, or raise RateLimited (with the headers to send)."""
        state = self.state(principal)
        state.check()
        if state.requests is not None:
            state.requests.level -= 1
        state.open_streams += 1
        return Admission(state)
