"""Structural rules of the source tree (issue #17), checked on the files themselves: no function over 60
lines, no import cycle.

A ratchet: what was already over a limit when the rule came in is listed with its size today; a listed
item may shrink (and must then leave the list) but never grow, and nothing new may join it.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "saescope"
MAX_FUNCTION_LINES = 60

# Modules the type checker may skip (pyproject.toml, `ignore_errors`): none since session 9 — keep it so.
UNCHECKED_TODAY: set[str] = set()

# Import cycles in session 9 (imports inside functions count too), in files other helpers were editing then.
IMPORT_CYCLES_TODAY: list[set[str]] = []

# Functions over the limit in session 9, in files other helpers were editing then: name -> lines then.
LONG_FUNCTIONS_TODAY = {
}


def function_lengths(root: Path = SRC) -> dict[str, int]:
    """Lines (def to last line, decorators excluded) of every function and method under `root`, nested
    ones included, keyed "path/inside/root.py:name"."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{path.relative_to(root).as_posix()}:{node.name}"
                out[key] = max(out.get(key, 0), node.end_lineno - node.lineno + 1)
    return out


def test_function_lengths_are_measured_from_the_source(tmp_path):
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"        x{i} = {i}" for i in range(70))
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\nclass A:\n    def long(self):\n{body}\n")
    assert function_lengths(tmp_path) == {"pkg/m.py:short": 2, "pkg/m.py:long": 71}


def test_no_function_is_over_60_lines():
    lengths = function_lengths()
    assert len(lengths) > 300  # the whole package was read
    too_long = {k: n for k, n in lengths.items() if n > LONG_FUNCTIONS_TODAY.get(k, MAX_FUNCTION_LINES)}
    assert not too_long, (f"functions over {MAX_FUNCTION_LINES} lines (or longer than their allowance in "
                          f"LONG_FUNCTIONS_TODAY): {too_long}; split them into named pieces")
    done = {k: lengths.get(k) for k in LONG_FUNCTIONS_TODAY if lengths.get(k, 0) <= MAX_FUNCTION_LINES}
    assert not done, f"now within {MAX_FUNCTION_LINES} lines (or gone): remove from LONG_FUNCTIONS_TODAY: {done}"


def saescope_imports(root: Path = SRC) -> dict[str, set[str]]:
    """Module (dotted, inside the package: "formats.saelens") -> the package's modules it imports, at the top
    or inside a function; `from . import x` names module x, `from .m import f` module m."""
    modules = {_dotted(p, root) for p in root.rglob("*.py")}
    out = {}
    for path in sorted(root.rglob("*.py")):
        name = _dotted(path, root)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}".lstrip(".")
                    deps.add(full if full in modules else base)
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                deps |= {n.removeprefix("saescope").lstrip(".") for n in names if n.split(".")[0] == "saescope"}
        out[name] = {d for d in deps if d in modules and d != name}
    return out


def _dotted(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (each holds at least one cycle)."""
    reach = {m: _reachable(graph, m) for m in graph}
    groups = {frozenset(n for n in graph if n in reach[m] and m in reach[n]) | {m} for m in graph}
    return sorted((set(g) for g in groups if len(g) > 1), key=sorted)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_import_graph_is_read_from_the_source(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    from .sub.c import g\n")
    (pkg / "b.py").write_text("import os\nfrom saescope.a import f\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import f\nfrom .. import b\n")
    graph = saescope_imports(pkg)
    assert graph == {"": {"a"}, "a": {"b", "sub.c"}, "b": {"a"}, "sub": set(), "sub.c": {"a", "b"}}
    assert import_cycles(graph) == [{"a", "b", "sub.c"}]


def test_no_import_cycles():
    graph = saescope_imports()
    assert {"runs", "formats.saelens", "server.app"} <= set(graph) and "sae" in graph["formats.common"]
    cycles = import_cycles(graph)
    new = [c for c in cycles if not any(c <= old for old in IMPORT_CYCLES_TODAY)]
    assert not new, f"import cycles (imports inside functions count): {new}"
    gone = [old for old in IMPORT_CYCLES_TODAY if not any(old <= c for c in cycles)]
    assert not gone, f"no longer a cycle: remove from IMPORT_CYCLES_TODAY: {gone}"


def test_type_checker_skips_no_new_module():
    """mypy (run by `make test`) checks src/; modules may leave the skipped list, never join it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["files"] == ["src/saescope"]
    skipped = {m.removeprefix("saescope").lstrip(".") for o in config.get("overrides", []) if o.get("ignore_errors")
               for m in ([o["module"]] if isinstance(o["module"], str) else o["module"])}
    assert skipped <= UNCHECKED_TODAY, f"modules newly skipped by the type checker: {skipped - UNCHECKED_TODAY}"
    assert all(not m.endswith("*") for m in skipped)  # one module per entry, never a whole package


# The pipeline's stages, lowest first (DESIGN.md §2, README "The pipeline"): a module may import its own stage or
# lower ones, never a higher one. Every module must be placed here.
STAGES = [
    {"errors", "fsio", "version", "tokens", "workers", "devices", "distributed", "kernels", "embed",
     "formats.hooks", "formats.safe"},                                     # foundations
    {"models", "corpus", "store", "featuredb"},                            # model, text, caches, the atlas store
    {"sae", "formats", "formats.common", "formats.gemmascope", "formats.saelens", "formats.sparsify",
     "formats.neuronpedia"},                                               # the SAE and its file formats
    {"runs"},                                                              # a run folder
    {"harvest"},
    {"train"},
    {"endtoend"},                                                          # the end-to-end phase of training
    {"evaluate"},
    {"analyze"},
    {"label", "label.evidence", "label.rules", "label.vectors", "label.concepts", "label.detection",
     "label.scoring", "label.offline", "label.llm", "label.manual", "conceptindex"},
    {"search"},
    {"splice", "conceptsteer", "steer"},
    {"", "__main__", "scope", "interop", "pipeline", "cli", "server", "server.app"},  # the entry points
]


def test_imports_run_down_the_pipeline():
    graph = saescope_imports()
    rank = {m: i for i, stage in enumerate(STAGES) for m in stage}
    assert set(graph) <= set(rank), f"place these modules in STAGES: {sorted(set(graph) - set(rank))}"
    upward = sorted(f"{m} → {d}" for m, deps in graph.items() for d in deps if rank[d] > rank[m])
    assert not upward, f"imports from a lower stage to a higher one: {upward}"
