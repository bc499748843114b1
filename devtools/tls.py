"""A throwaway certificate authority for TLS tests: a CA, a server certificate for
127.0.0.1/localhost and a client certificate, made with ``openssl`` (EC P-256 keys,
fast to make)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from updater.run import run


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1 and a client one."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context presenting the server certificate."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        return ctx


def make_tls(directory: Path, client_cn: str = "root") -> TLSFiles:
    """A CA and two certificates it signed, with EC P-256 keys (fast to make)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TLSFiles(
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca-key.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        [
            "openssl", "req", "-x509", *ec, "-days", "2",
            "-subj", "/CN=updater test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", str(files.ca_key), "-out", str(files.ca_cert),
        ]
    )  # fmt: skip
    for cert, key, cn, ext in (
        (
            files.server_cert,
            files.server_key,
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        ),
        (files.client_cert, files.client_key, client_cn, "extendedKeyUsage=clientAuth\n"),
    ):
        csr = cert.with_suffix(".csr")
        extfile = cert.with_suffix(".ext")
        extfile.write_text(ext)
        run(["openssl", "req", "-new", *ec, "-subj", f"/CN={cn}",
             "-keyout", str(key), "-out", str(csr)])  # fmt: skip
        run(
            [
                "openssl", "x509", "-req", "-in", str(csr), "-days", "2",
                "-CA", str(files.ca_cert), "-CAkey", str(files.ca_key), "-CAcreateserial",
                "-extfile", str(extfile), "-out", str(cert),
            ]
        )  # fmt: skip
    return files
