"""Configuration: dataclasses whose fields carry their help text.

One dataclass per command is the schema of its options. From it come the CLI flags
(:func:`add_arguments` / :func:`from_namespace`; each spelled with dashes, underscores
and TRL's name, :data:`ALIASES`; :class:`Parser` errors are one line), loading from TOML or YAML files
(:func:`build`: unknown keys and wrong types are refused with the key's name), and
``key=value`` overrides. :func:`to_dict` gives the resolved config that is hashed for
lineage and written next to every output.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path

from .errors import InputError

# Options that name files, datasets or models (in any command's config): outputs must not
# collide with them, and a pipeline fingerprints them when given literally.
PATH_OPTIONS = ("policy", "reward_model", "reference", "prompts", "generations", "data",
                "baseline", "eval_prompts", "ilql_heads", "checkpoints", "metrics", "previous_data",
                "judge", "judge_template")


def opt(default=dataclasses.MISSING, help: str = "", **kw):
    """A dataclass field with a help string (``default`` may be a list or dict)."""
    if isinstance(default, (list, dict)):
        value = default
        kw["default_factory"] = lambda: type(value)(value)
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(metadata={"help": help}, **kw)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value, tp, where: str):
    """Check (and gently convert) ``value`` against the annotation ``tp``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{where}: must not be null")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a table of settings, got {type(value).__name__}")
        return build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        if not isinstance(value, list):
            raise InputError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, vt = typing.get_args(tp) or (str, typing.Any)
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a table, got {type(value).__name__}")
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise InputError(f"{where}: expected true or false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise InputError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise InputError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls, data: dict, where: str = "config"):
    """Make ``cls`` from a mapping; unknown keys, wrong types and missing required
    fields are refused with the key's dotted name."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(fields)})")
    hints = _hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise InputError(f"{where}.{name}: required key is missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{where}: {e}") from None


def load_file(path: str | Path) -> dict:
    """Read a TOML or YAML config file as plain data (never executes anything)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: config file not found")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
            return data or {}
    except Exception as e:  # noqa: BLE001 - parsers raise many types; report one line
        raise InputError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None
    raise InputError(f"{path}: config files are .toml, .yaml or .yml")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as JSON when they parse, else text)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"override '{item}': expected key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"override '{item}': {part} is not a table")
        node[parts[-1]] = value
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- argparse

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Other names of options, as TRL (transformers' TrainingArguments, trl's configs) spells
# them, where the meaning is the same: alias -> field. Each applies only to a command
# that has the field and no field of the alias's own name (docs/cli.md has the table).
ALIASES = {
    "learning_rate": ("lr",),
    "num_train_epochs": ("epochs",),
    "lr_scheduler_type": ("schedule",),
    "logging_steps": ("log_steps",),
    "loss_type": ("loss",),
    "max_length": ("max_tokens",),          # prompt + response tokens
    "max_tokens": ("max_length",),          # (the reward model's inputs are called max_length)
    "max_prompt_length": ("max_prompt_tokens",),
    "max_completion_length": ("max_completion_tokens", "max_new_tokens"),
    "output_dir": ("output",),
    "model_name_or_path": ("policy",),
    "torch_dtype": ("dtype",),
}


def alias_target(alias: str, fields) -> str | None:
    """The field that ``alias`` names in a command whose fields are ``fields`` (None: the
    command has a field of that name, or none of the alias's fields)."""
    if alias in fields:
        return None
    return next((f for f in ALIASES.get(alias, ()) if f in fields), None)


def flag_spellings(field: str, fields) -> list[str]:
    """Every flag that sets ``field``: ``--max-steps`` first (the one help shows), then
    ``--max_steps`` and the TRL names in both spellings."""
    out = [_flag(field)]
    names = [field] + [a for a in ALIASES if alias_target(a, fields) == field]
    for name in names:
        out += [s for s in ("--" + name.replace("_", "-"), "--" + name) if s not in out]
    return out


def resolve_aliases(cls, data: dict, where: str) -> dict:
    """A config file's keys with dashes and TRL names turned into ``cls``'s field names;
    a key given twice (by two names) is refused."""
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        name = alias_target(name, fields) or name
        if name in out:
            raise InputError(f"{where}.{key}: {name} is given twice (by two of its names)")
        out[name] = value
    return out


# Options whose command-line values understand backslash escapes (a shell cannot easily
# type a newline). Values from a --config file or a KEY=VALUE override are taken as their
# TOML/YAML/JSON parser gives them (TOML's "\n" is a newline already): never unescaped twice.
ESCAPED_OPTIONS = ("stop",)
ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """``\\n`` -> newline, ``\\t`` -> tab, ``\\\\`` -> one backslash; any other backslash
    sequence is refused (argparse reports it in one line)."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1:i + 2]
            if nxt not in ESCAPES:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: unknown escape '\\{nxt}' (known: \\n, \\t, \\\\; write a "
                    "backslash as \\\\)")
            out.append(ESCAPES[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _default_text(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if default in (None, [], {}, ""):
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, (list, dict)):
        return " ".join(map(str, default)) if isinstance(default, list) else \
            " ".join(f"{k}={v}" for k, v in default.items())
    return str(default)


class Switch(argparse.BooleanOptionalAction):
    """``--x`` / ``--no-x``, whose usage shows the first spelling only (not its aliases)."""

    def format_usage(self):
        return " | ".join(self.option_strings[:2])


def _group_title(base) -> str:
    """A dataclass base's docstring's first line as a help heading."""
    return (base.__doc__ or "").strip().split("\n")[0].rstrip(".:").replace("``", "`")


def add_arguments(parser: argparse.ArgumentParser, cls, positional: tuple[str, ...] = (),
                  required: bool = True) -> None:
    """Add one option per field of ``cls``: help from the field, its default shown;
    fields named in ``positional`` become positional arguments (optional on the command
    line, so that a ``--config`` file can give them). Each option is spelled with dashes,
    underscores and its TRL names (:data:`ALIASES`; ``action.aliases`` are the spellings
    help leaves out). ``required``: fields without a default are required flags (off
    when a ``--config`` file may give them)."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    # fields a dataclass base contributes (e.g. ExecutorOptions) come last, in a group
    # titled by the base's docstring
    inherited = {f.name: base for base in reversed(cls.__mro__[1:])
                 if dataclasses.is_dataclass(base) for f in dataclasses.fields(base)}
    groups: dict = {}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in inherited):
        target = parser
        if f.name in inherited:
            base = inherited[f.name]
            if base not in groups:
                groups[base] = parser.add_argument_group(_group_title(base))
            target = groups[base]
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help", "")
        needed = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if not needed and "(default:" not in help_text:
            help_text += f" (default: {_default_text(f)})"
        origin = typing.get_origin(tp)
        kw = dict(help=help_text.replace("%", "%%"), default=argparse.SUPPRESS)
        if f.name in positional:
            kw["metavar"] = "KEY=VALUE" if f.name == "overrides" else f.name.upper()
            parser.add_argument(f.name, nargs="*" if origin is list else "?", **kw)
            continue
        kw["dest"] = f.name
        flags = flag_spellings(f.name, names)
        if tp is bool:
            action = target.add_argument(*flags, action=Switch, **kw)
        elif origin is list:
            (item,) = typing.get_args(tp)
            if f.name in ESCAPED_OPTIONS:
                item = unescape
                kw["help"] = kw["help"].replace(" (default:", "; on the command line \\n, \\t "
                                                "and \\\\ are escapes (default:", 1)
            action = target.add_argument(*flags, nargs="*", type=item, metavar="X", **kw)
        elif origin is dict:
            action = target.add_argument(*flags, nargs="*", metavar="KEY=VALUE", **kw)
        else:
            if needed:
                kw["help"] = "required. " + kw["help"]
            action = target.add_argument(*flags, type=tp, metavar=f.name.upper(),
                                         required=needed and required, **kw)
        action.aliases = set(action.option_strings[2:] if tp is bool else flags[1:])


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``offline-rlhf train dpo: error:
    ...``), exit status 2, naming each option by its first spelling."""

    def error(self, message):
        message = re.sub(r"(--[\w-]+)(?:/--[\w-]+)+", r"\1", message)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Help that lists each option once: the aliases (underscores, TRL's names) are left
    out (docs/cli.md lists them)."""

    def _format_action_invocation(self, action):
        hidden = getattr(action, "aliases", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [x for x in action.option_strings if x not in hidden]
        return super()._format_action_invocation(action)


def suggest(parser: argparse.ArgumentParser, flag: str) -> str:
    """`` (did you mean --max-steps?)`` for an unknown ``flag``, from ``parser``'s options
    in any of their spellings; empty when none is close."""
    spellings = {}
    for action in parser._actions:
        for s in action.option_strings:
            spellings.setdefault(s.replace("_", "-"), action.option_strings[0])
    name = flag.split("=", 1)[0].replace("_", "-")
    match = difflib.get_close_matches(name, list(spellings), n=1, cutoff=0.6)
    return f" (did you mean {spellings[match[0]]}?)" if match else ""


def from_namespace(cls, ns: argparse.Namespace, base: dict | None = None, where: str = "option"):
    """Build ``cls`` from parsed arguments over ``base`` (e.g. a config file's values);
    ``KEY=VALUE`` lists become dicts. ``where`` names the source in error messages."""
    hints = _hints(cls)
    data = dict(base or {})
    for f in dataclasses.fields(cls):
        if not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is dict and isinstance(value, list):
            value = apply_overrides({}, value)
        data[f.name] = value
    return build(cls, data, where)


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="TOML or YAML file holding any of these options (flags given here "
                        "win) (default: none)")


def check_output(cfg) -> None:
    """Refuse an output (``output`` or ``out``) that is one of the command's inputs, holds
    one, or lies inside one, before any work."""
    out = getattr(cfg, "output", None) or getattr(cfg, "out", None)
    if not out or "://" in str(out):
        return
    target = Path(out).resolve()
    if target.is_file():
        raise InputError(f"output {out}: is an existing file; outputs are directories")
    deletes = getattr(cfg, "overwrite", False)   # then an input inside it would be lost too
    for name in PATH_OPTIONS + ("file", "tokenizer"):
        value = getattr(cfg, name, None)
        if not isinstance(value, str) or "://" in value:
            continue
        src = Path(value).resolve()
        if target == src or src in target.parents or (deletes and target in src.parents):
            raise InputError(f"output {out}: collides with the {name} {value}; write to "
                             "another path")
