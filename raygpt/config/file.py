"""nanoGPT-format config files (`key = value` lines, comments, literals, simple arithmetic), read with
`ast`, never exec'd: nanoGPT's own files load unchanged, but a config file cannot run code, and the size
of what it computes is checked before it is computed."""

from __future__ import annotations

import ast
import io
import operator
import tokenize
import typing
from pathlib import Path

from raygpt.config.schema import DEFAULTS, MAX_STR_LEN, ConfigError, check_known, read_small_file, shorten, shown
from raygpt.errors import one_line
from raygpt.storage.files import NulCharacterError, decode_text

BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
CONVERSIONS = {"str": str, "int": int, "float": float}
# Imports nanoGPT's own config files use for harmless things like a timestamped run name.
ALLOWED_IMPORTS = {"time"}
# A config value is a short expression; these bounds refuse, before anything is computed, what would take
# the parser, the evaluator or the memory a long time: deep nesting, 10**10**10, 'a' * 10**10.
MAX_STATEMENT_TOKENS = 200  # nesting depth is at most this, far below Python's recursion limit
MAX_INT_BITS = 1024  # past a float's range (2**1024): no config value needs a larger int
MAX_NUMBER_CHARS = 400  # int('...') and float('...') of longer strings: a 1024-bit int has 309 digits


# What a config value may be, for the refusal of anything else.
ALLOWED = "a value is a literal, + - * / // % ** of values, str(), int() or float() of one, or an earlier key"
UNSUPPORTED_KINDS = {
    ast.JoinedStr: "an f-string",
    ast.List: "a list",
    ast.Tuple: "a tuple",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.Attribute: "an attribute",
    ast.Subscript: "indexing",
    ast.Compare: "a comparison",
    ast.BoolOp: "and/or",
    ast.IfExp: "a conditional",
    ast.Lambda: "a lambda",
    ast.NamedExpr: "an assignment expression",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator",
    ast.BinOp: "an operator other than + - * / // % **",
    ast.UnaryOp: "an operator other than - + not",
    ast.Call: "a call with keyword arguments",
}


class _Evaluator:
    """Evaluates one config value. Every result is at most MAX_INT_BITS or MAX_STR_LEN long, and the
    sizes of powers and repetitions are checked before they are computed."""

    def __init__(self, where: str, source: str, names: dict, imports: set[str]):
        self.where, self.source, self.names, self.imports = where, source, names, imports

    def refuse(self, node, what: str) -> typing.NoReturn:
        raise ConfigError(f"{self.where}:{getattr(node, 'lineno', '?')}: {what}")

    def fail(self, node, what: str) -> typing.NoReturn:
        self.refuse(node, f"{what} is not allowed in a config file ({ALLOWED})")

    def unsupported(self, node) -> typing.NoReturn:
        """Refuse an expression the evaluator does not take, named as the user wrote it."""
        if isinstance(node, ast.Constant):
            kind = {bytes: "a bytes value", complex: "a complex number"}.get(type(node.value), "this constant")
        else:
            kind = UNSUPPORTED_KINDS.get(type(node), "this expression")
        self.fail(node, f"{self.text(node)} ({kind})")

    def text(self, node) -> str:
        return shorten(ast.get_source_segment(self.source, node) or type(node).__name__, 60)

    def eval(self, node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
            return self.bounded(node, node.value)
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            if node.id in ("True", "False", "None"):
                return {"True": True, "False": False, "None": None}[node.id]
            self.refuse(node, f"unknown name '{node.id}'")
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPS:
            left, right = self.eval(node.left), self.eval(node.right)
            self.check_binary(node, left, right)
            return self.bounded(node, self.compute(node, BINARY_OPS[type(node.op)], left, right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPS:
            return self.compute(node, UNARY_OPS[type(node.op)], self.eval(node.operand))
        if isinstance(node, ast.Call) and not node.keywords:
            return self.call(node)
        self.unsupported(node)

    def check_binary(self, node: ast.BinOp, left, right) -> None:
        """Refuse, before computing it, an operation on strings other than + and repetition, and a
        repetition or an integer power whose result would be too large."""
        op = type(node.op)
        if isinstance(left, str) or isinstance(right, str):
            if op is ast.Mod:
                self.fail(node, "string formatting with %")
            if op is ast.Mult and isinstance(left, str) != isinstance(right, str):
                text, times = (left, right) if isinstance(left, str) else (right, left)
                if isinstance(times, int) and len(text) * times > MAX_STR_LEN:
                    self.too_large(node)
            elif not (op is ast.Add and isinstance(left, str) and isinstance(right, str)):
                self.refuse(node, f"cannot combine {shown(left)} and {shown(right)}")
        elif op is ast.Pow and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
            # |left| >= 2**(bit_length - 1), so the result has at least this many bits.
            if right * (abs(left).bit_length() - 1) > MAX_INT_BITS:
                self.too_large(node)

    def compute(self, node, function, *args):
        """function(*args); Python's errors (division by zero, overflow, bad operand types) as one line."""
        try:
            return function(*args)
        except (ArithmeticError, ValueError, TypeError) as e:
            # OverflowError's args are (errno, message); the others' are (message,).
            reason = e.args[-1] if e.args and isinstance(e.args[-1], str) else str(e)
            self.refuse(node, f"cannot evaluate {self.text(node)}: {one_line(reason) or type(e).__name__}")

    def bounded(self, node, value):
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            self.too_large(node)
        if isinstance(value, str) and len(value) > MAX_STR_LEN:
            self.too_large(node)
        if isinstance(value, complex):
            self.refuse(node, f"{self.text(node)} is a complex number")
        return value

    def too_large(self, node) -> typing.NoReturn:
        self.refuse(
            node,
            f"{self.text(node)} is too large for a config value "
            f"(ints up to {MAX_INT_BITS} bits, strings up to {MAX_STR_LEN:,} characters)",
        )

    def call(self, node: ast.Call):
        func = node.func
        args = [self.eval(arg) for arg in node.args]
        if isinstance(func, ast.Name) and func.id in CONVERSIONS and len(args) != 1:
            self.refuse(node, f"{self.text(node)}: {func.id}() takes exactly one argument in a config file")
        if isinstance(func, ast.Name) and func.id in CONVERSIONS:
            if func.id in ("int", "float") and isinstance(args[0], str) and len(args[0]) > MAX_NUMBER_CHARS:
                self.refuse(node, f"{self.text(node)}: a {len(args[0]):,}-character string is too long for a number")
            return self.bounded(node, self.compute(node, CONVERSIONS[func.id], args[0]))
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "time"
            and "time" in self.imports
            and func.attr == "time"
            and not args
        ):
            import time

            return time.time()
        self.fail(node, f"calling {self.text(func)}()")


def read_source(path: Path) -> str:
    """A config file's text: a small regular UTF-8 file without NUL bytes."""
    data = read_small_file(path, "config file")
    try:
        return decode_text(data)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text file (byte {e.start} is not UTF-8); a config file holds `key = value` lines"
        ) from None
    except NulCharacterError as e:
        raise ConfigError(
            f"{path}:{e.line}: a NUL byte: not a text file; a config file holds `key = value` lines"
        ) from None


def check_statement_lengths(path: Path, source: str) -> None:
    """Refuse a statement of more than MAX_STATEMENT_TOKENS tokens, or a number literal of more than
    MAX_NUMBER_CHARS characters, before it is parsed: Python's parser and this evaluator recurse once per
    level of nesting (`-(-(-(...)))`, `not not ...`, `1+1+...`)."""
    count, start = 0, None
    skip = (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER) or token.string == ";":
                count, start = 0, None
            elif token.type == tokenize.NUMBER and len(token.string) > MAX_NUMBER_CHARS:
                # Before the parser converts it: a decimal literal of 300,000 digits takes it seconds.
                raise ConfigError(
                    f"{path}:{token.start[0]}: a {len(token.string):,}-character number is too large for a "
                    f"config value (ints up to {MAX_INT_BITS} bits)"
                )
            elif token.type not in skip:
                start = start or token.start[0]
                count += 1
                if count > MAX_STATEMENT_TOKENS:
                    raise ConfigError(
                        f"{path}:{start}: a statement of more than {MAX_STATEMENT_TOKENS} tokens is too long "
                        "or nested too deeply for a config file"
                    )
    except (tokenize.TokenError, SyntaxError):
        return  # ast.parse names the syntax error and its line


def parse_config_file(path: str | Path) -> dict:
    """The `key = value` assignments of a nanoGPT-format config file, evaluated without exec."""
    path = Path(path)
    source = read_source(path)
    check_statement_lengths(path, source)
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno or '?'}: syntax error: {e.msg}") from None
    values: dict = {}
    imports: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.Import) and all(
            alias.name in ALLOWED_IMPORTS and not alias.asname for alias in stmt.names
        ):
            imports |= {alias.name for alias in stmt.names}
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
            continue  # a docstring
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise ConfigError(
                f"{path}:{stmt.lineno}: only `key = value` lines are allowed in a config file, "
                f"got: {shorten(ast.get_source_segment(source, stmt) or '')}"
            )
        name = stmt.targets[0].id
        try:
            check_known(name)
        except ConfigError as e:
            raise ConfigError(f"{path}:{stmt.lineno}: {e}") from None
        # Later lines may refer to keys set earlier in the file, or to defaults.
        values[name] = _Evaluator(str(path), source, {**DEFAULTS, **values}, imports).eval(stmt.value)
    return values
