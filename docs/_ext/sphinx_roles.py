"""A Griffe extension: looppool's reST-flavoured docstrings, as mkdocstrings' Markdown.

looppool's docstrings are written for ``help()`` and for readers of the source,
in reStructuredText's inline style. mkdocstrings renders Markdown, so before
rendering this extension rewrites, in every docstring of the package:

* ``:class:`~looppool.Worker``` (any role) into a cross-reference when the
  name resolves to a public, documented object — ``[`Worker`][looppool.Worker]``,
  which ``mkdocs build --strict`` then checks — and into plain code
  (```Worker```) when it names a private or built-in object;
* a paragraph ending in ``::`` (a reST literal block follows) into one ending
  in ``:``, and a lone ``::`` line into nothing: the indented block after it is
  already a code block in Markdown;
* ``#:`` comments above a module or class attribute (Sphinx's attribute
  docstrings) into that attribute's docstring.

The docstrings themselves stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|meth|func|mod|attr|data|exc|obj):`(?P<tilde>~?)(?P<target>[\w.]+)`")
PUBLIC_MODULES = ("looppool", "looppool.testing", "looppool.metrics", "looppool.ray")


class SphinxRoles(griffe.Extension):
    """Rewrite reST roles and literal-block markers, and read ``#:`` attribute comments."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "looppool":
            return
        modules = loader.modules_collection
        public = _public_paths(modules)
        for obj in _walk(pkg):
            if obj.docstring is None and obj.is_attribute:
                _read_comment_docstring(obj)
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj.docstring.value, obj, public, modules)


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    """``obj`` and every object defined in it (not the names it imports)."""
    found = [obj]
    for member in obj.members.values():
        if not member.is_alias:
            found.extend(_walk(member))  # type: ignore[arg-type]
    return found


def _public_paths(modules: griffe.ModulesCollection) -> dict[str, str]:
    """Map each documented object's defining path to its public path (the first one wins)."""
    public: dict[str, str] = {}
    for module_path in PUBLIC_MODULES:
        module = modules.get_member(module_path)
        public.setdefault(module_path, module_path)
        names = module.exports if module.exports is not None else list(module.members)
        for name in names:
            member = module.members.get(str(name))
            if member is None:
                continue
            path = f"{module_path}.{name}"
            public.setdefault(_canonical(member), path)
            if member.is_class:
                for child_name, child in member.all_members.items():
                    if not child_name.startswith("_"):
                        public.setdefault(_canonical(child), f"{path}.{child_name}")
    return public


def _canonical(obj: griffe.Object | griffe.Alias) -> str:
    try:
        return obj.final_target.path if obj.is_alias else obj.path  # type: ignore[union-attr]
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return obj.path


def _resolve(name: str, obj: griffe.Object, modules: griffe.ModulesCollection) -> str | None:
    """The defining path of ``name`` as seen from ``obj`` (a class sees its inherited members)."""
    head, _, rest = name.partition(".")
    if head == "looppool":
        try:
            return _canonical(modules.get_member(name))
        except KeyError:
            return None
    scope: griffe.Object | None = obj
    while scope is not None:
        members = scope.all_members if scope.is_class else scope.members
        if head in members:
            found = _canonical(members[head])
            break
        if scope.is_module:
            return None
        scope = scope.parent
    else:
        return None
    if not rest:
        return found
    try:
        return _canonical(modules.get_member(f"{found}.{rest}"))
    except KeyError:
        return None


def _rewrite(
    text: str, obj: griffe.Object, public: dict[str, str], modules: griffe.ModulesCollection
) -> str:
    def role(match: re.Match[str]) -> str:
        target = match["target"]
        shown = target.rpartition(".")[2] if match["tilde"] else target
        resolved = _resolve(target, obj, modules)
        if resolved is not None and resolved in public:
            return f"[`{shown}`][{public[resolved]}]"
        return f"`{shown}`"

    text = ROLE.sub(role, text)
    # Only spaces and tabs around the markers: the blank lines that set the
    # literal block apart must stay, or Markdown reads it as more paragraph.
    text = re.sub(r"(?m)^[ \t]*::[ \t]*\n", "", text)
    return re.sub(r"(?m)(\S)::[ \t]*$", r"\1:", text)


def _read_comment_docstring(attr: griffe.Object) -> None:
    lines = attr.module.lines
    if not lines or attr.lineno is None:
        return
    comment: list[str] = []
    number = attr.lineno - 2  # the line above, 0-based
    while number >= 0 and lines[number].lstrip().startswith("#:"):
        comment.insert(0, lines[number].lstrip()[2:].strip())
        number -= 1
    if comment:
        attr.docstring = griffe.Docstring(
            "\n".join(comment), lineno=number + 2, endlineno=attr.lineno - 1, parent=attr
        )
