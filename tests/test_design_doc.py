"""docs/DESIGN.md describes the code as it is.

- every path, every dotted ``proxmo`` / ``proxmo_client`` name and every ``Class.method`` it
  gives exists, and every relative link in it resolves (inside the repository);
- every module of the service and of the client package (the generated ``v1`` aside) has a
  row in its module tables saying what it is for, and a layer in its layer table;
- no module imports from a layer above its own, the core imports nothing impure, the service
  reaches the client package only in ``proxmo/proto.py`` (for the generated messages), the
  client never reaches the service; only the composition root wires the parts;
- every box of the request-path picture names a module and functions defined in it, every
  arrow joins two boxes, and the doors hand their requests to ``Runtime.compute``.

Everything is read from the source (``ast``), nothing imported: the encoder's torch stays unloaded.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DESIGN = DOCS / "DESIGN.md"
PACKAGES = {
    "proxmo": ROOT / "service" / "proxmo",
    "proxmo_client": ROOT / "clients" / "python" / "src" / "proxmo_client",
}
GENERATED = PACKAGES["proxmo_client"] / "v1"
CORE = PACKAGES["proxmo"] / "core"
PROTO_SEAM = PACKAGES["proxmo"] / "proto.py"  # the service's one import of proxmo_client
DOORS = ("server/grpc_service.py", "server/rest.py")

# What the core may import besides itself: the numerical stack and the standard library,
# except what does I/O or concurrency.
CORE_THIRD_PARTY = {"numpy", "scipy", "sklearn", "threadpoolctl"}
CORE_FORBIDDEN_STDLIB = {"asyncio", "socket", "subprocess", "threading", "multiprocessing",
                         "concurrent", "logging", "urllib", "http", "sqlite3", "shutil"}

_FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.S | re.M)
_MERMAID = re.compile(r"^```mermaid[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_REPO_PATH = re.compile(r"(?:service|clients|docs|protos|tests|deploy|mk)/[\w./-]*")
_DOTTED = re.compile(r"(?:proxmo|proxmo_client)(?:\.\w+)+")
_MODULE = re.compile(r"(?:proxmo|proxmo_client)(?:\.\w+)*")
_METHOD = re.compile(r"[A-Z]\w*\.[a-z_]\w*")
_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
_NODE = re.compile(r'^\s*(\w+)\["(.*)"\]\s*$')
_ARROW = re.compile(r"\s*(?:-->|-\.->|==>)\s*(?:\|[^|]*\|\s*)?")


# --- reading the page and the code ----------------------------------------------------------


def design_text() -> str:
    return DESIGN.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The page without its fenced blocks (API sketches and the picture)."""
    return _FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    return _CODE_SPAN.findall(prose(text))


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def source_modules() -> list[Path]:
    """Every .py module of the service and of the client package, the generated ones aside."""
    return sorted(
        path for root in PACKAGES.values() for path in root.rglob("*.py")
        if GENERATED not in path.parents and "__pycache__" not in path.parts
    )


def module_path(dotted: str) -> Path | None:
    """The file (or namespace folder) of a dotted module name, None when there is none."""
    package, *parts = dotted.split(".")
    if package not in PACKAGES:
        return None
    base = PACKAGES[package].joinpath(*parts)
    if parts and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base if base.is_dir() else None


def split_dotted(dotted: str) -> tuple[Path, list[str]]:
    """The longest module prefix of ``dotted`` and the names after it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        path = module_path(".".join(parts[:cut]))
        if path is not None:
            return path, parts[cut:]
    raise AssertionError(f"{dotted}: no such module")


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _binds(node: ast.AST, name: str) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign | ast.AnnAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Name) and t.id == name
                   or isinstance(t, ast.Attribute) and t.attr == name
                   for target in targets for t in ast.walk(target))
    if isinstance(node, ast.ImportFrom | ast.Import):
        return any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names)
    return False


def defines(path: Path, qualname: str) -> bool:
    """Whether the module at ``path`` defines ``qualname`` (``f``, ``Cls.method``, ``f.inner``)."""
    if path.is_dir():
        return False
    return _defined_in(parsed(path), qualname.split("."))


def _defined_in(scope: ast.AST, names: list[str]) -> bool:
    first, rest = names[0], names[1:]
    return any(_binds(node, first) and (not rest or _defined_in(node, rest))
               for node in ast.walk(scope) if node is not scope)


def imports_of(path: Path) -> Iterator[tuple[str, int]]:
    """(dotted module, line) of every import in the file, lazy ones included; relative imports
    resolved; ``from pkg import sub`` yields ``pkg.sub`` when ``sub`` is a module."""
    tree = parsed(path)
    package_of = next(p for p, root in PACKAGES.items() if root in path.parents)
    parts = [package_of, *path.relative_to(PACKAGES[package_of]).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    here = parts if path.name == "__init__.py" else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield module, node.lineno
            for alias in node.names:
                if module_path(f"{module}.{alias.name}") is not None:
                    yield f"{module}.{alias.name}", node.lineno


# --- the layer table ------------------------------------------------------------------------


def layer_table(text: str) -> dict[str, int]:
    """Path (file, or folder ending in /) -> layer, from the rows of the "## Layers" table."""
    section = prose(text).split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        for span in _CODE_SPAN.findall(cells[-1]) + _CODE_SPAN.findall(cells[1]):
            if _REPO_PATH.fullmatch(span):
                assert span not in layers, f"{span} has two layers"
                layers[span] = int(cells[0])
    assert layers, "no layer table under '## Layers'"
    return layers


def layer_of(path: Path, layers: dict[str, int]) -> int | None:
    name = rel(path) + ("/" if path.is_dir() else "")
    matches = [entry for entry in layers
               if entry == name or entry.endswith("/") and name.startswith(entry)]
    return layers[max(matches, key=len)] if matches else None


# --- the picture ----------------------------------------------------------------------------


def picture(text: str) -> tuple[dict[str, list[tuple[str, list[str]]]], list[tuple[str, str]]]:
    """Boxes (id -> [(module, names)]) and arrows (from, to) of the one mermaid picture.

    A box's label is lines joined by <br/>: free text first, then one or more groups of a
    dotted module line followed by lines of comma-separated names defined in it."""
    blocks = _MERMAID.findall(text)
    assert len(blocks) == 1, f"{len(blocks)} mermaid pictures; the page has exactly one"
    boxes: dict[str, list[tuple[str, list[str]]]] = {}
    arrows: list[tuple[str, str]] = []
    for line in blocks[0].splitlines():
        node = _NODE.match(line)
        if node:
            groups: list[tuple[str, list[str]]] = []
            for part in node.group(2).split("<br/>"):
                part = part.strip()
                if _MODULE.fullmatch(part):
                    groups.append((part, []))
                elif groups:
                    groups[-1][1].extend(n.strip() for n in part.split(",") if n.strip())
            boxes[node.group(1)] = groups
        elif _ARROW.search(line):
            ends = [e.strip() for e in _ARROW.split(line.strip())]
            arrows.extend(zip(ends, ends[1:], strict=False))
    return boxes, arrows


# --- the tests ------------------------------------------------------------------------------


def test_every_path_named_exists() -> None:
    missing = sorted({span for span in code_spans(design_text())
                      if _REPO_PATH.fullmatch(span) and not (ROOT / span).exists()})
    assert not missing, f"docs/DESIGN.md names paths that do not exist: {missing}"


def test_every_dotted_name_exists() -> None:
    wrong = []
    for span in code_spans(design_text()):
        if not _DOTTED.fullmatch(span):
            continue
        path, names = split_dotted(span)
        if names and not defines(path, ".".join(names)):
            wrong.append(span)
    assert not wrong, f"docs/DESIGN.md names what the code does not define: {wrong}"


def test_every_method_named_exists() -> None:
    """``Class.method`` in the prose: some module of the code defines it."""
    classes = [node for path in source_modules() for node in ast.walk(parsed(path))
               if isinstance(node, ast.ClassDef)]
    wrong = sorted({span for span in code_spans(design_text()) if _METHOD.fullmatch(span)
                    and not any(cls.name == span.split(".")[0]
                                and _defined_in(cls, span.split(".")[1:]) for cls in classes)})
    assert not wrong, f"docs/DESIGN.md names methods the code does not define: {wrong}"


def test_links_resolve_and_stay_in_the_repository() -> None:
    text = design_text()
    assert "../shared" not in text and "shared/spec" not in text, (
        "docs/DESIGN.md points outside the repository; the numbers live in docs/algorithm.md")
    links = [link for link in _LINK.findall(text) if "://" not in link]
    broken = sorted({link for link in links if not (DOCS / link).exists()})
    assert not broken, f"docs/DESIGN.md links to files that do not exist: {broken}"
    assert "algorithm.md" in links, "docs/DESIGN.md must point the numbers at docs/algorithm.md"


def module_rows(text: str) -> dict[str, str]:
    """Path -> what it is for, from the rows of the module tables (| `path` | one line |)."""
    rows: dict[str, str] = {}
    for line in prose(text).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and _CODE_SPAN.fullmatch(cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_every_module_has_a_row_saying_what_it_is_for() -> None:
    rows = module_rows(design_text())
    unnamed = [rel(path) for path in source_modules() if not rows.get(rel(path))]
    assert not unnamed, f"modules missing from docs/DESIGN.md's module tables: {unnamed}"
    generated = [path for path in rows if path.startswith(rel(GENERATED) + "/")]
    assert not generated, f"generated modules listed as if written by hand: {generated}"


def test_every_module_has_a_layer() -> None:
    layers = layer_table(design_text())
    missing = [rel(path) for path in source_modules() if layer_of(path, layers) is None]
    assert not missing, f"modules without a layer in docs/DESIGN.md: {missing}"


def test_no_upward_imports() -> None:
    layers = layer_table(design_text())
    upward = []
    for path in source_modules():
        own = layer_of(path, layers)
        for module, line in imports_of(path):
            target = module_path(module)
            if target is None or target == path:
                continue
            theirs = layer_of(target, layers)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{rel(path)}:{line} imports {module} "
                              f"(layer {own} -> {theirs})")
    assert not upward, "imports against docs/DESIGN.md's layers:\n" + "\n".join(upward)


def test_the_core_is_pure() -> None:
    impure = []
    for path in sorted(CORE.rglob("*.py")):
        for module, line in imports_of(path):
            top = module.split(".")[0]
            inside = module == "proxmo.core" or module.startswith("proxmo.core.")
            if top in PACKAGES and not inside or top in CORE_FORBIDDEN_STDLIB or (
                    top not in PACKAGES and top not in CORE_THIRD_PARTY
                    and top not in _stdlib()):
                impure.append(f"{rel(path)}:{line} imports {module}")
    assert not impure, "the core imports more than numpy/scipy/sklearn:\n" + "\n".join(impure)


def _stdlib() -> frozenset[str]:
    return frozenset(sys.stdlib_module_names) | {"__future__"}


def test_the_two_packages_meet_at_one_seam() -> None:
    """The service imports the client package in ``proxmo/proto.py`` only, and there only its
    generated messages; the client package never imports the service."""
    crossing = []
    for path in source_modules():
        service = PACKAGES["proxmo"] in path.parents
        for module, line in imports_of(path):
            top = module.split(".")[0]
            generated = module == "proxmo_client.v1" or module.startswith("proxmo_client.v1.")
            if service and top == "proxmo_client" and (path != PROTO_SEAM or not generated):
                crossing.append(f"{rel(path)}:{line} imports {module}")
            if not service and top == "proxmo":
                crossing.append(f"{rel(path)}:{line} imports {module}")
    assert not crossing, "\n".join(crossing)


def test_every_box_of_the_picture_names_code_that_exists() -> None:
    boxes, arrows = picture(design_text())
    assert boxes, "the picture has no boxes"
    wrong = []
    for box, groups in boxes.items():
        if not groups or any(not names for _, names in groups):
            wrong.append(f"{box}: names no module and function")
        for module, names in groups:
            path = module_path(module)
            if path is None or path.is_dir():
                wrong.append(f"{box}: no module {module}")
                continue
            wrong.extend(f"{box}: {module} defines no {name}" for name in names
                         if not defines(path, name))
    wrong.extend(f"arrow {a} --> {b}: no box {end}" for a, b in arrows for end in (a, b)
                 if end not in boxes)
    assert not wrong, "docs/DESIGN.md's picture:\n" + "\n".join(wrong)


def _boxes_naming(boxes: dict[str, list[tuple[str, list[str]]]], module: str,
                  name: str | None = None) -> set[str]:
    return {box for box, groups in boxes.items() for m, names in groups
            if m == module and (name is None or name in names)}


def test_the_picture_follows_the_request_path() -> None:
    boxes, arrows = picture(design_text())
    runtime = _boxes_naming(boxes, "proxmo.server.runtime", "Runtime.compute")
    engine = _boxes_naming(boxes, "proxmo.engine", "Engine.compute")
    doors = _boxes_naming(boxes, "proxmo.server.grpc_service") | _boxes_naming(
        boxes, "proxmo.server.rest")
    assert runtime and engine and doors, (
        "the picture shows the doors, Runtime.compute and Engine.compute")
    into_runtime = {a for a, b in arrows if b in runtime}
    assert into_runtime and into_runtime <= doors, "only the doors lead to Runtime.compute"
    assert not {(a, b) for a, b in arrows if a in doors and b in engine}, (
        "a door leads to Engine.compute past the runtime")
    for module, name in [("proxmo.server.admission", None), ("proxmo.store.base", None),
                         ("proxmo.encoder.embedder", None), ("proxmo.core.tfidf", None),
                         ("proxmo.core.estimators", None), ("proxmo.convert", "build_response")]:
        assert _boxes_naming(boxes, module, name), f"the picture leaves out {module} {name or ''}"


def test_one_composition_root() -> None:
    """The store, the encoder, the engine, the runtime and the servers are built in
    ``server/app.py`` only (and the CLI's own in-process engine in ``cli.py``)."""
    roots = {PACKAGES["proxmo"] / "server" / "app.py", PACKAGES["proxmo"] / "cli.py"}
    builders = {"create_store", "create_embedder", "Engine", "Runtime", "build_grpc_server",
                "create_app"}
    elsewhere = [f"{rel(path)}:{node.lineno} calls {name}"
                 for path in source_modules() if PACKAGES["proxmo"] in path.parents
                 and path not in roots
                 for node in ast.walk(parsed(path)) if isinstance(node, ast.Call)
                 for name in [_called(node)] if name in builders]
    assert not elsewhere, "wiring outside the composition root:\n" + "\n".join(elsewhere)


def _called(call: ast.Call) -> str:
    func = call.func
    return func.id if isinstance(func, ast.Name) else (
        func.attr if isinstance(func, ast.Attribute) else "")


@pytest.mark.parametrize("door", DOORS)
def test_the_doors_call_the_runtime_not_the_engine(door: str) -> None:
    source = (PACKAGES["proxmo"] / door).read_text(encoding="utf-8")
    assert re.search(r"\b(?:_rt|rt|runtime)\.compute\(", source), f"{door} calls Runtime.compute"
    assert not re.search(r"engine\.compute\(", source), f"{door} calls Engine.compute"
