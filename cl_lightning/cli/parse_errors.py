"""One-line answers to the argument mistakes that jsonargparse explains in 10 to 20 lines of its own
workings (every type of a union it tried, ``NestedArg(key='lr', val='-1')``, the base class it fell
back to): an unknown class names the valid ones and the closest, a refused value of a class's option
names the option, the value and what is allowed, a misspelled option or command suggests the closest
valid one. A message of another shape is left as jsonargparse wrote it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable
from typing import Any, NoReturn

from jsonargparse import ActionSubCommands
from lightning.pytorch.cli import LightningArgumentParser
from typing_extensions import override

from cl_lightning.cli.console import COMMANDS
from cl_lightning.cli.console import unknown_command as unknown_command_refusal
from cl_lightning.methods.registry import registered_methods

#: The method callbacks' short names, which ``--trainer.callbacks+=<name>`` and a config's ``class_path`` accept
#: (finding them imports every method, which registers the short names with jsonargparse).
METHOD_NAMES = tuple(method.__name__ for method in registered_methods())
#: Where the methods go: an unknown class there is most likely a misspelled method.
CALLBACKS_KEY = "trainer.callbacks"


class ContinualArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose refusals of the user's arguments are one line (:func:`one_line`)
    and whose tip names the command's help (``cl-lightning fit --help``)."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        # A parser that raises instead of exiting (jsonargparse's own, for a class's arguments) keeps the
        # whole story: its caller folds it into the message that reaches the user, rewritten here.
        if self.exit_on_error:
            parser = getattr(ex, "subcommand_parser", None) or self
            message = one_line(message, option_names(parser)) or message
        super().error(message, ex)

    @override
    def add_subcommands(self, required: bool = True, dest: str = "subcommand", **kwargs: Any) -> ActionSubCommands:
        # argparse names a subcommand's parser after its parent's usage line, here ours with every command
        # listed: the error tip read `cl-lightning <command> [options] (commands: fit, ...) fit --help`.
        return super().add_subcommands(required=required, dest=dest, **{"prog": self.prog, **kwargs})


def option_names(parser: argparse.ArgumentParser) -> set[str]:
    """The long options of ``parser`` and of its subcommands' parsers, linked settings included (their
    action is named ``compute_fn(sources) --> target``): ``--trainer.max_epoch`` is closest to the linked
    ``--trainer.max_epochs``, whose refusal says how to set it, not to ``--trainer.min_epochs``."""
    names = set()
    for action in parser._actions:
        names.update(name if name.startswith("--") else f"--{name.rpartition(' --> ')[2]}"
                     for name in action.option_strings if name.startswith("--") or " --> " in name)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names |= option_names(subparser)
    return names


def one_line(message: str, options: Iterable[str]) -> str | None:
    """jsonargparse's ``message`` in one line, or None if it has no known shape."""
    return (unknown_class(message) or class_option(message) or misspelled_option(message, options)
            or linked_setting(message) or unknown_command(message))


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to ``name`` (case aside), if one is near enough to be a typo of it."""
    by_lower = {choice.lower(): choice for choice in choices}
    found = difflib.get_close_matches(name.lower(), by_lower, n=1)
    return by_lower[found[0]] if found else None


def suggestion(name: str, choices: Iterable[str]) -> str:
    best = closest(name, choices)
    return f" (did you mean {best}?)" if best else ""


def unknown_class(message: str) -> str | None:
    """A class name that does not resolve (``--trainer.callbacks+=MCSDG``, a ``class_path`` typo)."""
    name = re.search(r"Expected a dot import path string: (\S+)"
                     r"|Problem with given class_path '([^']+)':\s*\n\s*(?:module '[^']*' has no attribute|No module named)",
                     message)
    key = re.match(r'Parser key "([^"]+)":|--(\S+)\.help:', message)
    if not name or not key:
        return None
    name, key = name.group(1) or name.group(2), key.group(1) or key.group(2)
    if key == CALLBACKS_KEY:
        known = METHOD_NAMES
        valid = f"the methods: {', '.join(known)} (any other callback by its import path)"
    else:
        subtypes = re.search(r"Subtypes: (\[.*\])", message)
        known = tuple(type_name(subtype) for subtype in split_types(subtypes.group(1))) if subtypes else ()
        valid = f"one of {', '.join(known)}" if known else "a class by its import path"
    return f"{key}: unknown class '{name}'{suggestion(name.rsplit('.', 1)[-1], known)}; {valid}"


def class_option(message: str) -> str | None:
    """A class's option that does not exist or refused its value, e.g. ``--trainer.callbacks.init_args.lr -1``."""
    key = re.match(r'Parser key "([^"]+)":', message)
    lines = message.splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(r"\s*- Problem with given class_path '[^']+':", line)), None)
    if not key or start is None or start + 1 >= len(lines):
        return None
    class_path = re.search(r"'([^']+)'", lines[start]).group(1)
    owner = class_path.rsplit(".", 1)[-1]
    first = lines[start + 1].strip()
    unknown = re.fullmatch(r"Option '(\w+)' is not accepted", first)
    if unknown:
        name = unknown.group(1)
        return (f"--{key.group(1)}.init_args.{name}: {owner} has no option '{name}'{suggestion(name, init_parameters(class_path))}"
                f"; --{key.group(1)}.help {owner} lists them")
    refused = re.fullmatch(r'Parser key "(\w+)":\s*(.*)', first)
    if not refused:
        return None
    name, block = refused.group(1), [refused.group(2), *indented_block(lines, start + 1)]
    value, allowed = refused_value(block)
    return f"--{key.group(1)}.init_args.{name}{f' {value}' if value else ''} refused: {owner}'s {name} takes {allowed}"


def indented_block(lines: list[str], head: int) -> list[str]:
    """The stripped lines after ``lines[head]`` that are indented deeper than it."""
    depth = len(lines[head]) - len(lines[head].lstrip())
    block = []
    for line in lines[head + 1:]:
        if len(line) - len(line.lstrip()) <= depth:
            break
        block.append(line.strip())
    return block


def refused_value(block: list[str]) -> tuple[str | None, str]:
    """The value and what is allowed, read from jsonargparse's explanation of one refused option."""
    text = "\n".join(block)
    restrictions = dict(re.findall(r"Not of type (\w+): .*?restriction (\S+)", text))
    value = re.search(r"Given value: (.*)|Got value: (.*)|Not of type \w+: (\S+) does not conform", text)
    subtypes = re.search(r"Subtypes: (\[.*\])", text)
    expected = re.search(r"Expected an? (.+?)\. Got value|Not of type (\w+)", text)
    if subtypes:
        types = split_types(subtypes.group(1))
    elif expected:
        types = [expected.group(1) or expected.group(2)]
    else:
        types = [text.replace("\n", " ")]
    allowed = " or ".join(f"{name} ({restrictions[name]})" if name in restrictions else name for name in map(type_name, types))
    return (next(group for group in value.groups() if group) if value else None), allowed


def split_types(listed: str) -> list[str]:
    """``[A, list[B], Literal['x', 'y']]`` -> its top-level items."""
    items, depth, current = [], 0, ""
    for char in listed.strip()[1:-1]:
        depth += (char in "[(") - (char in "])")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    return [*items, current.strip()] if current.strip() else items


def type_name(text: str) -> str:
    """A type as the user would write it: ``<class 'jsonargparse.typing.PositiveFloat'>`` -> ``PositiveFloat``,
    ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``, ``NoneType`` -> ``null``."""
    text = re.sub(r"<class '([^']+)'>", r"\1", text)
    text = re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text.replace("NoneType", "null")


def init_parameters(class_path: str) -> list[str]:
    """The constructor's parameter names of the class at ``class_path`` (none if it does not import)."""
    module, _, name = class_path.rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def misspelled_option(message: str, options: Iterable[str]) -> str | None:
    """An option that no command has (``--data.num_task 5``, or ``data: {num_task: 5}`` in a config),
    with the closest that exists."""
    given = re.match(r"unrecognized arguments: (--[^\s=]+)", message)
    if given:
        return f"{message}{suggestion(given.group(1), options)}"
    given = re.match(r"Subcommand '\w+' does not accept option '([^']+)'", message)
    if given:
        best = closest(given.group(1), (option.removeprefix("--") for option in options))
        return f"{message}{f' (did you mean {best!r}?)' if best else ''}"
    return None


def linked_setting(message: str) -> str | None:
    """A setting that follows from others (``--trainer.max_epochs``): jsonargparse says its value is invalid."""
    link = re.match(r"argument (\w+)\(([^)]*)\) --> ([\w.]+): ", message)
    if not link:
        return None
    function, sources, target = link.groups()
    return f"{target} follows from {sources} ({function}) and cannot be set: set {' and '.join(sources.split(', '))} instead"


def unknown_command(message: str) -> str | None:
    """No command or an unknown one: LightningCLI's parser would name only its own three."""
    if re.match(r'expected "subcommand" to be one of', message):
        return f"no command given: cl-lightning <command> ..., command one of {', '.join(COMMANDS)}"
    given = re.match(r"argument subcommand: invalid choice: '([^']*)'", message)
    return unknown_command_refusal(given.group(1)) if given else None
