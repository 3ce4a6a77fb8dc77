"""The package reaches its dependencies through their public API only.

A private name of redis-py (``redis._parsers``, a connection's ``_writer``, a pool's
``_in_use_connections``) works until redis-py's next release: redis-py 8.2 changed one, and every
concurrent call of the package failed on it. This scan of ``taskiq_redis/`` fails on:

- an import from a private module (``redis._parsers``, ``taskiq._anything``);
- ``obj._name`` on anything but ``self`` or ``cls``: another object's private state, whether
  redis-py's or another module's of ours (a part is used through its public names);
- ``getattr``/``setattr``/``hasattr``/``delattr`` with a private name;
- ``self._name`` inside a subclass of a redis-py class: it reads or overwrites redis-py's own
  state, or could collide with a name redis-py adds later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "taskiq_redis"
DEPENDENCIES = ("redis", "taskiq", "hiredis")
REFLECTION = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def from_dependency(module: str) -> bool:
    return module.split(".")[0] in DEPENDENCIES


class Scan(ast.NodeVisitor):
    """Collects every private reach of one module, as ``line: what``."""

    def __init__(self, tree: ast.Module) -> None:
        self.found: list[str] = []
        self.foreign = foreign_classes(tree)
        self.in_foreign_subclass = False

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if from_dependency(alias.name) and any(map(private, alias.name.split("."))):
                self.found.append(f"{node.lineno}: import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and from_dependency(module):
            if any(map(private, module.split("."))):
                self.found.append(f"{node.lineno}: from {module} import ...")
            for alias in node.names:
                if private(alias.name):
                    self.found.append(f"{node.lineno}: from {module} import {alias.name}")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer = self.in_foreign_subclass
        self.in_foreign_subclass = node.name in self.foreign
        self.generic_visit(node)
        self.in_foreign_subclass = outer

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if private(node.attr):
            owner = node.value
            mine = isinstance(owner, ast.Name) and owner.id in ("self", "cls")
            if not mine:
                self.found.append(f"{node.lineno}: {ast.unparse(node)}")
            elif self.in_foreign_subclass:
                self.found.append(f"{node.lineno}: {ast.unparse(node)} in a redis-py subclass")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if (
            isinstance(node.func, ast.Name)
            and node.func.id in REFLECTION
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and private(node.args[1].value)
        ):
            self.found.append(f"{node.lineno}: {ast.unparse(node)}")
        self.generic_visit(node)


def foreign_classes(tree: ast.Module) -> set[str]:
    """The module's classes that derive, directly or through each other, from redis-py's."""
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "redis"
        for alias in node.names
    }
    foreign: set[str] = set()
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for cls in classes:
            bases = {ast.unparse(base).split(".")[0] for base in cls.bases}
            if cls.name not in foreign and bases & (imported | foreign):
                foreign.add(cls.name)
                changed = True
    return foreign


def scan(source: str) -> list[str]:
    tree = ast.parse(source)
    visitor = Scan(tree)
    visitor.visit(tree)
    return visitor.found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_the_package_uses_no_private_name_of_its_dependencies_or_of_another_object(
    path: Path,
) -> None:
    found = scan(path.read_text())
    assert not found, f"{path.relative_to(PACKAGE.parent)} reaches private names:\n" + "\n".join(
        found
    )


def test_the_scan_catches_each_kind_of_private_reach() -> None:
    """The guard itself: each way back in that it must refuse, it does refuse."""
    caught = scan(
        "import redis._parsers.hiredis\n"
        "from redis._parsers import hiredis\n"
        "from redis.asyncio.connection import _Private\n"
        "from redis.asyncio import Redis\n"
        "pool._in_use_connections\n"
        "getattr(connection, '_writer', None)\n"
        "class Mine(Redis):\n"
        "    def f(self):\n"
        "        return self._lock\n"
        "class Ours:\n"
        "    def f(self):\n"
        "        return self._lock, self.__class__\n"
    )
    assert [line.split(":")[0] for line in caught] == ["1", "2", "3", "5", "6", "9"]
