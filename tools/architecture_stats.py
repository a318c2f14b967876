"""Architecture figures of the package: lines per package, the longest functions, import
cycles (strongly connected modules, counting every import, also those inside functions),
imports inside functions, in-package ones apart.

    python tools/architecture_stats.py [SRC_DIR]      # default: src/ummae of this checkout
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def resolve(name: str, level: int, current: str, is_pkg: bool) -> str:
    if not level:
        return name
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(mod: str, path: Path, known: set[str]):
    """(target module, inside a function?) for every import of ``mod`` that names a module of ours."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for a in child.names:
                    found.append((a.name, in_function, child.lineno))
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.module or "", child.level, mod, is_pkg)
                for a in child.names:
                    full = f"{base}.{a.name}"
                    found.append((full if full in known else base, in_function, child.lineno))
            visit(child, inner)

    visit(tree, False)
    return found


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def main(src: Path) -> None:
    mods = modules(src)
    known = set(mods)
    lines = defaultdict(int)
    functions = []
    graph: dict[str, set[str]] = defaultdict(set)
    inside_all, inside_ours = set(), set()
    inside_ours_where = []
    for mod, path in mods.items():
        text = path.read_text()
        parts = mod.split(".")
        lines[parts[1] if len(parts) > 2 or (len(parts) == 2 and path.name == "__init__.py") else "(top level)"] += len(
            text.splitlines()
        )
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{mod}.{node.name}"))
        for target, in_function, lineno in imports_of(mod, path, known):
            ours = target.split(".")[0] == src.name
            if in_function:  # counted per import statement
                inside_all.add((mod, lineno))
                if ours and (mod, lineno) not in inside_ours:
                    inside_ours.add((mod, lineno))
                    inside_ours_where.append(f"{mod}:{lineno} -> {target}")
            if ours and target in known and target != mod:
                # importing a.b.c runs a and a.b first: count the package inits too
                graph[mod].add(target)
    # a package's __init__ is run by any import of its modules
    print("| package | lines |\n|---|---|")
    for pkg, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"| {pkg} | {n} |")
    print(f"| total | {sum(lines.values())} |\n")
    print("Ten longest functions:")
    for n, name in sorted(functions, reverse=True)[:10]:
        print(f"  {n:4d}  {name}")
    cycles = sccs(graph)
    print(f"\nimport cycles (strongly connected module sets): {len(cycles)}")
    for c in cycles:
        print("  {" + ", ".join(m.removeprefix(src.name + ".") for m in c) + "}")
    print(f"\nimport statements inside functions: {len(inside_all)} ({len(inside_ours)} of modules of this package)")
    if "-v" in sys.argv:
        for w in inside_ours_where:
            print("  " + w)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    main(Path(args[0]) if args else Path(__file__).resolve().parents[1] / "src" / "ummae")
