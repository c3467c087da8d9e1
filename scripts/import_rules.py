#!/usr/bin/env python3
"""The import rules of the house (docs/architecture.md), checked by ``make lint``.

Every ``import`` in the project's packages (also inside functions and ``TYPE_CHECKING``
blocks) is judged against five rules:

1. layers: a room imports only rooms of lower layers, never a sibling of its own layer;
2. the foundation (``userpub`` but its front door) and ``userpub_client`` import the standard
   library only;
3. ``cvmfs_verify`` imports the standard library and cryptography only, and only the CLI
   imports it;
4. only the CLI imports ``devsite`` (tests may too: they are not checked);
5. bottle/cheroot only in ``ingest``; watchdog only in ``publisher``; prometheus_client only in
   ``metrics``, ``ingest`` and the CLI.

``python scripts/import_rules.py [ROOT]`` prints one line per broken rule and exits 1, or
prints nothing and exits 0; ``--graph`` prints the rooms by layer with what each imports.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Rooms, highest layer first; rooms on one line are siblings (they may not import each other).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("userpub.cli",),
    ("userpub.supervisor", "devsite"),
    ("publisher", "janitor", "ingest"),
    ("publisher.repositories", "spool", "metrics"),
    ("publisher.tarball",),
    ("userpub",),
)
# Rooms outside the layers: importable from the rooms named, importing what the rules allow.
CLIENT, VERIFY = "userpub_client", "cvmfs_verify"
PACKAGES = ("userpub", "userpub_client", "spool", "publisher", "ingest", "janitor", "metrics",
            "cvmfs_verify", "devsite")
FOUNDATION = "userpub"
THIRD_PARTY_HOMES = {
    "bottle": ("ingest",),
    "cheroot": ("ingest",),
    "watchdog": ("publisher",),
    "prometheus_client": ("metrics", "ingest", "userpub.cli"),
}
VERIFY_THIRD_PARTY = ("cryptography",)


@dataclass(frozen=True)
class Violation:
    """One import that breaks a rule."""

    path: Path
    line: int
    importer: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}: {self.rule}"


def _inside(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def room_of(module: str) -> str | None:
    """The most specific room a project module belongs to (None: not ours)."""
    if module == "userpub.__main__":  # ``python -m userpub``: the front door too
        return "userpub.cli"
    if _inside(module, CLIENT):
        return CLIENT
    if _inside(module, VERIFY):
        return VERIFY
    rooms = [room for layer in LAYERS for room in layer if _inside(module, room)]
    return max(rooms, key=len) if rooms else None


def layer_of(room: str) -> int | None:
    """The layer index of a room (0 = the top), None for rooms outside the layers."""
    for index, layer in enumerate(LAYERS):
        if room in layer:
            return index
    return None


def module_name(root: Path, path: Path) -> str:
    """The dotted module name of a file below ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if node.module is None or node.level:
                # ``from . import x`` / ``from pkg import sub``: judge the submodules too
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"
            else:
                yield node.lineno, target
                for alias in node.names:
                    yield node.lineno, f"{target}.{alias.name}"


def _is_stdlib(name: str) -> bool:
    return name.split(".", maxsplit=1)[0] in sys.stdlib_module_names or name == "__future__"


def _ours(name: str) -> bool:
    return name.split(".", maxsplit=1)[0] in PACKAGES


def judge(importer: str, imported: str) -> str | None:
    """The rule ``importer`` breaks by importing ``imported``, or None."""
    top = imported.split(".", maxsplit=1)[0]
    src = room_of(importer)
    if src is None:
        return None
    if _is_stdlib(imported):
        return None
    if not _ours(imported):
        if src in (FOUNDATION, CLIENT):
            return f"rule 2: the {src} room imports the standard library only"
        if src == VERIFY and top not in VERIFY_THIRD_PARTY:
            return "rule 3: cvmfs_verify imports the standard library and cryptography only"
        homes = THIRD_PARTY_HOMES.get(top)
        if homes is not None and not any(_inside(importer, home) for home in homes):
            return f"rule 5: {top} belongs in {', '.join(homes)} only"
        return None
    dst = room_of(imported)
    if dst is None or dst == src:
        return None
    if src in (FOUNDATION, CLIENT):
        return f"rule 2: the {src} room imports the standard library only"
    if src == VERIFY:
        return "rule 3: cvmfs_verify imports nothing of the project"
    if dst == VERIFY:
        return None if src == "userpub.cli" else "rule 3: only the CLI imports cvmfs_verify"
    if dst == "devsite" and src not in ("userpub.cli", "devsite"):
        return "rule 4: only the CLI (and the tests) import devsite"
    if dst == CLIENT:
        return None  # the client is a standard-library leaf every server room may use
    src_layer, dst_layer = layer_of(src), layer_of(dst)
    assert src_layer is not None and dst_layer is not None
    if dst_layer < src_layer:
        return f"rule 1: {src} (layer {src_layer}) imports upwards into {dst} (layer {dst_layer})"
    if dst_layer == src_layer:
        return f"rule 1: {src} and {dst} are siblings and must not import each other"
    return None


def _files(root: Path) -> Iterator[Path]:
    for package in PACKAGES:
        directory = root / package
        if directory.is_dir():
            yield from sorted(directory.rglob("*.py"))


def check(root: Path) -> list[Violation]:
    """Every broken rule in the packages below ``root``."""
    found = []
    for path in _files(root):
        module = module_name(root, path)
        tree = ast.parse(path.read_bytes(), str(path))
        seen: set[tuple[int, str]] = set()
        for line, imported in imports(tree, module, path.name == "__init__.py"):
            rule = judge(module, imported)
            if rule is not None and (line, rule) not in seen:
                seen.add((line, rule))
                found.append(Violation(path.relative_to(root), line, module, imported, rule))
    return found


def graph(root: Path) -> str:
    """The rooms by layer, each with the rooms it imports (the picture of the house)."""
    edges: dict[str, set[str]] = {}
    for path in _files(root):
        module = module_name(root, path)
        src = room_of(module)
        if src is None:
            continue
        tree = ast.parse(path.read_bytes(), str(path))
        for _, imported in imports(tree, module, path.name == "__init__.py"):
            dst = room_of(imported) if _ours(imported) else None
            if dst is not None and dst != src:
                edges.setdefault(src, set()).add(dst)
    lines = []
    for index, layer in enumerate(LAYERS):
        lines.append(f"layer {index}:")
        for room in layer:
            lines.append(f"  {room:24} -> {', '.join(sorted(edges.get(room, ()))) or '-'}")
    lines.append("outside the layers:")
    for room in (CLIENT, VERIFY):
        lines.append(f"  {room:24} -> {', '.join(sorted(edges.get(room, ()))) or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Check (or draw) the tree at ROOT (default: this repository)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--graph", action="store_true", help="print the rooms and their imports")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.graph:
        print(graph(root))
    violations = check(root)
    for violation in violations:
        print(violation)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
