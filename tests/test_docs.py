"""docs/architecture.md lists every module with its size (issue 16's map for a newcomer)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_architecture_table_lists_every_module_with_its_line_count():
    table = {m.group(1): int(m.group(2)) for m in
             re.finditer(r"^\| `(deface/[\w/]+\.py)` \| (\d+) \|", (ROOT / "docs/architecture.md").read_text(), re.M)}
    modules = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob("deface/*.py"), *ROOT.glob("deface/data/*.py")]
                     if not (p.name == "__init__.py" and p.parent.name == "data"))
    assert sorted(table) == modules, "docs/architecture.md must list exactly the package's modules"
    for module, listed in table.items():
        actual = len((ROOT / module).read_text().splitlines())
        # a count that drifts a little is still a true picture; a module that grew or shrank by a tenth is not
        assert abs(actual - listed) <= max(10, 0.1 * actual), f"{module}: {listed} lines listed, {actual} in the file"
