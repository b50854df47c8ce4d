"""docs/SECURITY.md names the tests that cover each class of bad input: every named test
must exist, so the table cannot silently point at a renamed or deleted test."""

from __future__ import annotations

import re

from marrowscope.paths import PROJECT_ROOT

DOC = PROJECT_ROOT / "docs" / "SECURITY.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_test_the_security_table_names_exists():
    text = DOC.read_text()
    refs = set(REF.findall(text))
    assert len(refs) >= 40, "the table lost its rows"
    missing = [
        f"{path}::{name}"
        for path, name in sorted(refs)
        if not (PROJECT_ROOT / path).is_file()
        or not re.search(rf"^(async )?def {name}\(", (PROJECT_ROOT / path).read_text(), re.M)
    ]
    assert missing == []
    assert "## This round's findings" in text  # the section the lead fills in
    assert str(PROJECT_ROOT) not in text
