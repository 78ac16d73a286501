"""TLS to the SOAP peer is verified: a service whose certificate does not chain to the
configured CA gets nothing; with the intranet CA configured, delivery works."""
from __future__ import annotations

import datetime as dt
import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from adapters.base import RetryableError
from adapters.simulators.soap_service import DocExchangeState, SoapServiceServer
from tests.plugins.gatewaynode import COUNTY_A
from tests.test_adapter_soap import to


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pki(tmp_path):  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("测试内网 CA")).issuer_name(_name("测试内网 CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - dt.timedelta(minutes=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("docexchange")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    return ctx


@pytest.fixture
def tls_service(tmp_path):  # type: ignore[no-untyped-def]
    server = SoapServiceServer(DocExchangeState(), ssl_context=_pki(tmp_path)).start()
    yield server
    server.close()


def test_untrusted_certificate_is_refused_and_nothing_is_delivered(tls_service, make_soap_adapter, document):
    assert tls_service.url.startswith("https://")
    adapter = make_soap_adapter(tls_service)
    with pytest.raises(RetryableError) as err:
        adapter.deliver(to(document, COUNTY_A))
    assert err.value.code == "tls" and "TLS" in str(err.value)
    assert tls_service.state.send_calls == 0


def test_certificate_from_the_configured_ca_is_accepted(tls_service, make_soap_adapter, document, tmp_path):
    adapter = make_soap_adapter(tls_service, ca_file=str(tmp_path / "ca.pem"))
    adapter.deliver(to(document, COUNTY_A))
    assert tls_service.state.documents == 1
