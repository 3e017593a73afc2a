"""Re-runnable configs: `--config FILE` (YAML or JSON) gives flag values; the command line overrides the file,
and the file overrides the defaults.

The file is a flat mapping from argparse dest names (`learning_rate`, `group_by_length`, ...) to values, so a
run's own args.json (`json.dump(vars(args))`, None for unset) works as is: `--config lora_model/args.json`
re-runs that run. Values go through the argument's `type` and `choices` ("5e-5" and 5e-05 both work for a
float; an int flag refuses 8.5), store_true/store_false dests take true/false, None means unset, and
required arguments may come from the file. Problems are one-line UserErrors that name the file and the key;
an unknown key names the closest flag. A `config` key in the file is ignored (args.json records the file
its run came from), so configs never chain. A store_true flag set in the file cannot be turned off from the
command line: edit the file.

Which flags the command line gave is found by re-parsing it with every default suppressed (argparse.SUPPRESS),
so `--lr=1`, abbreviations and repeated flags count exactly as argparse counts them.

Usage (the integrator's wiring in train_lora.py):

    from lft.config import describe_sources, parse_args_with_config

    def parse_args(argv=None):
        p = ArgumentParser(...)
        ...                                           # every add_argument as today
        args, sources = parse_args_with_config(p, argv)   # adds --config FILE to p
        check_args(args)
        args.sources = sources  # or keep it beside args; leave it out of args.json (safe_args)
        return args

    # in the banner:
    lines += describe_sources(args, sources)   # ["values from run.yaml: learning_rate, num_epochs; from the
                                               #   command line: output_dir"]
"""
from __future__ import annotations

import argparse
import copy
import difflib
import json
import sys
from pathlib import Path

from .common import UserError

DEFAULT, CONFIG, COMMAND_LINE = "default", "config", "command line"
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def add_config_arg(parser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of flag values (a run's args.json works as is); flags given on "
                             "the command line override it")


def load_config(path) -> dict:
    """The file's mapping; a .json file is read as JSON, anything else as YAML (which also reads JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    import yaml  # PyYAML (pinned in requirements.txt; transformers needs it too)

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except ValueError as e:  # json.JSONDecodeError
        raise UserError(f"--config {path}: not valid JSON ({e})") from None
    except Exception as e:  # yaml.YAMLError
        first = " ".join(str(e).split())[:200]
        raise UserError(f"--config {path}: not valid YAML ({first})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, got a {type(data).__name__}")
    return data


def _is_flag(action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _convert(action, key: str, value, path):
    """`value` as argparse would have stored it from the command line."""
    where = f"--config {path}: {key}"
    if value is None:
        return None
    if _is_flag(action):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise UserError(f"{where} {value!r} is not true or false")
    if action.nargs in ("*", "+") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise UserError(f"{where} {value!r} is not a list")
        return [_convert_one(action, where, v) for v in value]
    if isinstance(value, (list, dict)):
        raise UserError(f"{where} {value!r} is not a single value")
    return _convert_one(action, where, value)


def _convert_one(action, where: str, value):
    if action.type is not None:
        if isinstance(value, bool):  # YAML's yes/no: never a number or a name
            raise UserError(f"{where} {value!r} is not a valid {getattr(action.type, '__name__', 'value')}")
        try:
            # through str, as from the command line: int("8.5") fails where int(8.5) would truncate
            value = action.type(value if isinstance(value, str) else repr(value) if isinstance(value, float)
                                else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UserError(f"{where} {value!r} is not a valid {getattr(action.type, '__name__', 'value')}") \
                from None
    elif not isinstance(value, str):
        value = str(value)  # an untyped flag holds strings
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions
            if a.dest not in (argparse.SUPPRESS, "help", "config") and not isinstance(a, argparse._HelpAction)}


def command_line_values(parser, argv) -> dict:
    """What the command line itself set, by dest: argv re-parsed with every default suppressed (and nothing
    required, so a required flag may come from the file)."""
    probe = copy.deepcopy(parser)
    probe._defaults = {}
    for a in probe._actions:
        a.default = argparse.SUPPRESS
        a.required = False
    return vars(probe.parse_args(argv, argparse.Namespace()))


def parse_args_with_config(parser, argv=None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parse `argv` (default sys.argv[1:]) with values from `--config FILE` in between the defaults and the
    command line. Returns (args, sources): sources maps every dest to 'default', 'config' or 'command line'.
    Adds --config to `parser` if it has none; `parser` is otherwise left as it was."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "config" not in {a.dest for a in parser._actions}:
        add_config_arg(parser)
    given = command_line_values(parser, argv)
    path = given.get("config")
    values = {}
    if path:
        actions = _actions(parser)
        for key, value in load_config(path).items():
            if key == "config":
                continue  # the file a run's args.json came from: configs do not chain
            if key not in actions:
                close = difflib.get_close_matches(str(key), list(actions), n=1, cutoff=0.6)
                hint = f"did you mean --{close[0]}?" if close else "see --help for the flags"
                raise UserError(f"--config {path}: unknown key {key!r} ({hint})")
            values[key] = _convert(actions[key], key, value, path)
    run = copy.deepcopy(parser)
    run.set_defaults(**values)
    for a in run._actions:
        if a.required and values.get(a.dest) is not None:
            a.required = False
    args = run.parse_args(argv)
    sources = {dest: COMMAND_LINE if dest in given else CONFIG if dest in values else DEFAULT
               for dest in _actions(parser)}
    return args, sources


def describe_sources(args, sources: dict) -> list[str]:
    """The banner's line saying where non-default values came from, e.g.
    ["values from run.yaml: learning_rate, num_epochs; from the command line: output_dir"]; [] when every
    value is a default."""
    parts = []
    config = [d for d, s in sources.items() if s == CONFIG]
    cli = [d for d, s in sources.items() if s == COMMAND_LINE]
    if config:
        parts.append(f"from {getattr(args, 'config', None) or 'the config'}: {', '.join(config)}")
    if cli:
        parts.append(f"from the command line: {', '.join(cli)}")
    return [f"values {'; '.join(parts)}"] if parts else []
