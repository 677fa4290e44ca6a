"""Every third-party module the package imports is declared in pyproject.toml.

An import that works only because some other package happens to pull its distribution in (as
prometheus_client once came only through flower) breaks the README's first command on a fresh
machine. The imports are read with ``ast`` (top level and inside functions), each module is mapped
to the distributions that provide it in this environment, and those must be named in
``dependencies`` or, for a module imported only inside functions, in a runtime extra.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "pacsworker"
# the test extra is for the suite; code under src must not rely on it
NOT_RUNTIME_EXTRAS = {"test"}
# modules installed by other means than pyproject on purpose; each may only be imported inside a function
OUTSIDE_PYPROJECT = {
    "deepbet": "scripts/setup.sh and the Dockerfile install it with --no-deps (its declared "
               "dependencies pull a GUI toolkit inference does not use); [brain] holds what inference needs",
    "cupy": "optional GPU labelling for ct-body on CUDA hosts; falls back to scikit-image on ImportError",
    "cucim": "optional GPU labelling for ct-body on CUDA hosts; falls back to scikit-image on ImportError",
}


@dataclass(frozen=True)
class ModuleImport:
    module: str  # the top-level name, as packages_distributions() keys it
    where: str  # path:line
    in_function: bool


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"cannot read a distribution name from requirement {requirement!r}"
    return canonical(match.group(1))


def third_party_imports(package: Path = PACKAGE, root: Path = REPO) -> list[ModuleImport]:
    """Every absolute import of a module that is neither the standard library's nor pacsworker's."""
    found = []

    def visit(node: ast.AST, path: Path, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            else:
                names = []
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "pacsworker":
                    where = f"{path.relative_to(root)}:{child.lineno}"
                    found.append(ModuleImport(top, where, in_function))
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, path, nested)

    for path in sorted(package.rglob("*.py")):
        visit(ast.parse(path.read_text(), filename=str(path)), path, False)
    return found


def undeclared_imports(pyproject_text: str, imports: list[ModuleImport]) -> list[str]:
    """One line per import that pyproject (given as text) does not account for."""
    project = tomllib.loads(pyproject_text)["project"]
    core = {requirement_name(r) for r in project["dependencies"]}
    extras = {canonical(name): {requirement_name(r) for r in requirements}
              for name, requirements in project.get("optional-dependencies", {}).items()
              if name not in NOT_RUNTIME_EXTRAS}
    providers = importlib.metadata.packages_distributions()
    problems = []
    for item in imports:
        if item.module in OUTSIDE_PYPROJECT:
            if not item.in_function:
                problems.append(f"{item.where}: {item.module} is imported at module level, but it is optional "
                                f"({OUTSIDE_PYPROJECT[item.module]}); import it inside the function that needs it")
            continue
        dists = {canonical(d) for d in providers.get(item.module, [])}
        if not dists:
            problems.append(f"{item.where}: {item.module} is not installed here and pyproject.toml declares "
                            "nothing that provides it")
        elif dists & core:
            continue
        elif in_extras := sorted(name for name, reqs in extras.items() if dists & reqs):
            if not item.in_function:
                problems.append(f"{item.where}: {item.module} comes from the optional extra(s) {in_extras} but is "
                                "imported at module level; import it inside the function that needs it")
        else:
            problems.append(f"{item.where}: {item.module} (distribution {', '.join(sorted(dists))}) is imported "
                            "but not declared in pyproject.toml's dependencies or a runtime extra")
    return problems


def test_every_imported_module_is_declared():
    imports = third_party_imports()
    assert {"numpy", "pydicom", "celery", "prometheus_client"} <= {i.module for i in imports}  # the walk sees them
    problems = undeclared_imports((REPO / "pyproject.toml").read_text(), imports)
    assert not problems, "\n".join(problems)


def test_the_check_finds_an_undeclared_dependency():
    # the defect it exists for: prometheus_client present only because flower pulls it in
    text = (REPO / "pyproject.toml").read_text()
    without = re.sub(r'^\s*"prometheus-client[^"]*",.*\n', "", text, flags=re.MULTILINE)
    assert without != text
    problems = undeclared_imports(without, third_party_imports())
    assert any("prometheus_client" in p and "not declared" in p for p in problems), problems


def test_the_check_finds_an_optional_module_imported_at_module_level(tmp_path):
    package = tmp_path / "pacsworker"
    package.mkdir()
    (package / "eager.py").write_text("import tritonclient.http\n\ndef lazy():\n    import deepbet\n")
    imports = third_party_imports(package, root=tmp_path)
    problems = undeclared_imports((REPO / "pyproject.toml").read_text(), imports)
    assert len(problems) == 1 and "tritonclient" in problems[0] and "module level" in problems[0], problems


def test_packages_installed_outside_pyproject_are_installed_by_the_setup_and_the_image():
    for text in ((REPO / "scripts" / "setup.sh").read_text(), (REPO / "Dockerfile").read_text()):
        assert re.search(r'--no-deps "deepbet==[0-9.]+"', text)
