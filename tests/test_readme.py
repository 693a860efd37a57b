"""The README states facts the code owns: keep them equal (response codes, flag requests, first lines)."""

from __future__ import annotations

import re
from pathlib import Path

from rules.codes import RESPONSE_CODE_MEANINGS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def response_code_table() -> str:
    rows = [f"| `{code.value}` | {meaning} |" for code, meaning in RESPONSE_CODE_MEANINGS.items()]
    return "\n".join(["| Code | Meaning |", "|---|---|", *rows])


def test_the_response_code_table_is_generated_from_rules_codes() -> None:
    found = re.search(r"<!-- response-codes:start -->\n(.*?)\n<!-- response-codes:end -->", README, re.DOTALL)
    assert found is not None
    assert found.group(1) == response_code_table()


def test_the_flag_request_examples_are_the_shipped_files() -> None:
    for srv in ("8.15.1", "8.15.2"):
        found = re.search(rf"<!-- flag-request:{re.escape(srv)} -->\n```xml\n(.*?)```", README, re.DOTALL)
        assert found is not None, srv
        [shipped] = (ROOT / "rules" / "mp169-requests").glob(f"{srv}_*.XML")
        assert found.group(1) == shipped.read_text(encoding="utf-8")


def test_the_first_lines_are_the_newcomers_two_commands() -> None:
    block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands == [
        "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && mp169 demo",
        "bash .ci/run",
    ]
    assert README.index("```sh") < 40  # right under the title
