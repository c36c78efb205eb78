"""The docs match the tree: ARCHITECTURE.md lists every module of the package with its job, and every link and
reference in the docs, the README and the package's docstrings names something that exists.

Checked, in ``README.md``, the other top-level ``*.md`` files, ``docs/``, ``data/FORMAT.md``, ``launchers/README.md``
and every docstring of ``uniemo/``:

- Markdown links ``[text](path)`` to files of the repository;
- paths of the repository in backticks (``uniemo/...``, ``tests/...``, ``configs/...``, ...), globs and
  placeholders (``<name>``, ``*``) left out; ``docs/STYLE.md`` names files of other codebases and is left out of this
  one check;
- dotted names ``uniemo.a.b`` (in prose, ``:mod:``, ``:func:``, ``:class:``): a module of the package, and a name
  defined in it (read statically, nothing is imported);
- names of Markdown files (``METHOD.md``): a file of the repository.

All the problems are listed at once.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "uniemo"
DOCS = sorted([*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), ROOT / "data" / "FORMAT.md",
               ROOT / "launchers" / "README.md"])
REPO_DIRS = ("uniemo", "tests", "configs", "docs", "launchers", "slurm", "benchmarks", "generators")
TREE_HEADING = "## The package, module by module"


# -- ARCHITECTURE.md's tree ------------------------------------------------------------------------------------------


def package_modules() -> set[str]:
    """Every module file of the package, as a path relative to the repository (``uniemo/config/loader.py``)."""
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}


def architecture_tree() -> tuple[dict[str, str], list[str]]:
    """ARCHITECTURE.md's module tree: ``{module path: its job}`` for ``uniemo/``, and the other top-level entries."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = text.split(TREE_HEADING, 1)[1].split("```", 2)[1]
    modules: dict[str, str] = {}
    others: list[str] = []
    stack: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name, _, job = line.strip().partition("  ")
        stack[depth:] = [name]
        if stack[0] != "uniemo/":
            others.append(name)
            continue
        if name.endswith("/"):
            continue
        modules["".join(stack)] = job.strip()
    return modules, others


def test_architecture_lists_every_module_with_its_job():
    listed, _ = architecture_tree()
    modules = package_modules()
    assert not sorted(modules - set(listed)), f"modules missing from ARCHITECTURE.md: {sorted(modules - set(listed))}"
    assert not sorted(set(listed) - modules), f"ARCHITECTURE.md lists modules that do not exist: {sorted(set(listed) - modules)}"
    assert all(job for job in listed.values()), [m for m, job in listed.items() if not job]


def test_architecture_top_level_folders_exist():
    _, others = architecture_tree()
    assert others and all((ROOT / name).is_dir() for name in others), [n for n in others if not (ROOT / n).is_dir()]


def readme_tree() -> list[str]:
    """The paths README.md's "File tree" names, one per line (nested entries joined to their folder)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## File tree", 1)[1].split("```", 2)[1]
    paths, stack = [], []
    for line in block.splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        stack[depth:] = [line.strip().split("  ", 1)[0]]
        paths.append("".join(stack))
    return paths


def test_readme_file_tree_matches_the_repository():
    paths = readme_tree()
    assert paths and not [p for p in paths if not (ROOT / p).exists()], [p for p in paths if not (ROOT / p).exists()]


# -- links and references ----------------------------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_BACKTICKED = re.compile(r"`+([^`\n]+?)`+")
_DOTTED = re.compile(r"\buniemo(?:\.[A-Za-z_]\w*)+")
_MARKDOWN_NAME = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]*\.md)\b")


def _docstrings() -> list[tuple[str, str]]:
    """(where, text) of every docstring of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    found.append((f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}", doc))
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", node.value.value))  # attribute docstrings
    return found


@cache
def _defined_names(module_file: Path) -> dict[str, set[str]]:
    """Top-level names of a module file (functions, classes, assignments, imports), each with its class members."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    names: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            members = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
            names[node.name] = members
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        names[n.id] = set()
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = set()
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = set()
    return names


def _module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def dotted_problem(name: str) -> str | None:
    """Why ``uniemo.a.b.c`` names nothing (None: it names a module, or a name defined in one)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(".".join(parts[:cut]))
        if module is None:
            continue
        rest = parts[cut:]
        if not rest:
            return None
        names = _defined_names(module)
        if rest[0] not in names:
            return f"{'.'.join(parts[:cut])} defines no {rest[0]}"
        if len(rest) > 1 and names[rest[0]] and rest[1] not in names[rest[0]]:
            return f"{'.'.join(parts[:cut + 1])} has no {rest[1]}"
        return None
    return "no such module"


def _repo_path_problem(token: str) -> str | None:
    """Why a backticked token that looks like a path of the repository names nothing; a ``file.py::test`` or
    ``file.py:Name.member`` suffix must name a function, class or member defined in that file."""
    token = token.strip().rstrip(".,;")
    path, _, name = token.replace("::", ":").partition(":")
    head = path.split("/", 1)[0]
    if "/" not in path or head not in REPO_DIRS and not (head == "data" and path.endswith(".md")):
        return None
    if any(c in token for c in "<>*{}[] $|()=") or path.startswith("/"):
        return None
    if not (ROOT / path).exists():
        return "no such file or folder"
    if name and path.endswith(".py"):
        first, _, member = name.partition(".")
        names = _defined_names(ROOT / path)
        if first not in names or (member and member not in names[first]):
            return f"{path} defines no {name}"
    return None


def reference_problems(where: str, text: str, source_dir: Path, others: bool = False) -> list[str]:
    """The dangling links and references of ``text``; ``others``: the text names other codebases' files (STYLE.md),
    so only its links and dotted names are checked."""
    problems = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (source_dir / target.split("#", 1)[0]).resolve()
        if not path.exists():
            problems.append(f"{where}: link to {target}: no such file")
    if not others:
        for token in _BACKTICKED.findall(text):
            why = _repo_path_problem(token)
            if why:
                problems.append(f"{where}: `{token}`: {why}")
    for name in set(_DOTTED.findall(text)) - {"uniemo.log"}:  # the run's log file, not a module
        why = dotted_problem(name)
        if why:
            problems.append(f"{where}: {name}: {why}")
    for name in set() if others else set(_MARKDOWN_NAME.findall(text)):
        if not any(p.name == name for p in DOCS):
            problems.append(f"{where}: {name}: no such document")
    return problems


def test_docs_links_and_references_resolve():
    problems = []
    for doc in DOCS:
        problems += reference_problems(str(doc.relative_to(ROOT)), doc.read_text(encoding="utf-8"), doc.parent,
                                       others=doc.name == "STYLE.md")
    assert not problems, "\n".join(problems)


def test_docstring_references_resolve():
    problems = []
    for where, text in _docstrings():
        problems += reference_problems(where, text, ROOT)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_dangling_references():
    assert dotted_problem("uniemo.run_layout.run_dir_of") is None
    assert dotted_problem("uniemo.evaluation.run_files") == "uniemo.evaluation defines no run_files"
    assert dotted_problem("uniemo.training.trainer.run_worker") == "uniemo.training.trainer defines no run_worker"
    assert reference_problems("x", "see MODELS.md and `tests/assets`", ROOT) == [
        "x: `tests/assets`: no such file or folder", "x: MODELS.md: no such document"]
    assert reference_problems("x", "[a](docs/NOPE.md) `configs/<name>.yaml`", ROOT) == [
        "x: link to docs/NOPE.md: no such file"]
    assert reference_problems("x", "`uniemo/losses.py:joint_loss` `tests/test_docs.py::test_nope`", ROOT) == [
        "x: `tests/test_docs.py::test_nope`: tests/test_docs.py defines no test_nope"]


def test_user_docs_name_no_issue_numbers():
    """User docs speak of what exists, not of the project's issue tracker (README, the other top-level docs)."""
    found = [f"{doc.name}: {m.group(0)}" for doc in DOCS for m in re.finditer(r"\bissues? \d+", doc.read_text())]
    assert not found, found
