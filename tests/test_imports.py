"""No import circle among the package's modules, and no model library where no model is loaded.

A circle works only while every module in it is imported in a lucky order (or one of
them imports inside a function to dodge it), and it ties the modules' layers together
(docs/architecture.md, "Package layout"). The same holds between the package's packages (``ranker`` ->
``recsys``, never back), and the request path (``recsys``) imports no Ray. The graph comes from the import statements at any depth, a
function's own imports included, except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import shoprank

PACKAGE = Path(shoprank.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(part for part in parts if part != "__init__")


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports."""
    return {m for m in imported_names(name, path, modules) if m in modules and m != name}


def imported_names(name: str, path: Path, modules: set[str]) -> set[str]:
    """Every module name that ``path`` (module ``name``) imports, the package's and others' (``ray.serve``)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for branch in ast.walk(tree)
                 if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
                 for node in ast.walk(branch)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return found


def package_files() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    files = package_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), less a package's
    ``__init__`` importing its own submodules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)

    def only_packages_and_children(component: list[str]) -> bool:
        return all(any(o.startswith(m + ".") or m.startswith(o + ".") for o in component if o != m) for m in component)

    return [c for c in found if not only_packages_and_children(c)]


def test_the_package_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["shoprank.store.run"] >= {"shoprank.config", "shoprank.store.location"}
    assert circles(graph) == []


def test_a_circle_would_be_found() -> None:
    graph = import_graph()
    graph["shoprank.store.location"] = graph["shoprank.store.location"] | {"shoprank.store.run"}
    assert any({"shoprank.store.location", "shoprank.store.run"} <= set(c) for c in circles(graph))


def package_of(module: str) -> str:
    """``shoprank.ranker.train`` -> ``ranker``; a top-level module is a package of its own (``stages``); the
    root ``shoprank`` (its version) none: ``""``."""
    return module.split(".")[1] if "." in module else ""


ALLOWED_BACK_UP = {
    # config validates a run root as a Location; store.run records the Config it ran
    ("config", "shoprank.store.location"),
    # the event store writes rows of the event record schema that ingest reads
    ("store", "shoprank.data.schema"),
    # the encoder's own evaluation (examples, export checks) scores with the same ranking metrics
    ("encoder", "shoprank.recsys.metrics"),
}
"""(package, module) imports allowed to run back up into a package that imports the first one: each module is a
leaf (it imports nothing of the package but ``shoprank.errors``), so the tie is that file, not its package."""


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``shoprank.<package>`` -> the packages its modules import (at any depth, as :func:`import_graph`), less
    the imports of :data:`ALLOWED_BACK_UP`."""
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        packages.setdefault(package_of(module), set()).update(
            package_of(other) for other in imported if (package_of(module), other) not in ALLOWED_BACK_UP)
    return {package: others - {package, ""} for package, others in packages.items() if package}


def test_no_package_imports_back_up_into_one_that_imports_it() -> None:
    graph = import_graph()
    packages = package_graph(graph)
    assert {"recsys", "ranker", "serving", "evaluation", "stages"} <= set(packages)
    assert "recsys" in packages["ranker"] & packages["serving"] & packages["evaluation"]
    # the incremental update runs its training through the stage runner (ranker -> stages), which names the
    # stage bodies as strings imported when a stage runs: a tie one way, not a circle
    assert "stages" in packages["ranker"] and not packages["stages"] & {"ranker", "evaluation", "serving"}
    assert circles(packages) == []
    assert {module: graph[module] - {"shoprank.errors"} for _, module in ALLOWED_BACK_UP} == {
        module: set() for _, module in ALLOWED_BACK_UP}


def test_a_package_circle_would_be_found() -> None:
    graph = package_graph(import_graph())
    graph["recsys"] = graph["recsys"] | {"ranker"}
    assert any({"recsys", "ranker"} <= set(c) for c in circles(graph))


def reached_from(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    """The modules ``start`` imports, directly or through the package's other modules, ``start`` included."""
    seen, todo = set(start), list(start)
    while todo:
        for other in graph[todo.pop()] - seen:
            seen.add(other)
            todo.append(other)
    return seen


def test_the_request_path_imports_neither_ray_nor_serving_nor_the_stages_above_it() -> None:
    """``recsys`` runs in a test, a notebook or a Serve replica alike: no Ray, and nothing of the packages that
    call it (through any module of the package it imports)."""
    files = package_files()
    graph = import_graph()
    recsys = {name for name in files if name.startswith("shoprank.recsys")}
    reached = reached_from(graph, recsys)
    assert len(recsys) >= 8 and "shoprank.recsys.context" in reached and "shoprank.store.run" in reached
    above = {"serving", "ranker", "evaluation", "stages", "pipeline", "sweep"}
    assert sorted(m for m in reached if package_of(m) in above) == []
    external = {module: {n.split(".")[0] for n in imported_names(module, files[module], set(files))}
                for module in reached}
    assert sorted(m for m, names in external.items() if "ray" in names) == []


LIGHT_MODULES = {
    "shoprank.cli": ("every `shoprank` command (`cluster up` need not load Gradio or the models)", ()),
    "shoprank.ranker.train": ("each XGBoost training worker", ()),
    "shoprank.serving.deployments": ("the ingress and event-store replicas", ()),
    "shoprank.serving.app": ("the process that binds and deploys the Serve app", ()),
    "shoprank.sweep": ("each Tune trial's process", ()),
    "shoprank.stages": ("a job that runs some stages (jobs/preprocess.py runs the data stages)", ("faiss",)),
    # last: it may import FAISS (it retrieves), and an earlier module's FAISS would go unnoticed after it
    "shoprank.ranker.dataset": ("each feature actor (the features stage, the evaluation's zero-shot rows, an update)",
                                ("faiss",)),
}
"""Modules imported by processes that load no encoder: who imports them, and the heavy libraries each may
import. Each process that imports PyTorch and transformers spends about 5 s of CPU on it here: on 2 cores,
seconds of every stage."""
HEAVY = ("torch", "transformers", "peft", "faiss", "gradio")


def test_processes_that_load_no_model_do_not_import_the_model_libraries() -> None:
    probe = (
        "import importlib, json, sys\n"
        f"heavy = {HEAVY!r}\n"
        "found = {}\n"
        f"for module in {list(LIGHT_MODULES)!r}:\n"
        "    importlib.import_module(module)\n"
        "    found[module] = [name for name in heavy if name in sys.modules]\n"
        "print(json.dumps(found))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    extra = {module: set(names) - set(LIGHT_MODULES[module][1]) for module, names in loaded.items()}
    assert {module: names for module, names in extra.items() if names} == {}, (
        "imported by " + "; ".join(f"{module} ({LIGHT_MODULES[module][0]})" for module, names in extra.items() if names))
