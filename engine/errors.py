"""The one exception hierarchy of Branchline.

Every error a user can meet says what happened and what to do. ``exit_code`` is
what the CLI exits with: 2 for user mistakes (bad input, unknown names), 1 for
problems of the environment or the data on disk.
"""

from __future__ import annotations


class BranchlineError(Exception):
    """Base of every error Branchline raises on purpose."""

    exit_code = 1


class UserError(BranchlineError):
    """The caller asked for something invalid; nothing was written."""

    exit_code = 2


class SchemaError(UserError):
    """A schema file is invalid; the message names the file, collection and field."""


class ValidationError(UserError):
    """A value or a set of fields does not fit the schema."""


class UnknownCollection(UserError):
    """The collection is not in the node's schema."""


class UnknownReference(ValidationError):
    """A reference names a record (by code or id) that this node does not have."""


class RecordNotFound(UserError):
    """No live record with that id or key."""


class RecordDeleted(UserError):
    """The record is deleted; restore it before editing."""


class StoreError(BranchlineError):
    """The node home or its SQLite file cannot be used as asked."""


class HomeNotFound(StoreError):
    """There is no node store in the given home directory."""

    exit_code = 2


class HomeExists(StoreError):
    """A node store already exists where a new one was to be created."""

    exit_code = 2


class FormatVersionError(StoreError):
    """The store was written by another, incompatible format version."""


class DatasetMismatch(BranchlineError):
    """Data of one dataset was offered to a node of another dataset."""

    exit_code = 2


class ExchangeFileError(UserError):
    """An export file is damaged, truncated or not a Branchline export."""


class UpdateError(BranchlineError):
    """A CRDT update could not be decoded or applied; nothing was stored."""


class SeriesError(BranchlineError):
    """A voucher number could not be allocated."""


class SeriesExhausted(SeriesError):
    """A leased block range is used up and no provisional numbering is allowed."""
