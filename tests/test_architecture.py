"""The package's imports run one way along the pipeline, without cycles.

probe -> recording -> detectors -> spaces -> metrics -> importance/regularizer -> format
-> writer -> reading -> cli / plugin.  A module may import its own stage or an earlier
one; package ``__init__`` files only re-export, so they are not checked as importers.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, List, Set, Tuple

import tb_conceptevo

PACKAGE_DIR = os.path.dirname(tb_conceptevo.__file__)

#: Pipeline stage of each module (longest matching prefix wins).
STAGES = {
    "tb_conceptevo._names": 0, "tb_conceptevo._arrays": 0, "tb_conceptevo._torch": 0,
    "tb_conceptevo._compiled": 0,
    "tb_conceptevo.probes": 1, "tb_conceptevo.observation": 1,
    "tb_conceptevo.recording": 2, "tb_conceptevo.image_links": 2,
    "tb_conceptevo.detectors": 3,
    "tb_conceptevo.spaces": 4,
    "tb_conceptevo.metrics": 5,
    "tb_conceptevo.importance": 6, "tb_conceptevo.regularizer": 6,
    "tb_conceptevo.format": 7,
    "tb_conceptevo.writer": 8, "tb_conceptevo.event_files": 8,
    "tb_conceptevo.reading": 9,
    "tb_conceptevo.cli": 10,
    "tb_conceptevo.plugin": 11,
}


def _modules() -> Iterator[Tuple[str, str, bool]]:
    for root, _dirs, files in os.walk(PACKAGE_DIR):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[:-3].replace(os.sep, ".")
                is_package = relative.endswith(".__init__")
                yield (relative[: -len(".__init__")] if is_package else relative), path, is_package


def _all_module_names() -> Set[str]:
    return {name for name, _, _ in _modules()}


def _imports(module: str, path: str, is_package: bool, known: Set[str]) -> List[str]:
    """Modules of the package that ``module`` imports (anywhere in its body)."""
    found = []
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # "from .format import metadata" imports a module
                if f"{target}.{alias.name}" in known:
                    found.append(f"{target}.{alias.name}")
                elif target == "tb_conceptevo" and alias.name in tb_conceptevo._EXPORTS:
                    found.append(tb_conceptevo._EXPORTS[alias.name])  # a lazy top-level name
                elif target in known:
                    found.append(target)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name in known]
    return [f for f in found if f.startswith("tb_conceptevo.")]


def _stage(module: str):
    matches = [prefix for prefix in STAGES if module == prefix or module.startswith(prefix + ".")]
    return STAGES[max(matches, key=len)] if matches else None


def _graph(include_packages: bool = False) -> Dict[str, Set[str]]:
    known = _all_module_names()
    return {name: set(_imports(name, path, is_package, known)) - {name}
            for name, path, is_package in _modules() if include_packages or not is_package}


def test_every_module_has_a_stage():
    unplaced = sorted(m for m in _all_module_names() if m != "tb_conceptevo" and _stage(m) is None)
    assert not unplaced, f"give these modules a pipeline stage in STAGES: {unplaced}"


def test_no_module_imports_a_later_stage():
    backwards = sorted(
        f"{module} (stage {_stage(module)}) imports {target} (stage {_stage(target)})"
        for module, targets in _graph().items() for target in targets
        if _stage(target) is not None and _stage(module) is not None and _stage(target) > _stage(module)
    )
    assert not backwards, "imports that run back up the pipeline:\n" + "\n".join(backwards)


def test_no_import_cycles():
    # Package __init__ files count here: a module importing its own package's
    # __init__, which imports the module back, is a cycle.  The top-level package is
    # lazy (PEP 562) and imports nothing at import time.
    graph = _graph(include_packages=True)
    graph.pop("tb_conceptevo", None)
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else path + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
