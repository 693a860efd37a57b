"""DUIS schema validation: DCC's V5.4, or its MP169 extension for a document that uses an MP169 addition.

`rules/duis/schema/DUIS Schema V5.4 MP169.xsd` is V5.4 plus additions only (Service Reference 8.15, the
project's response codes, the 8.2 Device's reduced-communications elements), so every V5.4-valid
document is valid under it. A document is judged against V5.4 first; only when V5.4 refuses it is it
judged against the extension, and valid there means it uses an MP169 addition. The errors reported
for a document neither accepts are the extension's.

Each schema is built once per process, from the packaged files only: the schema documents are parsed
with entity expansion, DTD loading and network access off, and a resolver serves their imports
(xmldsig, MMC) from the schema directory and refuses any other location. Validation is thread-safe
(lxml makes a validation context per call).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast
from urllib.parse import unquote, urlsplit

from lxml import etree

from gateway.duis import PARSER, declares_doctype

if TYPE_CHECKING:
    from collections.abc import Iterable

SCHEMA_DIR: Final = Path(__file__).resolve().parent.parent / "rules" / "duis" / "schema"
_XS: Final = "{http://www.w3.org/2001/XMLSchema}"
_MAX_ERRORS: Final = 5
_THREAD: Final = threading.local()


class DuisSchema(StrEnum):
    V54 = "DUIS Schema V5.4.xsd"
    MP169 = "DUIS Schema V5.4 MP169.xsd"


@dataclass(frozen=True, slots=True)
class Validity:
    """The verdict on one document: `schema` is the one it was judged against in the end."""

    valid: bool
    schema: DuisSchema
    errors: tuple[str, ...] = ()


class _SchemaDirectory(etree.Resolver):
    """Serves the schema's imports from the schema directory; refuses every other location."""

    def resolve(self, system_url: str, public_id: str, context: object = None) -> object:  # noqa: ARG002
        path = Path(unquote(urlsplit(system_url).path))
        if path.parent != SCHEMA_DIR or not path.is_file():
            raise etree.XMLSchemaParseError(f"schema location outside {SCHEMA_DIR}: {system_url!r}")
        return self.resolve_filename(str(path), context)  # type: ignore[attr-defined]  # not in lxml-stubs


def _schema_parser() -> etree.XMLParser:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    parser.resolvers.add(_SchemaDirectory())
    return parser


@functools.cache
def load_schema(which: DuisSchema) -> etree.XMLSchema:
    """The schema, built on first use and kept for the life of the process."""
    document = etree.parse(str(SCHEMA_DIR / which.value), _schema_parser())
    for element in document.getroot().iter(f"{_XS}import", f"{_XS}include"):
        # libxml2 cannot open a relative location with a space ("MMC Schema V5.4.xsd") unescaped.
        location = element.get("schemaLocation")
        if location is not None:
            element.set("schemaLocation", location.replace(" ", "%20"))
    return etree.XMLSchema(document)


def _service_reference_variants() -> frozenset[str]:
    """Every SRV the extension's ServiceReferenceVariant enumerates (V5.4's and 8.15.1 / 8.15.2)."""
    tree = etree.parse(str(SCHEMA_DIR / DuisSchema.MP169.value), _schema_parser())
    values = tree.xpath(
        "xs:simpleType[@name='ServiceReferenceVariant']//xs:enumeration/@value", namespaces={"xs": _XS[1:-1]}
    )
    return frozenset(str(value) for value in cast("list[str]", values))


def validate(document: bytes | etree._Element) -> Validity:
    """Judge a DUIS document (bytes, or a root the caller parsed with a hardened parser)."""
    if isinstance(document, bytes):
        root = _parse(document)
        if isinstance(root, Validity):
            return root
    else:
        root = document
    if _errors(DuisSchema.V54, root) is None:
        return Validity(valid=True, schema=DuisSchema.V54)
    errors = _errors(DuisSchema.MP169, root)
    return Validity(valid=errors is None, schema=DuisSchema.MP169, errors=errors or ())


def thread_parser() -> etree.XMLParser:
    """gateway.duis's hardened parser, one copy per thread (an lxml parser serves one thread at a time)."""
    parser = cast("etree.XMLParser | None", getattr(_THREAD, "parser", None))
    if parser is None:
        parser = _THREAD.parser = cast("etree.XMLParser", PARSER.copy())
    return parser


def _parse(document: bytes) -> etree._Element | Validity:
    if declares_doctype(document):
        return Validity(valid=False, schema=DuisSchema.V54, errors=("a DOCTYPE: DUIS documents have none",))
    try:
        return etree.fromstring(document, thread_parser())
    except etree.XMLSyntaxError as exc:
        return Validity(valid=False, schema=DuisSchema.V54, errors=(f"not well-formed: {exc.msg}",))


def _errors(which: DuisSchema, root: etree._Element) -> tuple[str, ...] | None:
    try:
        load_schema(which).assertValid(root)
    except etree.DocumentInvalid as exc:
        log = cast("Iterable[etree._LogEntry]", exc.error_log)  # noqa: SLF001 - lxml-stubs lack __iter__
        entries = list(log)[:_MAX_ERRORS]
        return tuple(f"line {entry.line}: {entry.message}" for entry in entries) or (str(exc),)
    return None


SERVICE_REFERENCE_VARIANTS = _service_reference_variants()
"""Read once, when the module is imported: the router asks it on its hot path and must do no I/O there."""
