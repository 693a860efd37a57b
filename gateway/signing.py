"""XML signatures on DUIS documents, as DCC makes and checks them: pure `sign` and `verify`.

DUIS's profile (DCC's signing tool, the SMKI test material): an enveloped ds:Signature, the last child
of the root; SignedInfo canonicalised with exclusive C14N; ECDSA P-256 with SHA-256; exactly one
Reference, URI="" (the whole document), with the enveloped-signature transform (the reference data
then takes XMLDSig's implicit Canonical XML 1.0); a SHA-256 digest; KeyInfo/X509Data/X509IssuerSerial
naming the signer's organisation certificate by issuer name and decimal serial number. `verify` accepts
that shape and the same with an explicit exclusive-C14N transform after the enveloped one (what other
libraries emit); anything else is refused before any cryptography runs.

Canonicalisation, digests and ECDSA are python-xmlsec's (libxmlsec1 over OpenSSL): nothing here
re-implements them. Certificates are read with `cryptography`. A certificate's organisation is the EUI-64
in its subject's x500UniqueIdentifier (OID 2.5.4.45); for a Service Request it must be the RequestID
originator.

Documents are parsed once, with gateway.duis's hardening (no DTD, no entities, no network) but blank
text kept, since the signature covers it; `Verification.root` is that tree, for the caller to read
without parsing again. Safe to call from several threads (one parser per thread).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import xmlsec
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from lxml import etree

from gateway.duis import DEFAULT_MAX_BYTES, NAMESPACE, declares_doctype, parse_request_id
from rules.codes import ResponseCode
from rules.domain import Eui

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from gateway.config import SigningSettings

DS: Final = "http://www.w3.org/2000/09/xmldsig#"
EXCLUSIVE_C14N: Final = "http://www.w3.org/2001/10/xml-exc-c14n#"
ENVELOPED: Final = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
ECDSA_SHA256: Final = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
SHA256: Final = "http://www.w3.org/2001/04/xmlenc#sha256"
_ACCEPTED_TRANSFORMS: Final = ((ENVELOPED,), (ENVELOPED, EXCLUSIVE_C14N))
_D: Final = "{" + DS + "}"
_SIGNATURE: Final = _D + "Signature"
_REQUEST: Final = "{" + NAMESPACE + "}Request"
_REQUEST_ID_PATH: Final = "{" + NAMESPACE + "}Header/{" + NAMESPACE + "}RequestID"
_EUI_BYTES: Final = 8
VERIFIED: Final = "verified"
_DECLARATION: Final = b'<?xml version="1.0" encoding="UTF-8"?>\n'
_THREAD: Final = threading.local()

REASON_CODES: Final[Mapping[str, ResponseCode]] = {
    "signature-missing": ResponseCode.SIGNATURE_MISSING,
    "signature-invalid": ResponseCode.SIGNATURE_INVALID,
    "certificate-unknown": ResponseCode.CERTIFICATE_UNKNOWN,
    "signer-not-originator": ResponseCode.SIGNER_NOT_ORIGINATOR,
    "certificate-not-current": ResponseCode.CERTIFICATE_NOT_CURRENT,
}
"""A failed verification's reason and the response code a Service Request that fails so is answered with.
Other failure reasons (`unreadable`) are not signature verdicts: the document is not DUIS at all."""


class CertificateError(ValueError):
    """A certificate or key file that cannot serve as an organisation's XML-signing credential."""


@dataclass(frozen=True, slots=True)
class OrgCertificate:
    """An organisation's XML-signing certificate, with what verification needs from it."""

    certificate: x509.Certificate = field(repr=False)
    eui: Eui
    serial: int
    issuer: str
    """RFC 4514, as X509IssuerName carries it."""
    public_key: xmlsec.Key = field(repr=False, compare=False)

    @classmethod
    def from_pem(cls, pem: bytes) -> OrgCertificate:
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise CertificateError(f"not a PEM certificate: {exc}") from exc
        key = certificate.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise CertificateError("not an ECDSA P-256 certificate")
        return cls(
            certificate=certificate,
            eui=certificate_eui(certificate),
            serial=certificate.serial_number,
            issuer=certificate.issuer.rfc4514_string(),
            public_key=xmlsec.Key.from_memory(pem, xmlsec.constants.KeyDataFormatCertPem),
        )

    def current_at(self, at: datetime) -> bool:
        certificate = self.certificate
        return certificate.not_valid_before_utc <= at <= certificate.not_valid_after_utc


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key, ready for xmlsec."""

    key: xmlsec.Key = field(repr=False)

    @classmethod
    def from_bytes(cls, data: bytes) -> SigningKey:
        """PKCS#8 (or SEC1) ECDSA P-256, DER or PEM, unencrypted."""
        try:
            loaded = (
                serialization.load_pem_private_key(data, None)
                if data.lstrip().startswith(b"-----")
                else serialization.load_der_private_key(data, None)
            )
        except (ValueError, TypeError) as exc:
            raise CertificateError(f"not an unencrypted private key: {exc}") from exc
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
            raise CertificateError("not an ECDSA P-256 private key")
        der = loaded.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(xmlsec.Key.from_memory(der, xmlsec.constants.KeyDataFormatDer))

    @classmethod
    def from_file(cls, path: Path) -> SigningKey:
        return cls.from_bytes(path.read_bytes())


def certificate_eui(certificate: x509.Certificate) -> Eui:
    """The EUI-64 in the subject's x500UniqueIdentifier (a BIT STRING of 8 bytes)."""
    attributes = certificate.subject.get_attributes_for_oid(NameOID.X500_UNIQUE_IDENTIFIER)
    if len(attributes) != 1:
        raise CertificateError("the subject has no single x500UniqueIdentifier (the organisation's EUI)")
    value = attributes[0].value
    raw = value if isinstance(value, bytes) else value.encode()
    # cryptography keeps the BIT STRING's leading unused-bits octet (0).
    if len(raw) == _EUI_BYTES + 1 and raw[0] == 0:
        raw = raw[1:]
    if len(raw) != _EUI_BYTES:
        raise CertificateError(f"x500UniqueIdentifier is {len(raw)} bytes, not an EUI-64")
    return Eui("-".join(f"{byte:02X}" for byte in raw))


def issuer_key(name: str) -> frozenset[tuple[str, str]] | None:
    """An issuer name compared as DCC's library does: its attributes, whatever their order, case and spacing.

    Accepts RFC 4514 ("CN=Z1,OU=07") and the "CN=Z1, OU=07" form Java prints; None if unreadable.
    """
    parts = [part.strip().partition("=") for part in re.split(r"(?<!\\),", name)]
    try:
        parsed = x509.Name.from_rfc4514_string(
            ",".join(f"{kind.strip().upper()}={value.strip()}" for kind, _, value in parts)
        )
    except ValueError:
        return None
    return _name_key(parsed)


def _name_key(name: x509.Name) -> frozenset[tuple[str, str]]:
    return frozenset(
        (attribute.oid.dotted_string, str(attribute.value).strip().casefold()) for attribute in name
    )


class CertificateLibrary:
    """Organisation certificates by (issuer, serial), as KeyInfo names them, and by organisation EUI."""

    def __init__(self, certificates: Iterable[OrgCertificate]) -> None:
        self._by_issuer_serial: dict[tuple[frozenset[tuple[str, str]], int], OrgCertificate] = {}
        self._by_eui: dict[Eui, list[OrgCertificate]] = {}
        for certificate in certificates:
            self._by_issuer_serial[(_name_key(certificate.certificate.issuer), certificate.serial)] = (
                certificate
            )
            self._by_eui.setdefault(certificate.eui, []).append(certificate)

    @classmethod
    def from_directory(cls, directory: Path) -> CertificateLibrary:
        """Every `*.pem` certificate in the directory (a file that is not one is an error naming it)."""
        certificates = []
        for path in sorted(directory.glob("*.pem")):
            try:
                certificates.append(OrgCertificate.from_pem(path.read_bytes()))
            except CertificateError as exc:
                raise CertificateError(f"{path}: {exc}") from exc
        return cls(certificates)

    def __len__(self) -> int:
        return len(self._by_issuer_serial)

    def find(self, issuer: str, serial: int) -> OrgCertificate | None:
        key = issuer_key(issuer)
        return None if key is None else self._by_issuer_serial.get((key, serial))

    def for_eui(self, eui: Eui) -> tuple[OrgCertificate, ...]:
        return tuple(self._by_eui.get(eui, ()))


@dataclass(frozen=True, slots=True)
class Verification:
    """The verdict on one document's signature.

    `reason` is `verified`, one of REASON_CODES' keys, or `unreadable` (not a DUIS document at all: the
    parser's business). `root` is the parsed document whenever it parsed, valid or not.
    """

    reason: str
    detail: str
    signer: Eui | None = None
    serial: int | None = None
    root: etree._Element | None = field(default=None, repr=False, compare=False)

    @property
    def valid(self) -> bool:
        return self.reason == VERIFIED

    @property
    def code(self) -> ResponseCode | None:
        """The answer to a Service Request that failed so; None when valid or unreadable."""
        return REASON_CODES.get(self.reason)


def document_parser() -> etree.XMLParser:
    """gateway.duis.PARSER's hardening with blank text kept (the signature covers it); one per thread."""
    parser = cast("etree.XMLParser | None", getattr(_THREAD, "parser", None))
    if parser is None:
        parser = _THREAD.parser = etree.XMLParser(
            encoding="utf-8",
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            dtd_validation=False,
            huge_tree=False,
            remove_comments=True,  # comments are outside C14N's output: removing them changes no digest
            remove_pis=True,
            collect_ids=False,
        )
    return parser


def parse_document(document: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> etree._Element | str:
    """The hardened parse, or why there is no tree."""
    if len(document) > max_bytes:
        return f"{len(document)} bytes, over the limit of {max_bytes}"
    if declares_doctype(document):
        return "a DOCTYPE: DUIS documents have none"
    try:
        return etree.fromstring(document, document_parser())
    except etree.XMLSyntaxError as exc:
        return f"not well-formed: {exc.msg}"


def sign(document: bytes, key: SigningKey, certificate: OrgCertificate) -> bytes:
    """The document with an enveloped DUIS signature by `key`, naming `certificate`.

    A ds:Signature already at the end of the root (DCC's templates carry placeholder ones) is replaced.
    Raises ValueError if the document is not well-formed XML.
    """
    root = parse_document(document)
    if isinstance(root, str):
        raise ValueError(root)  # noqa: TRY004 - bad input, not a bad type
    for old in root.findall(_SIGNATURE):
        root.remove(old)
    signature = xmlsec.template.create(
        root, xmlsec.constants.TransformExclC14N, xmlsec.constants.TransformEcdsaSha256, ns="ds"
    )
    root.append(signature)
    reference = xmlsec.template.add_reference(signature, xmlsec.constants.TransformSha256, uri="")
    xmlsec.template.add_transform(reference, xmlsec.constants.TransformEnveloped)
    x509_data = xmlsec.template.add_x509_data(xmlsec.template.ensure_key_info(signature))
    issuer_serial = xmlsec.template.x509_data_add_issuer_serial(x509_data)
    xmlsec.template.x509_issuer_serial_add_issuer_name(issuer_serial, certificate.issuer)
    xmlsec.template.x509_issuer_serial_add_serial_number(issuer_serial, str(certificate.serial))
    context = xmlsec.SignatureContext()
    context.key = key.key
    context.sign(signature)
    return _DECLARATION + etree.tostring(root, encoding="UTF-8")


def verify(
    document: bytes,
    library: CertificateLibrary,
    *,
    at: datetime | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Verification:
    """Check a DUIS document's signature against the library; never raises.

    In order, cheapest first: a parse; one ds:Signature, the root's last child; DUIS's algorithms and
    one Reference URI=""; the certificate that X509IssuerSerial names, in the library; current at `at`
    (default now); for a Service Request, its EUI is the RequestID originator; then the digest and ECDSA.
    """
    root = parse_document(document, max_bytes)
    if isinstance(root, str):
        return Verification("unreadable", root)
    try:
        return _verify(root, library, at or datetime.now(UTC))
    except Exception as exc:  # noqa: BLE001 - untrusted input: the contract is to never raise
        return Verification("signature-invalid", f"{type(exc).__name__}: {exc}", root=root)


def _verify(root: etree._Element, library: CertificateLibrary, at: datetime) -> Verification:  # noqa: PLR0911
    # Only the root's own: a signature inside the content (an S1SP's) is signed data like any other.
    signatures = root.findall(_SIGNATURE)
    if not signatures:
        return Verification("signature-missing", "the document has no ds:Signature", root=root)
    signature = signatures[0]
    if len(signatures) > 1 or root[-1] is not signature:
        return Verification(
            "signature-invalid", "one ds:Signature, the root's last child, is DUIS's form", root=root
        )
    named = _profile(signature)
    if isinstance(named, str):
        return Verification("signature-invalid", named, root=root)
    issuer, serial = named
    certificate = library.find(issuer, serial)
    if certificate is None:
        return Verification(
            "certificate-unknown",
            f"no certificate {issuer} / {serial} in the library",
            serial=serial,
            root=root,
        )
    signer = certificate.eui
    if not certificate.current_at(at):
        return _failed(
            "certificate-not-current",
            f"certificate {serial} is valid {certificate.certificate.not_valid_before_utc:%Y-%m-%d} to "
            f"{certificate.certificate.not_valid_after_utc:%Y-%m-%d}",
            certificate,
            root,
        )
    if root.tag == _REQUEST:
        request_id = parse_request_id(root.findtext(_REQUEST_ID_PATH) or "")
        if request_id is None:
            return Verification("unreadable", "no readable RequestID", signer, serial, root)
        if request_id.originator != signer:
            return _failed(
                "signer-not-originator",
                f"signed by {signer}, but the RequestID originator is {request_id.originator}",
                certificate,
                root,
            )
    context = xmlsec.SignatureContext()
    context.key = certificate.public_key
    try:
        context.verify(signature)
    except xmlsec.Error as exc:
        return _failed(
            "signature-invalid", f"the digest or signature value does not verify ({exc})", certificate, root
        )
    return Verification(VERIFIED, f"signed by {signer}", signer, serial, root)


def _failed(reason: str, detail: str, certificate: OrgCertificate, root: etree._Element) -> Verification:
    return Verification(reason, detail, certificate.eui, certificate.serial, root)


def _profile(signature: etree._Element) -> tuple[str, int] | str:  # noqa: PLR0911
    """(issuer name, serial) if the signature has DUIS's form; else what is wrong with it."""
    signed_info = signature.find(_D + "SignedInfo")
    if signed_info is None:
        return "no SignedInfo"
    if _algorithm(signed_info, "CanonicalizationMethod") != EXCLUSIVE_C14N:
        return "SignedInfo is not canonicalised with exclusive C14N"
    if _algorithm(signed_info, "SignatureMethod") != ECDSA_SHA256:
        return "the signature method is not ECDSA with SHA-256"
    references = signed_info.findall(_D + "Reference")
    if len(references) != 1 or references[0].get("URI") != "":
        return 'DUIS signs with exactly one Reference, URI=""'
    reference = references[0]
    transforms = tuple(
        str(transform.get("Algorithm")) for transform in reference.iterfind(f"{_D}Transforms/{_D}Transform")
    )
    if transforms not in _ACCEPTED_TRANSFORMS:
        return f"transforms {list(transforms)} are not the enveloped signature (and exclusive C14N)"
    if _algorithm(reference, "DigestMethod") != SHA256:
        return "the digest method is not SHA-256"
    issuer_serial = signature.find(f"{_D}KeyInfo/{_D}X509Data/{_D}X509IssuerSerial")
    if issuer_serial is None:
        return "KeyInfo has no X509Data/X509IssuerSerial"
    issuer = (issuer_serial.findtext(_D + "X509IssuerName") or "").strip()
    serial = (issuer_serial.findtext(_D + "X509SerialNumber") or "").strip()
    if not issuer or not serial.isascii() or not serial.isdigit():
        return "X509IssuerSerial needs an issuer name and a decimal serial number"
    return issuer, int(serial)


def _algorithm(parent: etree._Element, name: str) -> str | None:
    element = parent.find(_D + name)
    return None if element is None else element.get("Algorithm")


# -- the packaged test material and configured credentials ----------------------------------------

PACKAGED_PKI: Final = Path(__file__).resolve().parent.parent / "rules" / "duis" / "smki-test"
"""DCC Boxed's public test certificates and keys (rules/duis/smki-test/NOTICE.md)."""
_PACKAGED_DSP: Final = "dsp-xml-sign-90B3D51F30000002-ds"


def certificate_library(settings: SigningSettings) -> CertificateLibrary:
    """The configured organisation certificates (default: the packaged DCC Boxed test ones).

    Raises CertificateError naming the setting and the file that cannot serve."""
    directory = Path(settings.certificates) if settings.certificates else PACKAGED_PKI
    if not directory.is_dir():
        raise CertificateError(f"signing.certificates: {directory} is not a directory")
    try:
        return CertificateLibrary.from_directory(directory)
    except (CertificateError, OSError) as exc:
        raise CertificateError(f"signing.certificates: {exc}") from exc


def dsp_credentials(settings: SigningSettings) -> tuple[SigningKey, OrgCertificate]:
    """The DSP's signing key and certificate (default: the packaged DCC Boxed test DSP's).

    Raises CertificateError naming the setting and the file that cannot serve."""
    key = Path(settings.dsp_key) if settings.dsp_key else PACKAGED_PKI / f"{_PACKAGED_DSP}.key"
    certificate = (
        Path(settings.dsp_certificate) if settings.dsp_certificate else PACKAGED_PKI / f"{_PACKAGED_DSP}.pem"
    )
    try:
        signing_key = SigningKey.from_file(key)
    except (CertificateError, OSError) as exc:
        raise CertificateError(f"signing.dsp_key: {key}: {exc}") from exc
    try:
        return signing_key, OrgCertificate.from_pem(certificate.read_bytes())
    except (CertificateError, OSError) as exc:
        raise CertificateError(f"signing.dsp_certificate: {certificate}: {exc}") from exc


# -- in worker processes (signing.processes) ----------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    """What a signing worker process loaded once, at its start (`start_worker`)."""

    key: SigningKey
    certificate: OrgCertificate
    library: CertificateLibrary | None
    max_bytes: int


_WORKER: list[_Worker] = []


def start_worker(settings: SigningSettings, max_bytes: int) -> None:
    """The initializer of a worker process: keys and certificates cross no process boundary (an
    xmlsec key does not pickle), so each worker reads them itself."""
    key, certificate = dsp_credentials(settings)
    library = certificate_library(settings) if settings.verify else None
    _WORKER[:] = [_Worker(key, certificate, library, max_bytes)]


def sign_in_worker(document: bytes) -> bytes:
    worker = _WORKER[0]
    return sign(document, worker.key, worker.certificate)


def verify_in_worker(document: bytes) -> Verification:
    """As `verify`, without the parsed tree, which cannot cross back: the router parses the bytes."""
    worker = _WORKER[0]
    if worker.library is None:
        raise RuntimeError("this signing worker was started without verification")
    verification = verify(document, worker.library, max_bytes=worker.max_bytes)
    return replace(verification, root=None)
