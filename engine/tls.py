"""TLS towards the relay: which certificates a node trusts.

Without a CA of its own a node checks a ``wss://`` relay against the
system's CAs. A relay with a certificate from a private CA is reached with
``--ca FILE`` (``node init``/``node config``; node meta ``relay_ca``): the
node then trusts that CA (and only it). A certificate that fails the check
is an error a person must fix, not a network outage: it is raised as
RelayCertificateError with what failed and what to do.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import RelayCertificateError, UserError
from .names import META_RELAY_CA


def load_ca(path: str | Path) -> str:
    """The absolute path of a readable PEM CA file, checked by loading it.
    Raises UserError."""
    resolved = Path(path).expanduser().resolve()
    try:
        ssl.create_default_context(cafile=str(resolved))
    except FileNotFoundError:
        raise UserError(f"--ca {path}: no such file") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UserError(f"--ca {path}: not a PEM CA certificate ({exc})") from None
    return str(resolved)


def client_context(meta: dict[str, str]) -> ssl.SSLContext | None:
    """The TLS context for the relay of a node with ``meta``: its own CA's,
    or None (the system's CAs). Raises UserError when the CA file is gone."""
    ca = meta.get(META_RELAY_CA)
    if not ca:
        return None
    try:
        return ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise UserError(
            f"the relay CA {ca} of this node cannot be read ({exc}); "
            "give it again with 'branchline node config --ca FILE'"
        ) from None


def certificate_error(exc: ssl.SSLCertVerificationError, where: str) -> RelayCertificateError:
    """The one-line error for a relay certificate this node does not accept."""
    reason = exc.verify_message or exc.reason or str(exc)
    if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        hint = "the relay's certificate must be renewed"
    else:
        hint = "if the relay uses a private CA, give it with 'branchline node config --ca FILE'"
    return RelayCertificateError(f"the relay at {where} presented a certificate this node "
                                 f"does not accept ({reason}); {hint}")  # fmt: skip
