"""XML signatures as DCC makes them: signed here, by xmlsec1 and by signxml; verified here and there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree
from signxml import SignatureConfiguration, XMLSigner, XMLVerifier, methods
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod

from gateway.cli import main
from gateway.pki import init_pki, make_ca, make_organisation
from gateway.schema import validate
from gateway.signing import (
    DS,
    PACKAGED_PKI,
    CertificateLibrary,
    OrgCertificate,
    SigningKey,
    certificate_eui,
    issuer_key,
    sign,
    verify,
)
from rules.codes import ResponseCode
from rules.domain import Eui

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "rules" / "duis" / "requests" / "ECS22b_4.8.1_SINGLE_SUCCESS_REQUEST_DUIS.XML"
FLAG_SAMPLE = ROOT / "rules" / "mp169-requests" / "8.15.1_SET_REDUCED_COMMUNICATIONS_REQUEST_DUIS.XML"
SUPPLIER = Eui("90-B3-D5-1F-30-01-00-00")  # the originator of DCC's templates
NETWORK_OPERATOR = Eui("90-B3-D5-1F-30-02-00-00")
XMLSEC1 = shutil.which("xmlsec1") or "/usr/bin/xmlsec1"  # Debian package xmlsec1; .ci/run installs it


def packaged(name: str) -> tuple[SigningKey, OrgCertificate]:
    return (
        SigningKey.from_file(PACKAGED_PKI / f"{name}.key"),
        OrgCertificate.from_pem((PACKAGED_PKI / f"{name}.pem").read_bytes()),
    )


SUPPLIER_KEY, SUPPLIER_CERT = packaged("xml-sign-90B3D51F30010000-ds")
OPERATOR_KEY, OPERATOR_CERT = packaged("xml-sign-90B3D51F30020000-ds")
LIBRARY = CertificateLibrary.from_directory(PACKAGED_PKI)


def signed_sample() -> bytes:
    return sign(SAMPLE.read_bytes(), SUPPLIER_KEY, SUPPLIER_CERT)


def test_a_signed_request_verifies_with_its_signer_and_serial() -> None:
    verification = verify(signed_sample(), LIBRARY)
    assert (verification.valid, verification.reason, verification.code) == (True, "verified", None)
    assert verification.signer == SUPPLIER
    assert verification.serial == SUPPLIER_CERT.serial
    assert verification.root is not None
    assert verification.root.tag == "{http://www.dccinterface.co.uk/ServiceUserGateway}Request"


def test_the_signature_has_dccs_form_and_the_document_stays_valid_duis() -> None:
    document = signed_sample()
    assert validate(document).valid
    root = etree.fromstring(document)
    signature = root[-1]
    assert signature.tag == f"{{{DS}}}Signature"
    ns = {"ds": DS}
    algorithms = [str(value) for value in signature.xpath(".//@Algorithm", namespaces=ns)]
    assert algorithms == [
        "http://www.w3.org/2001/10/xml-exc-c14n#",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
        "http://www.w3.org/2000/09/xmldsig#enveloped-signature",
        "http://www.w3.org/2001/04/xmlenc#sha256",
    ]
    assert signature.xpath("ds:SignedInfo/ds:Reference/@URI", namespaces=ns) == [""]
    assert signature.xpath("string(.//ds:X509IssuerName)", namespaces=ns) == "CN=Z1,OU=07"
    assert signature.xpath("string(.//ds:X509SerialNumber)", namespaces=ns) == str(SUPPLIER_CERT.serial)
    # The placeholder signature of DCC's template was replaced, not kept beside it.
    assert len(root.findall(f"{{{DS}}}Signature")) == 1


def test_dccs_placeholder_signatures_name_an_unknown_certificate() -> None:
    verification = verify(SAMPLE.read_bytes(), LIBRARY)
    assert (verification.reason, verification.code) == (
        "certificate-unknown",
        ResponseCode.CERTIFICATE_UNKNOWN,
    )
    assert verification.serial == 1234567890


def test_unsigned_is_refused() -> None:
    unsigned = re.sub(rb"(?s)<ds:Signature.*</ds:Signature>", b"", SAMPLE.read_bytes())
    verification = verify(unsigned, LIBRARY)
    assert (verification.valid, verification.code) == (False, ResponseCode.SIGNATURE_MISSING)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b":1002<", b":1003<"),  # the RequestID counter
        (b"<sr:ReadLogPeriod>", b"<sr:ReadLogPeriod> "),  # only a blank: still signed content
        (b'schemaVersion="5.4"', b'schemaVersion="5.3"'),
    ],
)
def test_tampered_is_refused(old: bytes, new: bytes) -> None:
    document = signed_sample()
    assert old in document
    verification = verify(document.replace(old, new, 1), LIBRARY)
    assert (verification.reason, verification.code) == ("signature-invalid", ResponseCode.SIGNATURE_INVALID)


def test_signed_with_another_key_than_the_named_certificate_is_refused() -> None:
    verification = verify(sign(SAMPLE.read_bytes(), OPERATOR_KEY, SUPPLIER_CERT), LIBRARY)
    assert (verification.reason, verification.signer) == ("signature-invalid", SUPPLIER)


def test_a_signer_that_is_not_the_originator_is_refused() -> None:
    verification = verify(sign(SAMPLE.read_bytes(), OPERATOR_KEY, OPERATOR_CERT), LIBRARY)
    assert (verification.code, verification.signer) == (ResponseCode.SIGNER_NOT_ORIGINATOR, NETWORK_OPERATOR)


def test_a_certificate_outside_the_library_is_refused() -> None:
    ca = make_ca(datetime.now(UTC))
    stranger = make_organisation(ca, SUPPLIER, datetime.now(UTC))
    certificate = OrgCertificate.from_pem(stranger.certificate_pem())
    document = sign(SAMPLE.read_bytes(), SigningKey.from_bytes(stranger.key_pem()), certificate)
    assert verify(document, LIBRARY).code is ResponseCode.CERTIFICATE_UNKNOWN
    assert verify(document, CertificateLibrary([certificate])).valid


def test_an_expired_certificate_is_refused() -> None:
    verification = verify(signed_sample(), LIBRARY, at=datetime(2119, 1, 1, tzinfo=UTC))
    assert verification.code is ResponseCode.CERTIFICATE_NOT_CURRENT


@pytest.mark.parametrize(
    ("old", "new", "detail"),
    [
        (b"xmldsig-more#ecdsa-sha256", b"xmldsig-more#rsa-sha256", "ECDSA"),
        (b"xmlenc#sha256", b"xmldsig#sha1", "SHA-256"),
        (b"xml-exc-c14n#", b"xml-c14n11", "exclusive C14N"),
        (b'URI=""', b'URI="#body"', "URI"),
    ],
)
def test_anything_but_duis_form_is_refused_before_cryptography(old: bytes, new: bytes, detail: str) -> None:
    verification = verify(signed_sample().replace(old, new, 1), LIBRARY)
    assert verification.reason == "signature-invalid"
    assert detail in verification.detail


def test_a_second_signature_or_one_not_last_is_refused() -> None:
    document = signed_sample()
    signature = document[document.index(b"<ds:Signature") : document.index(b"</ds:Signature>") + 15]
    assert verify(document.replace(b"</sr:Request>", signature + b"</sr:Request>"), LIBRARY).reason == (
        "signature-invalid"
    )
    moved = document.replace(signature, b"").replace(b"<sr:Body>", signature + b"<sr:Body>")
    assert "last child" in verify(moved, LIBRARY).detail


def test_unreadable_documents_are_not_signature_verdicts() -> None:
    for document in (b"<sr:Request", b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', b"\xff\xfe"):
        verification = verify(document, LIBRARY)
        assert (verification.reason, verification.code, verification.root) == ("unreadable", None, None)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_any_single_byte_change_never_raises(position: int, byte: int) -> None:
    document = bytearray(SIGNED)
    document[position % len(document)] = byte
    verification = verify(bytes(document), LIBRARY)
    assert verification.reason in {
        "verified",
        "unreadable",
        "signature-missing",
        "signature-invalid",
        "certificate-unknown",
        "signer-not-originator",
    }


SIGNED = signed_sample()


def test_issuer_names_compare_as_attributes() -> None:
    assert issuer_key("CN=Z1,OU=07") == issuer_key("CN=Z1, OU=07") == issuer_key("ou=07,cn=z1")
    assert issuer_key("CN=Z1,OU=08") != issuer_key("CN=Z1,OU=07")
    assert issuer_key("not a name") is None
    assert LIBRARY.find("OU=07, CN=Z1", SUPPLIER_CERT.serial) == SUPPLIER_CERT


def test_the_packaged_library_holds_dccs_test_organisations() -> None:
    assert {certificate.eui for certificate in (SUPPLIER_CERT, OPERATOR_CERT)} == {SUPPLIER, NETWORK_OPERATOR}
    assert (
        LIBRARY.for_eui(Eui("90-B3-D5-1F-30-00-00-02"))[0]
        .certificate.subject.rfc4514_string()
        .startswith("2.5.4.45=#")
    )
    assert certificate_eui(SUPPLIER_CERT.certificate) == SUPPLIER


# -- independent implementations ---------------------------------------------------------------------


def run_xmlsec1(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([XMLSEC1, *args], capture_output=True, text=True, check=False, timeout=30)


def test_a_document_xmlsec1_signed_from_dccs_template_verifies(tmp_path: Path) -> None:
    # DCC's own sample signature block, placeholders emptied and the real certificate named.
    template = SAMPLE.read_bytes().replace(b"ZGVmYXVsdA==", b"")
    template = template.replace(b"CN=U1, OU=07", b"CN=Z1, OU=07").replace(
        b">1234567890<", f">{SUPPLIER_CERT.serial}<".encode()
    )
    (tmp_path / "template.xml").write_bytes(template)
    result = run_xmlsec1(
        "--sign",
        "--privkey-der",
        str(PACKAGED_PKI / "xml-sign-90B3D51F30010000-ds.key"),
        "--output",
        str(tmp_path / "signed.xml"),
        str(tmp_path / "template.xml"),
    )
    assert result.returncode == 0, result.stderr
    signed = (tmp_path / "signed.xml").read_bytes()
    assert verify(signed, LIBRARY).valid
    assert not verify(signed.replace(b":1002<", b":1003<"), LIBRARY).valid


def test_xmlsec1_verifies_what_the_gateway_signs(tmp_path: Path) -> None:
    (tmp_path / "signed.xml").write_bytes(signed_sample())
    (tmp_path / "tampered.xml").write_bytes(signed_sample().replace(b":1002<", b":1003<"))
    certificate = str(PACKAGED_PKI / "xml-sign-90B3D51F30010000-ds.pem")
    assert (
        run_xmlsec1("--verify", "--pubkey-cert-pem", certificate, str(tmp_path / "signed.xml")).returncode
        == 0
    )
    assert (
        run_xmlsec1("--verify", "--pubkey-cert-pem", certificate, str(tmp_path / "tampered.xml")).returncode
        != 0
    )


def test_signxml_verifies_what_the_gateway_signs_and_the_gateway_what_signxml_signs() -> None:
    # XMLDSig's implicit Canonical XML 1.0 after the enveloped transform (signxml defaults to 1.1).
    config = SignatureConfiguration(
        require_x509=False, default_reference_c14n_method=CanonicalizationMethod.CANONICAL_XML_1_0
    )
    pem = SUPPLIER_CERT.certificate.public_bytes(serialization.Encoding.PEM)
    assert XMLVerifier().verify(signed_sample(), x509_cert=pem, expect_config=config).signed_xml is not None

    signer = XMLSigner(
        method=methods.enveloped,
        signature_algorithm=SignatureMethod.ECDSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
    )
    signer.namespaces = {"ds": DS}
    root = etree.fromstring(re.sub(rb"(?s)<ds:Signature.*</ds:Signature>", b"", SAMPLE.read_bytes()))
    key_info = etree.fromstring(
        f'<ds:KeyInfo xmlns:ds="{DS}"><ds:X509Data><ds:X509IssuerSerial>'
        f"<ds:X509IssuerName>{SUPPLIER_CERT.issuer}</ds:X509IssuerName>"
        f"<ds:X509SerialNumber>{SUPPLIER_CERT.serial}</ds:X509SerialNumber>"
        "</ds:X509IssuerSerial></ds:X509Data></ds:KeyInfo>"
    )
    private = serialization.load_der_private_key(
        (PACKAGED_PKI / "xml-sign-90B3D51F30010000-ds.key").read_bytes(), None
    )
    signed = etree.tostring(signer.sign(root, key=private, key_info=key_info, always_add_key_value=False))
    assert verify(signed, LIBRARY).valid


# -- the test PKI and `mp169 verify` ------------------------------------------------------------------


def test_pki_init_makes_a_library_that_verifies_each_users_signature(tmp_path: Path) -> None:
    users = [SUPPLIER, Eui("90-B3-D5-1F-30-01-00-01")]
    layout = init_pki(tmp_path / "pki", users)
    library = CertificateLibrary.from_directory(layout.certificates)
    assert {
        certificate.eui for certificate in (library.for_eui(SUPPLIER) + library.for_eui(users[1]))
    } == set(users)
    assert len(library) == 3  # and the DSP's
    key = SigningKey.from_file(layout.key(SUPPLIER))
    certificate = OrgCertificate.from_pem(layout.certificate(SUPPLIER).read_bytes())
    document = sign(SAMPLE.read_bytes(), key, certificate)
    assert verify(document, library).valid
    assert verify(document, LIBRARY).code is ResponseCode.CERTIFICATE_UNKNOWN
    assert layout.key(SUPPLIER).stat().st_mode & 0o077 == 0
    assert OrgCertificate.from_pem(layout.certificate(SUPPLIER).read_bytes()).current_at(
        datetime.now(UTC) + timedelta(days=365)
    )


def test_mp169_verify_one_line_per_file_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.xml"
    good.write_bytes(signed_sample())
    assert main(["verify", str(good)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {
        "file": str(good),
        "valid": True,
        "signer": SUPPLIER,
        "serial": str(SUPPLIER_CERT.serial),
        "reason": "verified",
        "detail": f"signed by {SUPPLIER}",
    }
    assert main(["verify", str(good), str(SAMPLE), str(tmp_path / "missing.xml")]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["valid"], line["reason"]) for line in lines] == [
        (True, "verified"),
        (False, "certificate-unknown"),
        (False, "unreadable"),
    ]


def test_mp169_verify_with_another_library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.xml"
    good.write_bytes(signed_sample())
    layout = init_pki(tmp_path / "pki", [SUPPLIER])
    assert main(["verify", "--certs", str(layout.certificates), str(good)]) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "certificate-unknown"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.pem").write_text("not a certificate")
    assert main(["verify", "--certs", str(tmp_path / "bad"), str(good)]) == 2
    assert "x.pem" in capsys.readouterr().err


def test_mp169_pki_init_from_an_estate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    users = tmp_path / "users.csv"
    users.write_text(f"user_id,roles\n{SUPPLIER},IS GS\n{NETWORK_OPERATOR},ED\n")
    assert main(["pki", "init", str(tmp_path / "pki"), "--users", str(users)]) == 0
    assert json.loads(capsys.readouterr().out)["users"] == 2
    names = sorted(path.name for path in (tmp_path / "pki" / "certificates").iterdir())
    assert names == sorted(f"{eui}.pem" for eui in ("90-B3-D5-1F-30-00-00-02", SUPPLIER, NETWORK_OPERATOR))
    users.write_text("user_id,roles\nnot-an-eui,IS\n")
    assert main(["pki", "init", str(tmp_path / "pki2"), "--users", str(users)]) == 2
