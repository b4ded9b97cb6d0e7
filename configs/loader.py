"""One schema per program, turned into a CLI, an environment reader and a YAML reader.

Precedence: command-line flag > environment variable (`SWARM_<FIELD>`) > YAML file (`--config`)
> the schema's default. Every option's type, default and help come from the pydantic model, so the
CLI, the files and the code never disagree. A wrong key or value is an error that names it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

ENV_PREFIX = "SWARM_"
Config = TypeVar("Config", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and where it came from."""


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(inner type, is_list) of an annotation such as `int`, `str | None` or `list[str]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    return annotation, False


def is_list_option(schema: type[BaseModel], name: str) -> bool:
    """Whether option `name` takes several values (on the command line: one per word)."""
    return _base_type(schema.model_fields[name].annotation)[1]


def env_prefix(schema: type[BaseModel]) -> str:
    """`SWARM_` for most programs; a schema may set its own (the relay's options are `SWARM_RELAY_*`)."""
    return getattr(schema, "ENV_PREFIX", ENV_PREFIX)


def env_names(schema: type[BaseModel], name: str) -> list[str]:
    """The environment variables read for option `name`, first found wins: the schema's own, then
    an alias it names in `ENV_ALIASES` (the volunteer platform's worker variables)."""
    aliases = getattr(schema, "ENV_ALIASES", {})
    return [env_prefix(schema) + name.upper()] + ([aliases[name]] if name in aliases else [])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def boolean_flags(name: str) -> tuple[str, str]:
    """(on, off) flags of a boolean option: `--x` / `--no-x`; an option named `no_x` is the same pair."""
    positive = name.removeprefix("no_")
    return _flag(positive), _flag("no_" + positive)


def _earlier_names(schema: type[BaseModel]) -> dict[str, str]:
    """{current option: its earlier name} for options a schema renamed (`RENAMED`, earlier → current)."""
    return {new: old for old, new in getattr(schema, "RENAMED", {}).items()}


CONFIG_HELP = "YAML file with any of the options below (keys use underscores)"


def build_parser(
    schema: type[BaseModel], prog: str, description: str, epilog: str | None = None, config_help: str = CONFIG_HELP
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE", help=config_help)
    fields = sorted(schema.model_fields.items(), key=lambda item: not item[1].is_required())
    earlier = _earlier_names(schema)
    for name, field in fields:
        base, is_list = _base_type(field.annotation)
        env = " or ".join(env_names(schema, name))
        default = "required" if field.is_required() else f"default: {field.get_default(call_default_factory=True)!r}"
        help_text = f"{field.description or ''} [{default}; env {env}]"
        flags = [_flag(name)]
        if name in earlier:
            flags.append(_flag(earlier[name]))
            help_text += f" (formerly {_flag(earlier[name])}, still accepted)"
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool and not is_list and name.startswith("no_"):
            # A negative option `no_x` gets the natural pair --x / --no-x (BooleanOptionalAction would
            # add --no-no-x): --no-x sets it, --x clears it.
            parser.add_argument(*flags, action="store_true", **kwargs)
            positive = dict(kwargs, help=f"the opposite of {flags[0]}")
            parser.add_argument(boolean_flags(name)[0], action="store_false", **positive)
        elif base is bool and not is_list:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(*flags, nargs="+", metavar=name.upper(), **kwargs)
        else:
            parser.add_argument(*flags, metavar=name.upper(), **kwargs)
    return parser


def load_config(
    schema: type[Config],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parses `argv`, merges environment and YAML values, and validates the result against `schema`."""
    environ = os.environ if environ is None else environ
    cli = vars(parser.parse_args(argv))
    prefix = env_prefix(schema)
    config_file = cli.pop("config", None) or environ.get(prefix + "CONFIG")
    values: dict[str, Any] = {}
    if config_file:
        values.update(read_yaml(Path(config_file), schema))
    earlier = _earlier_names(schema)
    for name, field in schema.model_fields.items():
        names = env_names(schema, name)
        if name in earlier:
            names.insert(1, prefix + earlier[name].upper())
        raw = next((environ[env] for env in names if environ.get(env)), None)
        if raw is not None:
            _, is_list = _base_type(field.annotation)
            values[name] = [item.strip() for item in raw.split(",") if item.strip()] if is_list else raw
    values.update(cli)
    return validate(schema, values)


def validate(schema: type[Config], values: Mapping[str, Any]) -> Config:
    """`schema` built from `values`, or a ConfigError naming every wrong key and why."""
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None


def read_yaml(path: Path, schema: type[BaseModel]) -> dict[str, Any]:
    """The options a YAML file sets (earlier names mapped to current ones); an unknown key is an error."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    for old, new in getattr(schema, "RENAMED", {}).items():
        if old in data:
            if new in data:
                raise ConfigError(f"{path} sets both {old} and {new}, the same option (its earlier and current name)")
            data[new] = data.pop(old)
    unknown = sorted(set(data) - set(schema.model_fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(map(str, unknown))}")
    return data


def cli_options(
    schema: type[Config], prog: str, description: str, epilog: str, argv: Sequence[str] | None = None
) -> Config:
    """Parses a program's options (exit 2 with the offending key on error) and sets up its logging."""
    parser = build_parser(schema, prog=prog, description=description, epilog=epilog)
    try:
        options = load_config(schema, parser, argv)
    except ConfigError as e:
        parser.error(str(e))
    level = getattr(options, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("hivemind").setLevel(level)
    return options


def example_yaml(schema: type[BaseModel], program: str, examples: Mapping[str, Any]) -> str:
    """A YAML file documenting every option of `schema` with its default (or an example value)."""
    lines = [
        f"# Every option of `{program}`, with its default. Pass this file with --config; an environment",
        "# variable SWARM_<KEY> or a command-line flag --<key-with-dashes> overrides any value here.",
        "",
    ]
    for name, field in schema.model_fields.items():
        value = examples[name] if name in examples else field.get_default(call_default_factory=True)
        required = " (required)" if field.is_required() else ""
        lines.append(f"# {field.description}{required}")
        lines.append(yaml.safe_dump({name: value}, default_flow_style=False, width=1000).strip())
        lines.append("")
    return "\n".join(lines)
