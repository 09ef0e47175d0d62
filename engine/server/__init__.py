"""The branch server: a local HTTP API and web screen for a node's
workstations, served by uvicorn beside the node's live sync loop
(``branchline node serve``, docs/operations.md, docs/api-http.md)."""

from .app import API_ROUTES, create_app

__all__ = ["API_ROUTES", "create_app"]
