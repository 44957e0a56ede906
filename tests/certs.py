"""Make a throwaway CA, server and client certificates for TLS/mTLS tests."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    key_path, cert_path = path.with_suffix(".key"), path.with_suffix(".crt")
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(cert_path), str(key_path)


def make_pki(directory: Path) -> dict[str, str]:
    """Return paths: ca, server_cert, server_key, client_cert, client_key, other_ca."""
    now = datetime.datetime.now(datetime.timezone.utc)
    out: dict[str, str] = {}

    def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def leaf(cn: str, ca_key, ca_cert, server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return key, b.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("inferd test CA")
    out["ca"], _ = _write(directory / "ca", ca_key, ca_cert)
    out["server_cert"], out["server_key"] = _write(directory / "server", *leaf("localhost", ca_key, ca_cert, True))
    out["client_cert"], out["client_key"] = _write(directory / "client", *leaf("client", ca_key, ca_cert, False))
    other_key, other_cert = ca("another CA")
    out["other_ca"], _ = _write(directory / "other_ca", other_key, other_cert)
    out["rogue_cert"], out["rogue_key"] = _write(directory / "rogue", *leaf("rogue", other_key, other_cert, False))
    return out
