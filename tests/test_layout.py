"""The package layout's rules (README "Layout"): imports run one way between the domains, and no module grows past
400 lines without saying why at its top."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ops_pipeline"
# what each domain may import from
ALLOWED = {"platform": {"platform"}, "targets": {"platform", "targets"}, "backup": {"platform", "backup"},
           "release": {"platform", "targets", "backup", "release"}}


def imported_modules(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ops_pipeline"):
            found += [node.module] if node.module != "ops_pipeline" else [f"ops_pipeline.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ops_pipeline.")]
    return found


def test_imports_run_one_way_between_domains():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        domain = path.relative_to(PACKAGE).parts[0]
        if domain not in ALLOWED:
            continue  # definitions.py merges every domain
        for module in imported_modules(path):
            if module.split(".")[1] not in ALLOWED[domain]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_a_module_over_400_lines_says_why():
    unexplained = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                   if p.read_text().count("\n") > 420 and "Over 400 lines" not in p.read_text()[:1500]]
    assert not unexplained, unexplained
