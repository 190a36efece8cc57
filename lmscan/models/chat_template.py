"""Chat templates in a model folder, read as syntax trees and never rendered.

A chat template is Jinja code that every chat runtime renders with the user's messages.
In a runtime that renders it outside a sandbox (llama-cpp-python before 0.2.72:
CVE-2024-34359) an expression such as ``cycler.__init__.__globals__.os.popen(...)`` runs
shell commands. A real template formats messages: it loops over ``messages``, reads
``message['role']``, calls ``raise_exception``. So a template that reaches Python
internals (a ``__dunder__`` attribute), names ``os``/``subprocess``/``popen``, or calls
``eval``-like functions has no business being there, whatever a sandbox would make of it.

Only ``Environment.parse`` runs: it builds the syntax tree and never evaluates anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmscan.models.resolve import CHAT_TEMPLATE_FOLDER as ADDITIONAL_TEMPLATES

# Where transformers and the Hub keep chat templates.
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_JINJA = "chat_template.jinja"
TEMPLATE_JSON = "chat_template.json"

# Names that lead from a template to the interpreter: modules and process calls.
SENSITIVE_NAMES = frozenset({
    "os", "sys", "subprocess", "popen", "system", "eval", "exec", "import_module", "builtins", "importlib",
    "f_globals", "f_locals", "f_back", "gi_frame", "cr_frame", "func_globals",
})
# Functions a template never calls (none is a Jinja global; reaching one needs a gadget).
SENSITIVE_CALLS = frozenset({"eval", "exec", "getattr", "setattr", "compile", "open", "globals", "locals", "vars",
                             "import_module", "popen", "system"})
# Jinja globals whose ``__init__.__globals__`` reaches Python modules: the usual start of an escape.
GADGET_STARTS = frozenset({"cycler", "joiner", "namespace", "lipsum", "range", "dict", "self"})

_MAX_EXPRESSION = 200


@dataclass(frozen=True)
class TemplateSource:
    file: str  # the file in the folder, relative to it
    name: str  # the template's name ("default" for the only one)
    text: str


@dataclass(frozen=True)
class TemplateHit:
    expression: str  # the offending expression, as source-like text
    why: str
    line: int
    gadget: str | None = None  # the Jinja global it starts from, when it is a known gadget


def find_templates(model_dir: Path) -> tuple[list[TemplateSource], list[tuple[str, str]]]:
    """Every chat template in the folder, and (file, why) for template entries that are not text."""
    model_dir = Path(model_dir)
    found: list[TemplateSource] = []
    malformed: list[tuple[str, str]] = []
    for file_name in (TOKENIZER_CONFIG, TEMPLATE_JSON):
        path = model_dir / file_name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # an unreadable tokenizer config fails the load with its own message
        if isinstance(data, dict) and "chat_template" in data:
            _collect(file_name, data["chat_template"], found, malformed)
    jinja_files = [model_dir / TEMPLATE_JINJA, *sorted((model_dir / ADDITIONAL_TEMPLATES).glob("*.jinja"))]
    for path in jinja_files:
        if path.is_file():
            name = "default" if path.name == TEMPLATE_JINJA else path.stem
            try:
                found.append(TemplateSource(path.relative_to(model_dir).as_posix(), name,
                                            path.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                malformed.append((path.relative_to(model_dir).as_posix(), f"not readable text ({exc})"))
    return found, malformed


def _collect(file_name: str, value, found: list, malformed: list) -> None:
    if value is None:
        return
    if isinstance(value, str):
        found.append(TemplateSource(file_name, "default", value))
        return
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        for entry in value:
            if isinstance(entry, dict) and isinstance(entry.get("template"), str):
                found.append(TemplateSource(file_name, str(entry.get("name") or "default"), entry["template"]))
            else:
                malformed.append((file_name, "a chat_template entry without a template string"))
        return
    malformed.append((file_name, f"chat_template is a {type(value).__name__}, not a template"))


def check_template(text: str) -> list[TemplateHit]:
    """The expressions in ``text`` that reach outside a template's job. Parses, never renders;
    raises jinja2.TemplateSyntaxError when the text is not a template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    from jinja2 import nodes  # noqa: PLC0415

    tree = ImmutableSandboxedEnvironment().parse(text)
    # A variable the template sets itself ({% set system = ... %}) is its own data, not a module.
    own = frozenset(n.name for n in tree.find_all(nodes.Name) if n.ctx != "load")
    hits: list[TemplateHit] = []
    _walk(tree, in_chain=False, own=own, hits=hits)
    return hits


def _walk(node, in_chain: bool, own: frozenset, hits: list[TemplateHit]) -> None:
    from jinja2 import nodes  # noqa: PLC0415

    chain_types = (nodes.Getattr, nodes.Getitem, nodes.Call, nodes.Filter, nodes.Name)
    if isinstance(node, chain_types) and not in_chain:
        hit = _check_chain(node, own)
        if hit is not None:
            hits.append(hit)
    for child in node.iter_child_nodes():
        # The object a link applies to is part of the same chain; arguments are chains of their own.
        link = isinstance(node, (nodes.Getattr, nodes.Getitem, nodes.Call, nodes.Filter)) and child is node.node
        _walk(child, link, own, hits)


def _check_chain(node, own: frozenset = frozenset()) -> TemplateHit | None:
    """One expression chain (``a.b['c'](d)|attr('e')``): the first reason it is out of place."""
    from jinja2 import nodes  # noqa: PLC0415

    reasons = []
    root = None
    current = node
    while current is not None:
        if isinstance(current, nodes.Name):
            root = current.name
            if current.ctx == "load" and current.name not in own:
                reasons.append(_name_reason(current.name, "name"))
            break
        if isinstance(current, nodes.Getattr):
            reasons.append(_name_reason(current.attr, "attribute"))
        elif isinstance(current, nodes.Getitem) and isinstance(current.arg, nodes.Const):
            # Items only for dunders: a dict of roles may well have a 'system' key.
            if isinstance(current.arg.value, str) and "__" in current.arg.value:
                reasons.append(_name_reason(current.arg.value, "item"))
        elif isinstance(current, nodes.Filter) and current.name == "attr":
            for arg in current.args:
                if isinstance(arg, nodes.Const) and isinstance(arg.value, str):
                    reasons.append(_name_reason(arg.value, "attribute"))
        elif isinstance(current, nodes.Call):
            callee = current.node
            called = callee.name if isinstance(callee, nodes.Name) else getattr(callee, "attr", None)
            if called in SENSITIVE_CALLS:
                reasons.append(f"calls {called}()")
        current = getattr(current, "node", None)
    found = [r for r in reasons if r]
    if not found:
        return None
    why = found[-1]  # the innermost reason: where the chain first leaves a template's job
    gadget = root if root in GADGET_STARTS else None
    return TemplateHit(_render(node)[:_MAX_EXPRESSION], why, getattr(node, "lineno", 0) or 0, gadget)


def _name_reason(name: str, kind: str) -> str:
    if "__" in name:  # dunders and name-mangled privates (self._TemplateReference__context)
        return f"reaches Python internals through the {kind} {name}"
    if name in SENSITIVE_NAMES:
        return f"names {name}, a way to the operating system"
    return ""


def _render(node) -> str:
    """Source-like text of an expression, for the evidence (never evaluated)."""
    from jinja2 import nodes  # noqa: PLC0415

    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Const):
        return repr(node.value)
    if isinstance(node, nodes.Getattr):
        return f"{_render(node.node)}.{node.attr}"
    if isinstance(node, nodes.Getitem):
        return f"{_render(node.node)}[{_render(node.arg)}]"
    if isinstance(node, nodes.Call):
        args = ", ".join(_render(a) for a in node.args)
        return f"{_render(node.node)}({args})"
    if isinstance(node, nodes.Filter):
        args = ", ".join(_render(a) for a in node.args)
        base = _render(node.node) if node.node is not None else ""
        return f"{base}|{node.name}" + (f"({args})" if args else "")
    if isinstance(node, nodes.Tuple):
        return "(" + ", ".join(_render(i) for i in node.items) + ("," if len(node.items) == 1 else "") + ")"
    return "..."
