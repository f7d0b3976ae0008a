"""A private CA for a test or small deployment: `storelink-central pki init`.

Makes an ECDSA P-256 CA, a server certificate for the NATS port (names and IPs given, plus
localhost and 127.0.0.1), and a client certificate for central itself; `stores add` issues
each store a client certificate from the same CA when mutual TLS is on. Private keys are
written 0600. A real deployment uses its own PKI instead: see docs/security.md for the files
to point `[nats.tls]` and the agents' `nats.tls_*` settings at.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from central.auth import write_secret
from central.errors import ConfigError

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CENTRAL_CERT = "central.pem"
CENTRAL_KEY = "central.key"
DEFAULT_DAYS = 825  # the longest validity clients commonly accept for a leaf certificate
CA_DAYS = 3650


@dataclass(frozen=True)
class PkiFiles:
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    central_cert: Path
    central_key: Path


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)


def _write_cert(path: Path, cert: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "storelink"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(**allowed: bool) -> Any:
    """A KeyUsage extension with only ``allowed`` set."""
    from cryptography import x509

    flags = dict.fromkeys(
        ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"],
        False,
    )  # fmt: skip
    return x509.KeyUsage(**(flags | allowed))


def _builder(subject: str, issuer: Any, public_key: Any, days: int) -> Any:
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _leaf(
    common_name: str,
    ca_cert: Any,
    ca_key: Any,
    *,
    server: bool,
    hosts: tuple[str, ...] = (),
    days: int = DEFAULT_DAYS,
) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    builder = (
        _builder(common_name, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def init_pki(directory: Path, hosts: list[str], *, force: bool = False) -> PkiFiles:
    """Create the CA, the server certificate for ``hosts`` and central's client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    files = pki_files(directory)
    if files.ca_key.exists() and not force:
        raise ConfigError(
            f"{files.ca_key} exists: a new CA would invalidate every certificate it signed; "
            "use --force to replace it"
        )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_cert = (
        _builder("storelink CA", _name("storelink CA"), ca_key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(files.ca_key, ca_key)
    _write_cert(files.ca, ca_cert)
    server_cert, server_key = _leaf(
        "storelink nats", ca_cert, ca_key, server=True, hosts=tuple(hosts)
    )
    _write_key(files.server_key, server_key)
    _write_cert(files.server_cert, server_cert)
    central_cert, central_key = _leaf("storelink-central", ca_cert, ca_key, server=False)
    _write_key(files.central_key, central_key)
    _write_cert(files.central_cert, central_cert)
    return files


def pki_files(directory: Path) -> PkiFiles:
    """Where ``init_pki`` writes its files in ``directory``."""
    return PkiFiles(
        ca=directory / CA_CERT,
        ca_key=directory / CA_KEY,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        central_cert=directory / CENTRAL_CERT,
        central_key=directory / CENTRAL_KEY,
    )


def ensure_pki(directory: Path, hosts: list[str]) -> tuple[PkiFiles, bool]:
    """The CA and certificates in ``directory``, made now when there is no CA there yet (central
    on a non-loopback NATS address, first start): (files, made now). Kept across restarts, so
    the certificates stores were given stay valid."""
    files = pki_files(directory)
    if files.ca_key.exists():
        return files, False
    return init_pki(directory, hosts), True


def issue_client_cert(
    ca_cert_path: Path, ca_key_path: Path, common_name: str, cert_path: Path, key_path: Path
) -> None:
    """A client certificate for ``common_name`` (a store) signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"cannot issue a client certificate with {ca_cert_path} / {ca_key_path}: "
            f"{type(exc).__name__}"
        ) from None
    cert, key = _leaf(common_name, ca_cert, ca_key, server=False)
    _write_key(key_path, key)
    _write_cert(cert_path, cert)


def tls_config_snippet(files: PkiFiles) -> str:
    """The central config lines that use these files."""
    return (
        "[nats.tls]\n"
        f'cert = "{files.server_cert.resolve().as_posix()}"\n'
        f'key = "{files.server_key.resolve().as_posix()}"\n'
        f'ca = "{files.ca.resolve().as_posix()}"\n'
        "# verify = true  # mutual TLS: agents must present a certificate from this CA\n"
        f'client_cert = "{files.central_cert.resolve().as_posix()}"\n'
        f'client_key = "{files.central_key.resolve().as_posix()}"\n'
        f'ca_key = "{files.ca_key.resolve().as_posix()}"  # lets `stores add` issue store certs\n'
    )
