"""Engine errors as HTTP answers: ONE table (as the CLI maps errors to exit
codes), one body shape ``{"error": {"code": ..., "message": ...}}``.

``ERRORS`` is read top down and the first class the error is an instance of
wins, so a subclass comes before its base (a test checks that no entry is
hidden by an earlier one, and that every class of ``engine.errors`` maps).
"""

from __future__ import annotations

from .. import errors as e

#: (error class, HTTP status, error code), subclasses first.
ERRORS: tuple[tuple[type[e.BranchlineError], int, str], ...] = (
    # 401 / 403: who is asking
    (e.ReadOnlyUser, 403, "read_only"),
    (e.AuthError, 401, "unauthorized"),
    # 404: what is asked for does not exist
    (e.UnknownCollection, 404, "unknown_collection"),
    (e.RecordNotFound, 404, "record_not_found"),
    (e.ConflictNotFound, 404, "conflict_not_found"),
    (e.FailureNotFound, 404, "failure_not_found"),
    (e.UnknownUser, 404, "unknown_user"),
    (e.AdapterNotFound, 404, "adapter_not_found"),
    (e.UnknownDataset, 404, "unknown_dataset"),
    (e.UnknownNode, 404, "unknown_node"),
    # 409: the write collides with what is there
    (e.DuplicateKey, 409, "duplicate_key"),
    (e.RecordDeleted, 409, "record_deleted"),
    (e.UserExists, 409, "user_exists"),
    (e.DatasetMismatch, 409, "dataset_mismatch"),
    (e.HomeExists, 409, "home_exists"),
    # 422: well-formed, but the schema or the data says no
    (e.UnknownReference, 422, "unknown_reference"),
    (e.SchemaError, 422, "schema_error"),
    (e.ValidationError, 422, "validation_error"),
    (e.PeriodLocked, 422, "period_locked"),
    (e.NotAuthor, 422, "not_author"),
    (e.ExchangeFileError, 422, "bad_export_file"),
    # 400: the request itself is wrong
    (e.QueryError, 400, "bad_query"),
    (e.UserError, 400, "bad_request"),
    (e.LocalProtocolError, 400, "bad_request"),
    # 503: the node cannot do it now; try again later
    (e.SyncUnavailable, 503, "sync_unavailable"),
    (e.SeriesExhausted, 503, "series_exhausted"),
    (e.SeriesError, 503, "series_error"),
    (e.RelayRefused, 503, "relay_refused"),
    (e.SyncError, 503, "sync_failed"),
    (e.RelayLimitError, 503, "relay_limit"),
    (e.HomeNotFound, 503, "home_not_found"),
    (e.RelayStoreNotFound, 503, "relay_store_not_found"),
    (e.RelayStoreExists, 503, "relay_store_exists"),
    (e.FormatVersionError, 503, "format_version"),
    (e.StoreError, 503, "store_unavailable"),
    # 500: a fault of this node (its adapters, a bad update, the protocol)
    (e.AdapterConfigError, 500, "adapter_config"),
    (e.AdapterError, 500, "adapter_error"),
    (e.UpdateTooLarge, 500, "update_too_large"),
    (e.UpdateError, 500, "update_error"),
    (e.ProtocolError, 500, "protocol_error"),
    (e.BranchlineError, 500, "internal_error"),
)


class HttpError(Exception):
    """An error of the HTTP layer itself (bad JSON, a bad query parameter,
    a body too large, too many event streams), with its status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def http_error(exc: e.BranchlineError) -> tuple[int, str]:
    """(status, code) of an engine error, by ``ERRORS``."""
    for cls, status, code in ERRORS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"  # not reached: BranchlineError is the last row


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    """The one error body shape; ``message`` on one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return {"error": {"code": code, "message": " | ".join(lines) or code}}
