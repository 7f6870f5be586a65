"""The command-line language of `lmcoh` and the recipes: one spelling per flag, one-line errors.

Every long flag is spelled with underscores, the way TRL and transformers spell theirs
(``--learning_rate``, ``--output_dir``), and ``--help`` shows that spelling only. Whichever way
a flag is declared, it also answers to its dashed spelling (``--learning-rate``), as
transformers' ``HfArgumentParser`` does for the recipes, and to the older spellings given as
``aliases=``: those stay hidden. A boolean reads as in the recipes: ``--overwrite`` alone, or
``--overwrite true`` / ``--overwrite false``.

A usage error is one line, ``lmcoh: error: MESSAGE (see lmcoh CMD --help)``; a misspelled flag
or choice is answered with the closest one. Options declared before the subcommands (the
global ones) are accepted after the subcommand too.

How a subcommand declares its flags (in `lmcoh.cli.build_parser`): the one spelling first, with
underscores (a recipe's field name, or TRL's, when the concept is theirs too), and any spelling
that worked before in ``aliases``::

    p = sub.add_parser("name", help="...")
    p.add_argument("--some_setting", type=int, default=3, aliases=("--old-name", "-s"), help="...")
    p.add_argument("--overwrite", action="store_true", help="...")   # a Bool
    p.add_argument("--task", required=True, positional_alias=True)  # `lmcoh name TASK` works too
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys

TRUE, FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")


def to_bool(text: str) -> bool:
    """A boolean flag's value, read as transformers reads one."""
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def spellings(option: str) -> list[str]:
    """A long option's one spelling (underscores) first, then its dashed twin (if different)."""
    if not option.startswith("--"):
        return [option]
    underscored = "--" + option[2:].replace("-", "_")
    return list(dict.fromkeys([underscored, "--" + option[2:].replace("_", "-")]))


class Bool(argparse.Action):
    """``--flag`` (true), ``--flag true`` or ``--flag false``."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs="?", const=True, default=default, type=to_bool,
                         required=required, help=help, metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class OneSpelling(argparse.HelpFormatter):
    """Help that lists each flag under its first spelling only (the others are aliases)."""

    def _format_action_invocation(self, action):
        if len(action.option_strings) > 1 and not isinstance(action, argparse._HelpAction):
            action = copy.copy(action)
            action.option_strings = action.option_strings[:1]
        return super()._format_action_invocation(action)


def one_line_name(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` with argparse's ``--a/--b/--c`` names of a flag cut to its one spelling."""
    for action in parser._actions:
        if len(action.option_strings) > 1:
            message = message.replace("/".join(action.option_strings), action.option_strings[0])
    return message


def closest(name: str, options, quote: bool = False) -> str:
    """``"; did you mean X?"`` for the option closest to ``name`` (``'X'`` with ``quote``), or ``""``."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close and quote else f"; did you mean {close[0]}?" if close else ""


class Suggestions(argparse.ArgumentParser):
    """A parser whose refusal of a choice names the closest one (`lmcoh` and the recipes)."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice {value!r} (choose from {choices})"
                                                 f"{closest(str(value), map(str, action.choices))}")


class Parser(Suggestions):
    """An `argparse.ArgumentParser` speaking lmcoh's command-line language (see the module)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", OneSpelling)
        super().__init__(*args, **kwargs)
        self._positional_alias: argparse.Action | None = None

    def add_argument(self, *names, aliases=(), positional_alias: bool = False, **kwargs):
        """`argparse` ``add_argument`` with lmcoh's spellings: ``--a-b`` and ``--a_b`` both, the
        underscored one shown; ``aliases`` hidden; ``action="store_true"`` a `Bool`.
        ``positional_alias``: the value may also be given as the first positional argument
        (a spelling older scripts use; never shown)."""
        if not names or not names[0].startswith("-"):
            return super().add_argument(*names, **kwargs)
        options = [s for name in names for s in spellings(name)]
        options = list(dict.fromkeys(options + [s for name in aliases for s in spellings(name)]))
        if kwargs.get("action") == "store_true":
            kwargs["action"] = Bool
        action = super().add_argument(*options, **kwargs)
        if positional_alias:
            self._positional_alias = action
        return action

    def add_subparsers(self, **kwargs):
        """Subcommands whose parsers also take this parser's options declared so far (the global ones)."""
        commands = super().add_subparsers(action=_Commands, **kwargs)
        commands.inherited = [a for a in self._actions if a.option_strings and a.default is not argparse.SUPPRESS]
        return commands

    def parse_known_args(self, args=None, namespace=None):
        args = self._attach_bool_values(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(self._lift_positional(args), namespace)

    def parse_args(self, args=None, namespace=None):
        """Parse; an unknown flag is one line naming the closest flag of the command it follows."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(namespace)
            name = extras[0].split("=", 1)[0]
            if not name.startswith("-"):
                parser.error(f"unexpected argument {extras[0]!r}")
            options = [o for a in parser._actions if a.help is not argparse.SUPPRESS for o in a.option_strings]
            parser.error(f"unknown flag {name}{closest(name, options)}")
        return namespace

    def _command_parser(self, namespace) -> "Parser":
        """The innermost subcommand's parser that ``namespace`` chose (this one if none)."""
        for action in self._actions:
            if isinstance(action, _Commands) and getattr(namespace, action.dest, None) in action.choices:
                return action.choices[getattr(namespace, action.dest)]._command_parser(namespace)
        return self

    def _attach_bool_values(self, args: list[str]) -> list[str]:
        """``--flag`` -> ``--flag=true`` and ``--flag VALUE`` -> ``--flag=VALUE`` for this parser's
        `Bool` flags, so that a bare boolean never takes the next argument as its value."""
        flags = {s for a in self._actions if isinstance(a, Bool) for s in a.option_strings}
        out, i = [], 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                out.extend(args[i:])
                break
            if arg in flags:
                value = args[i + 1] if i + 1 < len(args) else None
                if value is not None and value.lower() in TRUE + FALSE:
                    out.append(f"{arg}={value}")
                    i += 2
                    continue
                arg = f"{arg}=true"
            out.append(arg)
            i += 1
        return out

    def _lift_positional(self, args: list[str]) -> list[str]:
        """The first positional argument as the value of the ``positional_alias`` flag
        (``lmcoh exact mountain_race`` reads as ``lmcoh exact --task mountain_race``)."""
        if self._positional_alias is None:
            return args
        takes = {s: a.nargs for a in self._actions for s in a.option_strings}
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                break
            if not arg.startswith("-"):
                return args[:i] + [self._positional_alias.option_strings[0], arg] + args[i + 1:]
            nargs = 0 if "=" in arg else takes.get(arg, 0)
            i += 1
            if nargs is None:
                i += 1
            elif nargs in ("+", "*"):
                while i < len(args) and not args[i].startswith("-"):
                    i += 1
        return args

    def error(self, message: str):
        """One line, ``ROOT: error: MESSAGE (see PROG --help)``, and exit status 2."""
        root = self.prog.split()[0]
        self.exit(2, f"{root}: error: {one_line_name(self, message)} (see {self.prog} --help)\n")


class _Commands(argparse._SubParsersAction):
    """Subcommands; each new one's parser gets the global options too (defaults left to the top)."""

    inherited: list[argparse.Action] = []

    def add_parser(self, name, **kwargs):
        parser = super().add_parser(name, **kwargs)
        for action in self.inherited:
            inherited = copy.copy(action)
            inherited.default = argparse.SUPPRESS
            parser._add_action(inherited)
        return parser
