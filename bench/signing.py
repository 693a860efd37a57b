"""XML signature cost per message: python-xmlsec (what the gateway uses) and signxml, side by side.

On the 129 real DUIS sample requests, one core. Each round times, one right after the other and in an
order that rotates between rounds:

- `verify`: gateway.signing.verify (hardened parse, DUIS profile checks, certificate lookup, C14N,
  SHA-256, ECDSA P-256 verification by libxmlsec1) of the samples signed by their originator;
- `signxml verify`: signxml's XMLVerifier on the same documents, with the certificate given (as the
  library lookup would) and the same algorithm expectations;
- `sign`: gateway.signing.sign (parse, template, C14N, digest, ECDSA signature, serialise);
- `signxml sign`: signxml's XMLSigner making the equivalent enveloped signature;
- `parse`: a bare parse of the same bytes with gateway.duis's hardened parser, the yardstick.

Each is measured on all the samples (their mean, which the few large ones, up to 26 KB, dominate) and on
the typical request alone (4.8.1 Read Active Import Profile Data, 2.9 KB signed). Figures are medians
over rounds of the mean µs per message. The machine is shared (2 cores, other
sessions): compare the columns of one run, not runs.

    python -m bench.signing                  # 9 rounds of 5 passes over the samples
    python -m bench.signing --rounds 3 --passes 2

Writes bench/results/signing.json and prints Markdown lines for the README.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import signxml
import xmlsec
from cryptography.hazmat.primitives import serialization
from lxml import etree
from signxml import SignatureConfiguration, XMLSigner, XMLVerifier
from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod

from bench.parse_decide import pin_to_one_core
from gateway.duis import PARSER
from gateway.signing import DS, PACKAGED_PKI, CertificateLibrary, OrgCertificate, SigningKey, sign, verify

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "rules" / "duis" / "requests"
RESULTS = Path(__file__).parent / "results" / "signing.json"
NAME = "xml-sign-90B3D51F30010000-ds"  # the originator of nearly all of DCC's samples
TYPICAL = "ECS22b_4.8.1_SINGLE_SUCCESS_REQUEST_DUIS.XML"


def signxml_pair(certificate: OrgCertificate) -> tuple[Callable[[bytes], object], Callable[[bytes], object]]:
    """signxml's sign and verify, configured for DUIS's algorithms."""
    private = serialization.load_der_private_key((PACKAGED_PKI / f"{NAME}.key").read_bytes(), None)
    pem = certificate.certificate.public_bytes(serialization.Encoding.PEM)
    signer = XMLSigner(
        method=signxml.methods.enveloped,
        signature_algorithm=SignatureMethod.ECDSA_SHA256,
        digest_algorithm=DigestAlgorithm.SHA256,
        c14n_algorithm=CanonicalizationMethod.EXCLUSIVE_XML_CANONICALIZATION_1_0,
    )
    signer.namespaces = {"ds": DS}
    config = SignatureConfiguration(
        require_x509=False,
        expect_references=1,
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA256}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA256}),
        default_reference_c14n_method=CanonicalizationMethod.CANONICAL_XML_1_0,
    )
    key_info = (
        f'<ds:KeyInfo xmlns:ds="{DS}"><ds:X509Data><ds:X509IssuerSerial><ds:X509IssuerName>'
        f"{certificate.issuer}</ds:X509IssuerName><ds:X509SerialNumber>{certificate.serial}"
        "</ds:X509SerialNumber></ds:X509IssuerSerial></ds:X509Data></ds:KeyInfo>"
    ).encode()
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)

    def signxml_sign(data: bytes) -> object:
        root = etree.fromstring(data, parser)
        for old in root.findall(f"{{{DS}}}Signature"):
            root.remove(old)
        signed = signer.sign(
            root, key=private, key_info=etree.fromstring(key_info), always_add_key_value=False
        )
        return etree.tostring(signed)

    def signxml_verify(data: bytes) -> object:
        return XMLVerifier().verify(data, x509_cert=pem, expect_config=config, parser=parser)

    return signxml_sign, signxml_verify


def per_message_us(run: Callable[[bytes], object], documents: list[bytes], passes: int) -> float:
    gc.collect()
    start = time.perf_counter()
    for _ in range(passes):
        for document in documents:
            run(document)
    return (time.perf_counter() - start) / (passes * len(documents)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--passes", type=int, default=5, help="passes over the samples per measurement")
    args = parser.parse_args()

    core = pin_to_one_core()
    key = SigningKey.from_file(PACKAGED_PKI / f"{NAME}.key")
    certificate = OrgCertificate.from_pem((PACKAGED_PKI / f"{NAME}.pem").read_bytes())
    library = CertificateLibrary([certificate])
    # Every sample as its originator would sign it (the few from other originators too, with this key:
    # verification then runs to the end only for the others' profile, so they are left out).
    paths = sorted(SAMPLES.glob("*.XML"))
    unsigned = [path.read_bytes() for path in paths]
    signed = [
        document
        for document in (sign(data, key, certificate) for data in unsigned)
        if verify(document, library).valid
    ]
    signxml_sign, signxml_verify = signxml_pair(certificate)
    for document in signed[:3]:
        signxml_verify(document)  # the documents verify under signxml too (raises otherwise)
        if not verify(etree.tostring(etree.fromstring(signxml_sign(document))), library).valid:
            raise SystemExit("signxml's signature does not verify here")

    def gateway_verify(data: bytes) -> object:
        return verify(data, library)

    def gateway_sign(data: bytes) -> object:
        return sign(data, key, certificate)

    def parse(data: bytes) -> object:
        return etree.fromstring(data, PARSER)

    typical = [sign((SAMPLES / TYPICAL).read_bytes(), key, certificate)] * len(signed)
    runs: dict[str, Callable[[bytes], object]] = {
        "verify": gateway_verify,
        "signxml_verify": signxml_verify,
        "sign": gateway_sign,
        "signxml_sign": signxml_sign,
        "parse": parse,
    }
    measures = {
        f"{name}{suffix}": (run, documents)
        for suffix, documents in (("", signed), ("_typical", typical))
        for name, run in runs.items()
    }
    names = list(measures)
    for run, documents in measures.values():
        per_message_us(run, documents[:10], 1)  # warm-up
    rounds: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(args.rounds):
        order = names[round_number % len(names) :] + names[: round_number % len(names)]
        for name in order:
            run, documents = measures[name]
            rounds[name].append(per_message_us(run, documents, args.passes))
    median = {name: round(statistics.median(values), 1) for name, values in rounds.items()}
    typical_us = {name: median[f"{name}_typical"] for name in runs}
    result = {
        "documents": len(signed),
        "mean_signed_bytes": round(sum(map(len, signed)) / len(signed)),
        "rounds": args.rounds,
        "messages_per_measurement": args.passes * len(signed),
        "per_message_us": {name: median[name] for name in runs},
        "per_message_us_typical": typical_us,
        "typical_document": TYPICAL,
        "per_message_us_min_max": {name: [round(min(v), 1), round(max(v), 1)] for name, v in rounds.items()},
        "verify_vs_signxml": round(median["signxml_verify"] / median["verify"], 2),
        "sign_vs_signxml": round(median["signxml_sign"] / median["sign"], 2),
        "verify_vs_parse": round(median["verify"] / median["parse"], 1),
        "typical_verify_vs_signxml": round(typical_us["signxml_verify"] / typical_us["verify"], 2),
        "typical_sign_vs_signxml": round(typical_us["signxml_sign"] / typical_us["sign"], 2),
        "pinned_core": core,
        "python": platform.python_version(),
        "libxmlsec1": ".".join(map(str, xmlsec.get_libxmlsec_version())),
        "signxml": metadata.version("signxml"),
        "python_xmlsec": metadata.version("xmlsec"),
        "lxml": ".".join(map(str, etree.LXML_VERSION)),
        "machine": platform.machine(),
        "shared_machine": True,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for label, figures in ((f"{len(signed)} DUIS samples, mean", median), ("typical 4.8.1", typical_us)):
        print(
            f"| {label} | verify: python-xmlsec {figures['verify']} µs, signxml {figures['signxml_verify']}"
            f" µs | sign: python-xmlsec {figures['sign']} µs, signxml {figures['signxml_sign']} µs"
            f" | bare parse {figures['parse']} µs |"
        )


if __name__ == "__main__":
    main()
