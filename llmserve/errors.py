"""Exceptions the engine raises for requests it refuses."""


class InvalidRequestError(ValueError):
    """A request the engine cannot run; the message names the offending field."""


class OverloadedError(RuntimeError):
    """The engine's queue is full; the client should retry later."""
