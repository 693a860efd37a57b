"""A test PKI in the shape of DCC's SMKI: a CA and one XML-signing organisation certificate per user.

`mp169 pki init DIR [--users users.csv]` writes a fresh test CA, then for the DSP and every user of an
estate (a `users.csv` as `mp169 simulate estate` writes it) an ECDSA P-256 key and an organisation
certificate whose subject carries the user's EUI-64 in x500UniqueIdentifier (a BIT STRING, as DCC's
certificates have it) and OU 87 (89 for the DSP), signed by the CA with ECDSA-SHA256:

    DIR/ca.pem, DIR/ca.key                 the test CA (keep the key away from the gateway)
    DIR/certificates/<EUI>.pem            every organisation certificate: point signing.certificates here
    DIR/keys/<EUI>.key                    each organisation's private key (PKCS#8 PEM, mode 0600)

The gateway never reads the CA: like DCC's certificate library, it trusts the organisation
certificates it is given. For test use only: real deployments take their certificates from the SMKI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from gateway.inventory import InventoryFileError, parse_users
from gateway.options import eui_argument
from rules.domain import DCC_EUI, Eui, utc_now

if TYPE_CHECKING:
    from collections.abc import Iterable

ORGANISATION_OU: Final = "87"
"""OU of DCC's XML-signing organisation certificates."""
DSP_OU: Final = "89"
"""OU of the DSP's own XML-signing certificate."""
VALIDITY: Final = dt.timedelta(days=3650)
_BACKDATE: Final = dt.timedelta(days=1)
_KEY_MODE: Final = 0o600


@dataclass(frozen=True, slots=True)
class Credential:
    """A private key and the certificate for it."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def make_ca(at: dt.datetime, name: str = "MP169 test CA") -> Credential:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "07"),
        ]
    )
    certificate = (
        _builder(subject, subject, key.public_key(), at)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(certifies=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Credential(key, certificate)


def make_organisation(
    ca: Credential, eui: Eui, at: dt.datetime, *, ou: str = ORGANISATION_OU, validity: dt.timedelta = VALIDITY
) -> Credential:
    """An XML-signing organisation certificate for `eui`, issued by `ca`, valid from a day before `at`."""
    key = ec.generate_private_key(ec.SECP256R1())
    unique_identifier = b"\x00" + bytes.fromhex(eui.replace("-", ""))  # BIT STRING: unused-bits octet first
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, unique_identifier, _type=_ASN1Type.BitString),
        ]
    )
    certificate = (
        _builder(subject, ca.certificate.subject, key.public_key(), at, validity)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(certifies=False), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return Credential(key, certificate)


def _key_usage(*, certifies: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; an organisation certificate signs documents."""
    return x509.KeyUsage(
        digital_signature=not certifies,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=certifies,
        crl_sign=certifies,
        encipher_only=False,
        decipher_only=False,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    at: dt.datetime,
    validity: dt.timedelta = VALIDITY,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - _BACKDATE)
        .not_valid_after(at + validity)
    )


@dataclass(frozen=True, slots=True)
class PkiLayout:
    directory: Path

    @property
    def certificates(self) -> Path:
        return self.directory / "certificates"

    @property
    def keys(self) -> Path:
        return self.directory / "keys"

    def certificate(self, eui: Eui) -> Path:
        return self.certificates / f"{eui}.pem"

    def key(self, eui: Eui) -> Path:
        return self.keys / f"{eui}.key"


def init_pki(
    directory: Path, users: Iterable[Eui], *, dsp_eui: Eui = DCC_EUI, at: dt.datetime | None = None
) -> PkiLayout:
    """Write a fresh test CA and a key and certificate for the DSP and each user (see the module doc)."""
    at = at or utc_now()
    layout = PkiLayout(directory)
    layout.certificates.mkdir(parents=True, exist_ok=True)
    layout.keys.mkdir(parents=True, exist_ok=True)
    ca = make_ca(at)
    _write_key(directory / "ca.key", ca)
    (directory / "ca.pem").write_bytes(ca.certificate_pem())
    for eui, ou in [(dsp_eui, DSP_OU), *((user, ORGANISATION_OU) for user in dict.fromkeys(users))]:
        credential = make_organisation(ca, eui, at, ou=ou)
        _write_key(layout.key(eui), credential)
        layout.certificate(eui).write_bytes(credential.certificate_pem())
    return layout


def _write_key(path: Path, credential: Credential) -> None:
    path.touch(mode=_KEY_MODE)
    path.chmod(_KEY_MODE)
    path.write_bytes(credential.key_pem())


# -- the command ----------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pki = subparsers.add_parser("pki", help="test PKI: a CA and XML-signing certificates and keys")
    actions = pki.add_subparsers(dest="action", required=True, metavar="ACTION")
    command = actions.add_parser(
        "init",
        help="make a fresh test CA and a key and certificate for the DSP and every user",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument(
        "directory", type=Path, metavar="DIR", help="where to write the CA, certificates and keys"
    )
    command.add_argument("--users", type=Path, help="users CSV (as `mp169 simulate estate` writes it)")
    command.add_argument(
        "--dsp-eui", type=eui_argument, default=DCC_EUI, help=f"the DSP's EUI (default {DCC_EUI})"
    )
    command.set_defaults(handler=run_init)


def run_init(args: argparse.Namespace) -> int:
    users: list[Eui] = []
    if args.users is not None:
        try:
            users = [
                user.user_id for user in parse_users(args.users.read_text(encoding="utf-8").splitlines())
            ]
        except (OSError, InventoryFileError) as exc:
            sys.stderr.write(f"mp169 pki init: {args.users}: {exc}\n")
            return 2
    layout = init_pki(args.directory, users, dsp_eui=args.dsp_eui)
    summary = {"certificates": str(layout.certificates), "keys": str(layout.keys), "users": len(users)}
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
