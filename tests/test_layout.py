"""One data path: streaming -> trainer -> embeddings, wired by cluster. No module reaches
back up that path (streaming imports neither trainer nor embeddings, ...)."""
import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

ORDER = ["streaming", "trainer", "embeddings", "cluster"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", ORDER)
def test_no_import_reaches_back_up_the_path(package):
    downstream = set(ORDER[ORDER.index(package) + 1:])
    for path in (ROOT / package).rglob("*.py"):
        bad = _imports(path) & downstream
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
