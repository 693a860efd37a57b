"""The MP169 extension of DUIS V5.4 only adds to it; gateway.schema judges a document by the right one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import pytest
from lxml import etree

from gateway.schema import SCHEMA_DIR, DuisSchema, load_schema, thread_parser, validate
from rules.codes import ResponseCode

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "rules" / "duis" / "requests").glob("*.XML"))
FLAG_REQUESTS = sorted((ROOT / "rules" / "mp169-requests").glob("*.XML"))
XS = "{http://www.w3.org/2001/XMLSchema}"
NS = {"xs": XS[1:-1]}
REQUEST_BODY = "/complexType[Request]/sequence[None]/element[Body]/complexType[None]/choice[None]"
READER = etree.XMLParser(
    remove_comments=True, remove_blank_text=True, resolve_entities=False, no_network=True
)


def schema_tree(which: DuisSchema) -> etree._Element:
    return etree.parse(str(SCHEMA_DIR / which.value), READER).getroot()


def enumeration(which: DuisSchema, simple_type: str) -> list[str]:
    values = schema_tree(which).xpath(
        f"xs:simpleType[@name='{simple_type}']//xs:enumeration/@value", namespaces=NS
    )
    return [str(value) for value in cast("list[str]", values)]


def key(element: etree._Element) -> tuple[object, ...]:
    return (element.tag, element.get("name"), element.get("ref"), element.get("value"))


def additions(base: etree._Element, extension: etree._Element, path: str = "") -> list[tuple[str, str]]:
    """What `extension` has that `base` has not, as (where, what); fails if it changes or drops anything.

    Every base child must appear in the extension's children in the same order and unchanged (same
    attributes, same text, recursively); the others are additions.
    """
    assert base.tag == extension.tag, path
    assert dict(base.attrib) == dict(extension.attrib), f"{path}: attributes changed"
    assert (base.text or "").strip() == (extension.text or "").strip(), f"{path}: text changed"
    found: list[tuple[str, str]] = []
    remaining = list(base)
    for child in extension:
        if remaining and key(remaining[0]) == key(child):
            original = remaining.pop(0)
            found += additions(original, child, f"{path}/{etree.QName(child).localname}[{child.get('name')}]")
        else:
            found.append((path, f"{etree.QName(child).localname} {child.get('name') or child.get('value')}"))
            assert_an_addition_only(extension, child, path)
    assert not remaining, f"{path}: the extension drops {[key(element) for element in remaining]}"
    return found


def assert_an_addition_only(parent: etree._Element, child: etree._Element, path: str) -> None:
    """An added node may not narrow what V5.4 accepts."""
    parent_tag, tag = parent.tag, child.tag
    if parent_tag == f"{XS}schema":
        assert tag in {f"{XS}complexType", f"{XS}simpleType", f"{XS}element"}, path  # a new global type
    elif tag == f"{XS}enumeration":
        pass  # one more value
    elif parent_tag == f"{XS}choice":
        pass  # one more alternative
    else:
        assert parent_tag == f"{XS}sequence", path
        assert child.get("minOccurs") == "0", f"{path}: an added sequence element must be optional"


@pytest.fixture(scope="module")
def added() -> list[tuple[str, str]]:
    return additions(schema_tree(DuisSchema.V54), schema_tree(DuisSchema.MP169))


def test_the_extension_only_adds_and_these_are_its_additions(added: list[tuple[str, str]]) -> None:
    assert sorted(addition for addition in added if not addition[1].startswith("enumeration")) == sorted(
        [
            ("", "simpleType ConsumerReference"),
            ("", "complexType SetReducedCommunications"),
            ("", "complexType RemoveReducedCommunications"),
            ("", "complexType ReducedCommunicationsStatus"),
            (REQUEST_BODY, "element SetReducedCommunications"),
            (REQUEST_BODY, "element RemoveReducedCommunications"),
            ("/complexType[Device]/sequence[None]", "element ReducedCommunicationsConsumerChoice"),
            ("/complexType[Device]/sequence[None]", "element ReducedCommunicationsSetDateTime"),
            (
                "/complexType[ResponseMessage]/sequence[None]/choice[None]",
                "element ReducedCommunicationsStatus",
            ),
        ]
    )


def test_enumerations_grow_by_8_15_and_the_projects_response_codes() -> None:
    def grown(simple_type: str) -> list[str]:
        base = enumeration(DuisSchema.V54, simple_type)
        extended = enumeration(DuisSchema.MP169, simple_type)
        assert set(base) <= set(extended)
        return [value for value in extended if value not in base]

    assert grown("ServiceReference") == ["8.15"]
    assert grown("ServiceReferenceVariant") == ["8.15.1", "8.15.2"]
    v54_codes = set(enumeration(DuisSchema.V54, "ResponseCode"))
    assert grown("ResponseCode") == [code.value for code in ResponseCode if code.value not in v54_codes]


def test_every_code_in_rules_codes_is_in_the_extension() -> None:
    extension = set(enumeration(DuisSchema.MP169, "ResponseCode"))
    missing = [code.value for code in ResponseCode if code.value not in extension]
    assert not missing, (
        f"add to 'DUIS Schema V5.4 MP169.xsd' (ResponseCode, after the MP169 comment): {missing}"
    )


def test_project_codes_follow_the_agreed_numbering() -> None:
    # DUIS codes keep DUIS's meaning; the project's own are E169, E0815nn and five-digit E169nn.
    v54_codes = set(enumeration(DuisSchema.V54, "ResponseCode"))
    own = [code.value for code in ResponseCode if code.value not in v54_codes]
    assert all(re.fullmatch(r"E169|E0815\d\d|E169\d\d", code) for code in own), own


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda path: path.name)
def test_every_dcc_sample_is_valid_under_both(sample: Path) -> None:
    root = etree.fromstring(sample.read_bytes(), thread_parser())
    assert load_schema(DuisSchema.V54).validate(root)
    assert load_schema(DuisSchema.MP169).validate(root)
    assert validate(root).schema is DuisSchema.V54


def test_all_129_samples_are_there() -> None:
    assert len(SAMPLES) == 129


@pytest.mark.parametrize("request_file", FLAG_REQUESTS, ids=lambda path: path.name)
def test_the_flag_requests_need_the_extension(request_file: Path) -> None:
    data = request_file.read_bytes()
    assert not load_schema(DuisSchema.V54).validate(etree.fromstring(data, thread_parser()))
    assert validate(data) == validate(data) == type(validate(data))(valid=True, schema=DuisSchema.MP169)


def test_the_readmes_xml_validates() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```xml\n(.*?)```", readme, re.DOTALL)
    assert blocks
    for block in blocks:
        assert validate(block.encode()).valid, block[:200]


def test_a_flag_request_without_its_declaration_is_invalid() -> None:
    data = FLAG_REQUESTS[0].read_bytes()
    assert b"AllReasonableStepsTaken" in data
    stripped = re.sub(rb"<sr:AllReasonableStepsTaken>.*?</sr:AllReasonableStepsTaken>", b"", data)
    verdict = validate(stripped)
    assert not verdict.valid
    assert verdict.schema is DuisSchema.MP169
    assert "AllReasonableStepsTaken" in verdict.errors[0]


def test_bad_documents_are_judged_not_raised() -> None:
    assert not validate(b"<sr:Request").valid
    assert validate(b'<!DOCTYPE r [<!ENTITY e "x">]><r>&e;</r>').errors == (
        "a DOCTYPE: DUIS documents have none",
    )
    assert not validate(b"<Request/>").valid


def test_the_schema_loader_refuses_locations_outside_its_directory(tmp_path: Path) -> None:
    from gateway.schema import _SchemaDirectory  # noqa: PLC0415 - the resolver itself is the subject

    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    parser.resolvers.add(_SchemaDirectory())
    outside = tmp_path / "outside.xsd"
    outside.write_text(f'<xs:schema xmlns:xs="{XS[1:-1]}"/>')
    importing = (
        f'<xs:schema xmlns:xs="{XS[1:-1]}"><xs:import namespace="urn:x" schemaLocation="{outside.as_uri()}"/>'
        "</xs:schema>"
    )
    document = etree.fromstring(importing, parser, base_url=str(SCHEMA_DIR / "probe.xsd")).getroottree()
    with pytest.raises(etree.XMLSchemaParseError):
        etree.XMLSchema(document)


def test_schemas_are_built_once() -> None:
    assert load_schema(DuisSchema.MP169) is load_schema(DuisSchema.MP169)
