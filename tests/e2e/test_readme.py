"""The README's capability table is the one the strategies declare (it cannot drift)."""

import re

from rapid.builtin.listing import capability_table
from tests.conftest import REPO


def test_capability_table_is_generated(builtin_registry):
    readme = (REPO / "README.md").read_text()
    m = re.search(r"<!-- capability table: [^>]*-->\n(.*?)<!-- end of capability table -->", readme, re.S)
    assert m, "the capability table markers are missing from README.md"
    assert m.group(1) == capability_table(builtin_registry), \
        "regenerate it: RAPID_DISABLE_PLUGIN_AUTOLOAD=1 rapid plugins --capabilities"
