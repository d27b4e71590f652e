"""A command's settings dataclass as its click options: each field with `cli` metadata (`option(...)`) is one
option, in field order, and `from_cli` builds the dataclass back from what click parsed. GraftSpec (spec.py) and
EvalSettings (evaluate/settings.py) get their options this way, so a new setting is a field and the code using
it. Written here, not taken from a library: click has no dataclass binding, and the ones that exist bring a
parser of their own.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

FORCE_HELP = "Replace --out if it exists and shadowmerge wrote it (a user's own folder is never replaced)."


def option(flag: str | tuple[str, ...], help: str, *, invert: bool = False, convert=None, **click) -> dict:
    """A field's metadata: its option (flag or declarations such as "-q/--quiet" or a tuple, and click's
    keywords). invert: the flag sets the field False (--no-role-check, --quiet); convert: applied to the parsed
    value (e.g. a text to a tuple)."""
    return {"cli": dict(flag=flag, help=help, invert=invert, convert=convert, **click)}


def cli_options(settings_class):
    """A decorator adding one click option per field of settings_class that has `cli` metadata, in field order."""
    import click

    def decorate(command):
        for f in reversed(fields(settings_class)):
            cli = dict(f.metadata.get("cli") or {})
            if not cli:
                continue
            flag, invert, choices = cli.pop("flag"), cli.pop("invert"), cli.pop("choices", None)
            cli.pop("convert")
            decls = flag if isinstance(flag, tuple) else tuple(flag.split("/"))
            if choices:
                cli["type"] = click.Choice(list(choices))
            if "default" not in cli and not cli.get("is_flag") and f.default not in (None, MISSING):
                cli["default"] = f.default
            name = f"_not_{f.name}" if invert else f.name       # --no-role-check / --quiet set their field False
            command = click.option(*decls, name, **cli)(command)
        return command
    return decorate


def from_cli(settings_class, options: dict, **extra):
    """The settings from the options cli_options added (other options are left alone)."""
    values = dict(extra)
    for f in fields(settings_class):
        cli = f.metadata.get("cli") or {}
        if f"_not_{f.name}" in options:
            values[f.name] = not options[f"_not_{f.name}"]
        elif f.name in options:
            value = options[f.name]
            values[f.name] = cli["convert"](value) if cli.get("convert") else value
    return settings_class(**values)


def from_call(settings_class, positional: tuple[str, ...], args: tuple, options: dict, function: str):
    """The settings of a library call made as `function(settings)` or `function(*positional, **fields)`."""
    if len(args) == 1 and isinstance(args[0], settings_class) and not options:
        return args[0]
    if len(args) > len(positional):
        raise TypeError(f"{function}() takes at most {len(positional)} positional arguments ({', '.join(positional)})")
    for name, value in zip(positional, args):
        if name in options:
            raise TypeError(f"{function}() got multiple values for argument {name!r}")
        options[name] = value
    return settings_class(**options)
