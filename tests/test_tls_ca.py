"""A node reaches a wss:// relay whose certificate a private CA signed when
given that CA (``--ca FILE``, ``relay_ca``), and refuses, in one line that
says what to do, a certificate from another CA, one checked against the
system's CAs only, and an expired one. Certificates are made here with the
openssl command."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.errors import RelayCertificateError, UserError
from engine.node import Node
from engine.relay.server import RelayServer
from engine.relay.sqlite_store import SqliteRelayStore
from engine.transport import node_sync

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

CA_CONF = """[ca]
default_ca = mine
[mine]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = any
copy_extensions = copy
unique_subject = no
[any]
commonName = supplied
"""


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={name}", "-keyout", key, "-out", crt)  # fmt: skip
    return crt, key


def server_cert(d: Path, ca: tuple[Path, Path], *, expired: bool = False) -> tuple[Path, Path]:
    name = "old" if expired else "relay"
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", csr)  # fmt: skip
    if not expired:
        openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                "-days", "2", "-copy_extensions", "copy", "-out", crt)  # fmt: skip
        return crt, key
    cadir = d / "ca-db"
    cadir.mkdir()
    (cadir / "index.txt").write_text("")
    (cadir / "serial").write_text("01\n")
    conf = d / "ca.cnf"
    conf.write_text(CA_CONF.format(dir=cadir))
    openssl("ca", "-batch", "-config", conf, "-cert", ca[0], "-keyfile", ca[1], "-in", csr,
            "-out", crt, "-notext", "-startdate", "20200101000000Z",
            "-enddate", "20200102000000Z")  # fmt: skip
    return crt, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "Branch CA")
    other = make_ca(d, "Other CA")
    good = server_cert(d, ca)
    old = server_cert(d, ca, expired=True)
    return {"ca": ca[0], "other": other[0], "cert": good[0], "key": good[1],
            "old_cert": old[0], "old_key": old[1]}  # fmt: skip


def sync_with(tmp_path: Path, pki: dict[str, Path], cert: str, ca: Path | None) -> None:
    store = SqliteRelayStore.create(tmp_path / "relay.db")
    token = store.enroll("acme", "HN").token
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki[cert], pki[cert.replace("cert", "key")])

    async def main() -> None:
        server = RelayServer(store, host="127.0.0.1", port=0, ssl_context=tls)
        await server.start()
        try:
            with Node.create(
                tmp_path / "hn", dataset="acme", node="HN", relay=server.url, token=token,
                relay_ca=ca,
            ) as node:  # fmt: skip
                node.put("customers", {"code": "KH1", "name": "An"})
                await node_sync(node, timeout=20)
                assert node.pending() == {k: 0 for k in node.pending()}
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_a_private_ca_given_syncs(tmp_path: Path, pki: dict[str, Path]) -> None:
    sync_with(tmp_path, pki, "cert", pki["ca"])


@pytest.mark.parametrize("ca", [None, "other"])
def test_a_certificate_of_an_unknown_ca_is_refused_with_what_to_do(
    tmp_path: Path, pki: dict[str, Path], ca: str | None
) -> None:
    with pytest.raises(RelayCertificateError) as caught:
        sync_with(tmp_path, pki, "cert", pki[ca] if ca else None)
    message = str(caught.value)
    assert "does not accept" in message and "node config --ca FILE" in message
    assert "\n" not in message


def test_an_expired_certificate_is_refused(tmp_path: Path, pki: dict[str, Path]) -> None:
    with pytest.raises(RelayCertificateError, match=r"expired.*must be renewed"):
        sync_with(tmp_path, pki, "old_cert", pki["ca"])


def test_ca_options_checked_in_one_line(tmp_path: Path, pki: dict[str, Path]) -> None:
    home = tmp_path / "hn"
    r = CliRunner().invoke(
        cli, ["node", "init", "--home", str(home), "--dataset", "acme", "--node", "HN",
              "--ca", str(pki["ca"])],
    )  # fmt: skip
    assert r.exit_code == 2 and "--ca goes with --relay" in r.output
    with pytest.raises(UserError, match="not a PEM CA"):
        Node.create(home, dataset="acme", node="HN", relay="wss://r/", token="t",
                    relay_ca=pki["ca"].with_suffix(".key"))  # fmt: skip
    Node.create(home, dataset="acme", node="HN", relay="wss://r/", token="t").close()
    r = CliRunner().invoke(cli, ["node", "config", "--home", str(home), "--ca", "/nope.pem"])
    assert r.exit_code == 2 and "no such file" in r.output and len(r.output.splitlines()) == 1
    r = CliRunner().invoke(
        cli, ["node", "config", "--home", str(home), "--ca", str(pki["ca"]), "--json"]
    )
    assert r.exit_code == 0 and str(pki["ca"].resolve()) in r.output
    r = CliRunner().invoke(cli, ["node", "config", "--home", str(home), "--ca", ""])
    assert r.exit_code == 0 and "the system's" in r.output
