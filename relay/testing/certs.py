"""Certificates for the simulated Microsoft 365.

Two kinds, for two jobs:

* TLS for the loopback servers (token endpoint, Exchange SMTP). A throw-away trustme CA issues one
  certificate for ``localhost``, ``127.0.0.1`` and ``::1``; the DNS name matters because Java clients
  check the host name and refuse a certificate that only carries an IP address. The relay under test
  trusts ``ca.pem`` explicitly, so nothing on this machine has to trust the CA.
* The *certificate credential* of an app registration (:func:`make_app_certificate`): a self-signed
  RSA-2048 certificate whose private key signs MSAL's client assertion, exactly what an admin uploads
  to Entra ID. Entra ID identifies it by thumbprint (SHA-1 ``x5t`` or SHA-256 ``x5t#S256``).
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

SERVER_IDENTITIES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
"""Names the loopback servers' certificate is valid for: what a client may dial."""


@dataclass(frozen=True)
class ServerCertificates:
    """Paths of the PEM files written for the loopback servers."""

    directory: Path
    ca_file: Path
    """The CA certificate a client must trust (``verify=`` / ``cafile=``)."""
    cert_file: Path
    """Server certificate chain (leaf first)."""
    key_file: Path
    """Server private key (unencrypted PEM)."""

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context with this certificate, TLS >= 1.2 like Exchange Online."""
        return server_ssl_context(self.cert_file, self.key_file)

    def client_context(self) -> ssl.SSLContext:
        """A client-side TLS context that trusts only the simulator's CA (host names checked)."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def write_server_certificates(directory: Path) -> ServerCertificates:
    """Create a fresh CA and a server certificate for the loopback identities under ``directory``.

    A new CA per simulator keeps tests independent: a certificate of one run is never trusted by
    another.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="oauth-smtp-relay simulated Microsoft 365")
    leaf = ca.issue_cert(*SERVER_IDENTITIES)
    ca_file = directory / "ca.pem"
    cert_file = directory / "server.pem"
    key_file = directory / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key_file.write_bytes(leaf.private_key_pem.bytes())
    key_file.chmod(0o600)
    return ServerCertificates(directory, ca_file, cert_file, key_file)


def server_ssl_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Server TLS context: TLS >= 1.2, no client certificates (neither Entra nor Exchange ask for one)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


@dataclass(frozen=True)
class AppCertificate:
    """The certificate credential of an app registration, in the forms MSAL and Entra ID use.

    ``thumbprint_sha1_hex`` is what the Azure portal shows and what MSAL's ``"thumbprint"`` expects;
    Entra ID also accepts ``x5t#S256`` (SHA-256), which newer MSAL versions send with PS256.
    """

    private_key_pem: bytes
    certificate_pem: bytes
    thumbprint_sha1_hex: str

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate (what Entra ID stores after upload)."""
        return x509.load_pem_x509_certificate(self.certificate_pem)

    def pfx_bytes(self, password: bytes | str | None = None) -> bytes:
        """A PKCS#12 (.pfx) bundle of key and certificate, as admins often hand it over."""
        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        secret = password.encode() if isinstance(password, str) else password
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(secret) if secret else serialization.NoEncryption()
        )
        return pkcs12.serialize_key_and_certificates(
            name=b"app-credential", key=key, cert=self.certificate, cas=None, encryption_algorithm=encryption
        )


def make_app_certificate(common_name: str = "oauth-smtp-relay", *, days: int = 365) -> AppCertificate:
    """Create a self-signed RSA-2048 certificate like ``New-SelfSignedCertificate`` would.

    RSA because Entra ID certificate credentials are RSA; 2048 bits because that is the minimum it
    accepts and keeps key generation fast in tests.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return AppCertificate(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
        thumbprint_sha1_hex=cert.fingerprint(hashes.SHA1()).hex().upper(),
    )
