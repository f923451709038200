"""A run's configuration from the command line: `[CONFIG_FILE] [--key=value ...]` read into a TrainConfig
(file over defaults, flags over file), and the keys' --help text."""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

from raygpt.config.file import parse_config_file
from raygpt.config.schema import FIELD_TYPES, ConfigError, TrainConfig, check_known, shorten


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal when it is one, else the string itself (as nanoGPT)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError):
        return text
    except (RecursionError, MemoryError):  # the parser's own limit on nesting: the text is at most ~128 KiB
        raise ConfigError(f"value {shorten(text)} is nested too deeply to read") from None


def parse_overrides(argv: list[str]) -> dict:
    """`--key=value` and `--key value` arguments; dashes in keys are underscores (`--num-workers`)."""
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"expected --key=value, got {arg!r}")
        name, has_value, text = arg[2:].partition("=")
        check_known(name.replace("-", "_"))  # a typo is named as one, not as a key without a value
        if not has_value:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a value (--{name}=VALUE)")
            i += 1
            text = argv[i]
        name = name.replace("-", "_")
        if name == "num_workers" and re.fullmatch(r"\d+-\d+", text):  # --num-workers MIN-MAX: elastic
            least, most = map(int, text.split("-"))
            if most == 0:  # max_workers=0 would quietly make it a fixed count; validate() checks the rest
                raise ConfigError(f"--num-workers MIN-MAX needs 1 <= MIN <= MAX, got {text}")
            values["num_workers"], values["max_workers"] = least, most
        else:
            values[name] = parse_value(text)
            if FIELD_TYPES[name] is str and not isinstance(values[name], str):
                values[name] = text  # --out_dir=123, --run_name=2024: a name that reads as a number
        i += 1
    return values


def read_config(argv: list[str]) -> tuple[TrainConfig, frozenset[str]]:
    """[CONFIG_FILE] [--key=value ...] -> a validated TrainConfig (file over defaults, flags over file),
    and the keys the user set (in the file or as flags), read once."""
    values: dict = {}
    if argv and not argv[0].startswith("-"):
        values.update(parse_config_file(argv[0]))
        argv = argv[1:]
    values.update(parse_overrides(argv))
    return TrainConfig.from_dict(values), frozenset(values)


def load_config(argv: list[str]) -> TrainConfig:
    """read_config without the explicit keys."""
    return read_config(argv)[0]


def config_help() -> str:
    """Every key with its default and description, for --help."""
    flags = {f.name: f"--{f.name}={f.default!r}" for f in dataclasses.fields(TrainConfig)}
    width = max(len(flag) for flag in flags.values())
    lines = ["config keys (in a config file as key = value, or on the command line as --key=value):"]
    for f in dataclasses.fields(TrainConfig):
        lines.append(f"  {flags[f.name]:<{width}}  {f.metadata['help']}")
    return "\n".join(lines)
