"""Every error and warning message keras_parallel can show, read from the source.

    python tools/messages.py            # each message, its phrase, and whether the page has it
    python tools/messages.py --missing  # only those docs/troubleshooting.md lacks (exit 1 if any)

Read statically (no import, no framework needed) from keras_parallel/**/*.py and
keras_parallel_cli.py:

- `raise SomeError("...")` / `raise SomeError(f"...")`;
- `warn("...")` (keras_parallel._warnings.warn) and `warnings.warn("...")`;
- `_invalid(name, "expected ...", value)` (keras_parallel._validation), whose
  message is "Invalid value for argument `name`. Expected <expected>. ...";
- `_error(command, "...", code)` (the command line's errors).

A message's *phrase* is its longest literal piece between the `{...}` fields
of its f-string, trimmed of punctuation and cut to `PHRASE_WORDS` words:
docs/troubleshooting.md must contain that text (whitespace does not matter),
normally inside the quoted message of the entry that explains it.
tests/test_docs.py fails, naming the file, line and phrase, for every message
whose phrase the page lacks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"
PHRASE_WORDS = 10
#: Calls that carry a message, and which positional argument holds it.
MESSAGE_CALLS = {"warn": 0, "_invalid": 1, "_error": 1}
#: Messages no user meets, by (file, message start), each with the reason.
NOT_FOR_USERS = {
    ("keras_parallel/memory.py", "module {} has no attribute"): "Python's module __getattr__",
    ("keras_parallel/_ops.py", "call_on_local_values needs"): "a tf-keras stub, never called",
}
_TRIM = " \t\n`.,:;'\"()"


@dataclass(frozen=True)
class Message:
    path: str  # relative to the repository root
    line: int
    kind: str  # the exception class, "warn", "_invalid" or "_error"
    text: str  # the message with "{}" for each field
    phrase: str  # what the page must contain ("" when the message has no literal text)

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _literal(node, names: dict | None = None) -> str | None:
    """The message with "{}" for each field; None when it is not built from literals.

    A variable counts when the function assigns it a literal (`names`); of an
    `a if c else b`, the first branch is read.
    """
    names = names or {}
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return (_literal(node.left, names) or "{}") + (_literal(node.right, names) or "{}")
    if isinstance(node, ast.IfExp):
        return _literal(node.body, names)
    if isinstance(node, ast.Name) and node.id in names:
        return _literal(names[node.id])
    return None


def phrase_of(text: str) -> str:
    """The longest literal piece of `text`, trimmed and cut to `PHRASE_WORDS` words."""
    pieces = [" ".join(p.split()).strip(_TRIM) for p in text.split("{}")]
    longest = max(pieces, key=len, default="")
    return " ".join(longest.split()[:PHRASE_WORDS]).strip(_TRIM)


def _call_name(node) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _message(node, path: str, names: dict) -> Message | None:
    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
        call, kind, index = node.exc, _call_name(node.exc.func), 0
    elif isinstance(node, ast.Call) and _call_name(node.func) in MESSAGE_CALLS:
        call, kind = node, _call_name(node.func)
        index = MESSAGE_CALLS[kind]
    else:
        return None
    if kind is None or len(call.args) <= index:
        return None
    text = _literal(call.args[index], names)
    if text is None:  # a variable: a message made elsewhere (found there) or relayed
        return None
    phrase = phrase_of(text)
    if not phrase or any(path == p and text.startswith(t) for p, t in NOT_FOR_USERS):
        return None
    return Message(path, node.lineno, kind, text, phrase)


def messages(root: Path = ROOT) -> list[Message]:
    """Every message in the package and the command line, in file order."""
    files = sorted((root / "keras_parallel").rglob("*.py")) + [root / "keras_parallel_cli.py"]
    found = []
    for file in files:
        path = file.relative_to(root).as_posix()
        tree = ast.parse(file.read_text(), str(file))
        scopes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        seen = set()
        for scope in reversed(scopes):  # innermost functions first: their variables win
            names = {}
            for node in ast.walk(scope):
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                    if isinstance(target, ast.Name) and target.id not in names:
                        names[target.id] = node.value
            for node in ast.walk(scope):
                if id(node) in seen:
                    continue
                message = _message(node, path, names)
                if message is not None:
                    seen.add(id(node))
                    found.append(message)
    found.sort(key=lambda m: (m.path, m.line))
    return found


def _normal(text: str) -> str:
    return " ".join(text.split())


def missing(page_text: str | None = None, found: list[Message] | None = None) -> list[Message]:
    """The messages whose phrase docs/troubleshooting.md does not contain."""
    page = _normal(PAGE.read_text() if page_text is None else page_text)
    found = messages() if found is None else found
    return [m for m in found if _normal(m.phrase) not in page]


def describe(message: Message) -> str:
    return (
        f"{message.where()} {message.kind}: {message.text!r}\n"
        f"    docs/troubleshooting.md must contain: {message.phrase!r}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--missing", action="store_true", help="only the messages the page lacks")
    args = parser.parse_args(argv)
    lacking = set(missing())
    for message in messages():
        if args.missing and message not in lacking:
            continue
        mark = "MISSING " if message in lacking else "ok      "
        print(mark + describe(message))
    return 1 if args.missing and lacking else 0


if __name__ == "__main__":
    sys.exit(main())
