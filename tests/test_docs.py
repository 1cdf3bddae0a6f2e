"""The public API's docstrings and the README's API tables match the code.

Every callable a user reaches (``svt.SCVAE`` and its public methods and properties,
``svt.tl``, ``svt.pl``, ``svt.datasets``, ``scvae_tools.diagnostics``, the classes they
return and the functions the README's tables name) has a summary line, and its numpy-style "Parameters" section lists exactly the
signature's parameters, in order. The README's tables name only what exists, with
parameters the code takes, and mention every ``svt.tl`` / ``svt.pl`` function.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

import scvae_tools as svt
from scvae_tools import diagnostics

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------ docstring parsing
def _section(doc: str, title: str) -> list[str] | None:
    """The lines of a numpy-style section (``title`` over a dashed line), or ``None``."""
    lines = doc.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].strip() == title and set(lines[i + 1].strip()) == {"-"}:
            body = []
            for j in range(i + 2, len(lines)):
                # The next section header ends this one.
                if j + 1 < len(lines) and lines[j].strip() and set(lines[j + 1].strip()) == {"-"}:
                    break
                body.append(lines[j])
            return body
    return None


def documented_parameters(doc: str, title: str = "Parameters") -> list[str] | None:
    """Names in ``doc``'s ``title`` section (``a, b : int`` gives two; stars dropped)."""
    body = _section(doc, title)
    if body is None:
        return None
    indent = min((len(ln) - len(ln.lstrip()) for ln in body if ln.strip()), default=0)
    names = []
    for ln in body:
        if not ln.strip() or len(ln) - len(ln.lstrip()) != indent:
            continue  # a description line, indented under its parameter
        head = ln.strip().split(" : ", 1)[0]
        names += [n.strip().lstrip("*") for n in head.split(",")]
    return names


def _signature_names(fn) -> list[str]:
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name not in ("self", "cls")]


# ------------------------------------------------------------------ README tables
def _table_calls() -> list[tuple[str, str | None]]:
    """``(dotted name, argument text or None)`` for each call in the README's tables."""
    calls = []
    for row in (ln for ln in README.splitlines() if ln.startswith("|")):
        for code in re.findall(r"`([^`]+)`", re.split(r"(?<!\\)\|", row)[1]):
            for m in re.finditer(r"\b((?:svt|model)(?:\.\w+)+)(\()?", code):
                args = None
                if m.group(2):  # the text up to the matching parenthesis
                    depth, start = 1, m.end()
                    for k in range(start, len(code)):
                        depth += {"(": 1, ")": -1}.get(code[k], 0)
                        if depth == 0:
                            args = code[start:k]
                            break
                calls.append((m.group(1), args))
    return calls


def _resolve(dotted: str):
    head, *rest = dotted.split(".")
    obj = svt.SCVAE if head == "model" else svt
    for i, part in enumerate(rest):
        if not hasattr(obj, part) and hasattr(obj, "__path__"):  # a package's submodule
            try:
                importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                pass
        if not hasattr(obj, part):
            raise AttributeError(f"{'.'.join([head, *rest[:i + 1]])}")
        obj = getattr(obj, part)
    return obj


def _top_level(args: str) -> str:
    """``args`` without what nested calls or tuples hold: ``f(a, b=1), c=2`` → ``f, c=2``."""
    out, depth = [], 0
    for ch in args:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and ch != ")":
            out.append(ch)
    return "".join(out)


README_CALLS = _table_calls()


# ------------------------------------------------------------------ the public surface
def _module_functions(module) -> dict[str, object]:
    """Public callables of a namespace: ``__all__`` if it has one, else the public names it
    defines or re-exports from scvae_tools (not what it imports from ``model`` for its own
    use: ``SCVAE`` is checked as a class, the rest are model's helpers)."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, obj in vars(module).items()
                 if not n.startswith("_") and callable(obj)
                 and getattr(obj, "__module__", "").startswith("scvae_tools")
                 and obj.__module__ != "scvae_tools.model"]
    return {f"{module.__name__}.{n}": getattr(module, n) for n in names}


def _class_members(cls) -> dict[str, object]:
    """The class itself (its constructor) and its public methods, classmethods, properties."""
    out = {f"{cls.__module__}.{cls.__qualname__}": cls}
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            out[f"{cls.__qualname__}.{name}"] = attr
        elif isinstance(attr, (classmethod, staticmethod)) or inspect.isfunction(attr):
            out[f"{cls.__qualname__}.{name}"] = getattr(cls, name)
    return out


def public_api() -> dict[str, object]:
    api: dict[str, object] = {}
    namespaces = [svt.tl, svt.pl, svt.datasets, diagnostics]
    if hasattr(svt, "pp"):
        namespaces.append(svt.pp)
    for module in namespaces:
        api.update(_module_functions(module))
    for name in svt.__all__:
        obj = getattr(svt, name)
        if callable(obj):
            api[f"scvae_tools.{name}"] = obj
    for obj in list(api.values()):
        if inspect.isclass(obj):
            api.update(_class_members(obj))
    # Functions the README's tables name elsewhere (e.g. svt.backed.read_backed).
    seen = {id(obj) for obj in api.values()}
    for dotted, _ in README_CALLS:
        try:
            obj = _resolve(dotted)
        except AttributeError:  # reported by test_readme_table_names_exist_with_their_arguments
            continue
        if inspect.isfunction(obj) and id(obj) not in seen:
            api[dotted.replace("svt.", "scvae_tools.", 1)] = obj
            seen.add(id(obj))
    return api


API = public_api()


def test_public_api_is_found():
    # The collection itself must reach the surface, or the checks below pass vacuously.
    assert {"SCVAE.train", "SCVAE.load", "SCVAE.n_latent", "scvae_tools.tl.scvae",
            "scvae_tools.pl.ppc", "scvae_tools.datasets.pbmc3k", "LatentTraversal.top_genes",
            "scvae_tools.diagnostics.sample", "scvae_tools.backed.read_backed"} <= set(API)
    assert "scvae_tools.tl.check_key_added" not in API


@pytest.mark.parametrize("name", sorted(API))
def test_docstring_parameters_match_signature(name):
    obj = API[name]
    doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
    assert doc and doc.splitlines()[0].strip(), f"{name} has no docstring summary line"
    if isinstance(obj, property):
        assert documented_parameters(doc) is None, f"property {name} documents parameters"
        return
    expected = _signature_names(obj)
    documented = documented_parameters(doc)
    if documented is None and inspect.isclass(obj):  # numpydoc allows either place
        documented = documented_parameters(inspect.getdoc(obj.__init__) or "")
    if documented is None and dataclasses.is_dataclass(obj):  # its fields are its parameters
        documented = documented_parameters(doc, "Attributes")
    assert (documented or []) == expected, (
        f"{name}: docstring documents {documented}, signature has {expected}")


def test_parser_reads_grouped_and_starred_names():
    doc = """Summary.

    Parameters
    ----------
    a, b : int
        Two.
        Indented text : not a name.
    *args
    **kwargs
        Rest.

    Returns
    -------
    x
        Not a parameter.
    """
    assert documented_parameters(inspect.cleandoc(doc)) == ["a", "b", "args", "kwargs"]
    assert documented_parameters("Summary only.") is None




def test_readme_tables_are_found():
    names = {n for n, _ in README_CALLS}
    assert {"svt.SCVAE", "model.train", "svt.tl.scvae", "svt.pl.ppc"} <= names


def test_readme_table_names_exist_with_their_arguments():
    problems = []
    for dotted, args in README_CALLS:
        try:
            obj = _resolve(dotted)
        except AttributeError as err:
            problems.append(f"{dotted}: no {err}")
            continue
        if not args or isinstance(obj, property) or not callable(obj):
            continue
        params = inspect.signature(obj).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        # Keyword arguments (``x=``) at the call's own level must be parameters; positional
        # placeholders (``dir``, ``n``) are names in prose.
        for arg in re.findall(r"(?:^|,)\s*(\w+)\s*=", _top_level(args)):
            if arg not in params and not takes_any:
                problems.append(f"{dotted}: README passes {arg}=, not a parameter")
    assert not problems, "\n".join(problems)


def test_readme_mentions_every_tl_and_pl_function():
    missing = [name for name in API
               if name.startswith(("scvae_tools.tl.", "scvae_tools.pl."))
               and f"svt.{name.removeprefix('scvae_tools.')}" not in README]
    assert not missing, f"not mentioned in README.md: {missing}"
