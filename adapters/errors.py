"""The one error hierarchy of the library. The service maps these to HTTP status codes in one place."""

from __future__ import annotations


class KplugError(Exception):
    """Base of every error the library raises on purpose."""


class ModelNotFoundError(KplugError):
    """The base model (or embedder) is not where it should be; the message names the missing step."""


class ModelIntegrityError(KplugError):
    """A downloaded model file does not match its pinned hash."""


class CheckpointError(KplugError):
    """An adapter checkpoint is missing, unreadable, of another format version, or for another base model."""


class InvalidInputError(KplugError):
    """Input that the caller can fix: empty text, a bad file, an out-of-range value."""


class NotFoundError(KplugError):
    """A document, job or other named thing does not exist."""


class ConflictError(KplugError):
    """A write that clashes with what is stored (an existing id with on_conflict=fail, another adapter)."""


class StoreCorruptError(KplugError):
    """The store on disk cannot be read; never treated as an empty store."""


class OverloadedError(KplugError):
    """The service is at capacity; the caller may retry later."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceededError(KplugError):
    """A request ran past its time limit and was ended cleanly."""
