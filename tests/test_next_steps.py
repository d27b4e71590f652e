"""Every expected error says what is wrong and what to do: a rule over the whole package, not a list of cases.

Each `ShadowMergeError(...)` (and its subclasses) raised in shadowmerge/ is read from the source (ast): the
message's last clause (after its last ';', or the whole message) must name a next step, with one of the
verbs below (pass, re-save, re-download, choose, ...), or end in a hint that a variable holds (`hint`,
`INSTALL`, ...; their values are checked the same way where they are defined). A new error without a next
step fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "shadowmerge"
ERRORS = ("ShadowMergeError", "NoUpdate")
NEXT_STEP = re.compile(
    r"\b(pass|re-?save|re-?download|download|choose|use|add|remove|fix|run|install|check|free|move|shorten|simplify|"
    r"exclude|convert|set|give|leave|raise|lower|write|rename|delete|retry|try|start|keep|merge|make|save|upgrade|"
    r"point|select|wait|bypass|replace|edit|log in|accept|request|ask|go on|see|load|drop|"
    r"increase|reduce|put|train|clean|unset|restore|update|contact|re-?run|finish|name|rebuild|pick)\b", re.I)
HINT_NAMES = re.compile(r"\{(hint|HINT|[a-z_]*hint|INSTALL|OVERRIDE|SAVE|OTHER|suggest)\}\)?$")


def _text(node) -> str:
    """The message as written: literal parts kept, each formatted value as {name} (or {} for an expression)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) for v in node.values)
    if isinstance(node, ast.FormattedValue):
        return _text(node.value) if isinstance(node.value, (ast.Name, ast.Attribute)) else "{}"
    if isinstance(node, ast.Attribute):
        return "{" + node.attr + "}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _text(node.left) + _text(node.right)
    if isinstance(node, ast.Name):
        return "{" + node.id + "}"
    return "{}"


def messages():
    """(file, line, message) for every expected error raised in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and \
                    getattr(node.func, "id", getattr(node.func, "attr", None)) in ERRORS:
                yield path.relative_to(PACKAGE.parent), node.lineno, _text(node.args[0])


def hints():
    """(file, line, text) for every string a message takes its next step from: assignments to a name that
    HINT_NAMES accepts (hint = "...", SAVE = "...") and hint= keyword arguments."""
    names = re.compile(HINT_NAMES.pattern.replace(r"\{(", "(").replace(r"\}\)?$", "$"))
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            pairs = []
            if isinstance(node, ast.Assign):
                pairs = [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.keyword) and node.arg:
                pairs = [(node.arg, node.value)]
            for name, value in pairs:
                if names.fullmatch(name) and isinstance(value, (ast.Constant, ast.JoinedStr)):
                    yield path.relative_to(PACKAGE.parent), value.lineno, _text(value)


def says_what_to_do(message: str) -> bool:
    last = message.rsplit(";", 1)[-1].strip().rstrip(".")
    words = re.sub(r"\{[^}]*\}", " ", last)          # a formatted value's name is no instruction
    return bool(NEXT_STEP.search(words) or HINT_NAMES.search(last))


def test_every_error_says_what_to_do():
    found = list(messages())
    assert len(found) > 200, "the scan no longer sees the package's errors"
    missing = [f"{path}:{line}: {text[:160]}" for path, line, text in found if not says_what_to_do(text)]
    assert not missing, "errors without a next step:\n" + "\n".join(missing)


def test_every_hint_a_message_ends_in_says_what_to_do():
    found = list(hints())
    assert len(found) > 10, "the scan no longer sees the hints"
    missing = [f"{path}:{line}: {text[:160]}" for path, line, text in found
               if not NEXT_STEP.search(re.sub(r"\{[^}]*\}", " ", text))]
    assert not missing, "hints without a next step:\n" + "\n".join(missing)


def test_the_rule_tells_apart():
    assert says_what_to_do("x: cannot be read (Is a directory); re-download it")
    assert says_what_to_do("bad header; {hint}")
    assert not says_what_to_do("lora_A has rank 4 but lora_B has 2")
    assert not says_what_to_do("x is not a valid regular expression (missing ), unterminated subpattern)")
