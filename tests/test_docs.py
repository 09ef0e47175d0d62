"""The docs against the code: every `branchline ...` line in the shell
examples of docs/cli.md and docs/operations.md parses as the CLI defines
it (command names, options, arguments); every command has a section in
docs/cli.md naming each of its options; the README's Python example runs
and prints what its comment says."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from engine.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "docs" / "cli.md", ROOT / "docs" / "operations.md"]
FENCE = re.compile(r"^```(?:sh|bash|console)\n(.*?)^```", re.M | re.S)


def examples(path: Path) -> Iterator[str]:
    """The `branchline` command lines of a doc's shell blocks, joined over
    trailing backslashes, without a prompt or a trailing comment."""
    for block in FENCE.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("branchline "):
                yield line


def leaf(args: list[str]) -> tuple[list[str], click.Command, list[str]]:
    """(command path, command, its own arguments) of ``branchline ARGS``."""
    cmd: click.Command = cli
    path: list[str] = []
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        sub = cmd.get_command(click.Context(cmd), args[0])
        assert sub is not None, f"no command {' '.join([*path, args[0]])!r}"
        path.append(args[0])
        cmd, args = sub, args[1:]
    return path, cmd, args


def documented() -> list[tuple[str, str]]:
    return [(p.name, line) for p in DOCS for line in examples(p)]


@pytest.mark.parametrize(("doc", "line"), documented())
def test_every_documented_command_parses(doc: str, line: str) -> None:
    # A synopsis line shows alternatives ([...], a|b): checked as the headings are.
    if re.search(r"\[|\]| \| ", line):
        pytest.skip("a synopsis, not a command")
    args = shlex.split(line, comments=True)[1:]
    path, cmd, rest = leaf(args)
    try:
        cmd.make_context(" ".join(["branchline", *path]), rest)
    except click.BadParameter as exc:
        # Files of the example's machine (a certificate, a schema) are not here.
        if "does not exist" not in str(exc):
            raise AssertionError(f"{doc}: {line}: {exc.format_message()}") from None
    except click.UsageError as exc:
        raise AssertionError(f"{doc}: {line}: {exc.format_message()}") from None


def commands(group: click.Group, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from commands(cmd, [*path, name])
        else:
            yield [*path, name], cmd


def sections() -> dict[str, str]:
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    return {s.split("\n", 1)[0]: s for s in re.split(r"^### ", text, flags=re.M)[1:]}


def section_of(path: list[str], heads: dict[str, str]) -> str:
    """The cli.md sections whose heading names this command (``a|b``
    alternatives and ``x / y`` headings included)."""
    *group, name = path
    lead = r"\s+".join(map(re.escape, ["branchline", *group]))
    pattern = re.compile(rf"`{lead}\s+(?:[\w-]+\|)*{re.escape(name)}(?:\|[\w-]+)*[\s`]")
    return "\n".join(body for head, body in heads.items() if pattern.search(head))


@pytest.mark.parametrize(
    ("path", "cmd"),
    list(commands(cli, [])),
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_every_command_and_option_is_documented(path: list[str], cmd: click.Command) -> None:
    body = section_of(path, sections())
    assert body, f"docs/cli.md has no section for 'branchline {' '.join(path)}'"
    missing = [
        p.opts[0]
        for p in cmd.params
        if isinstance(p, click.Option) and not any(o in body for o in p.opts)
    ]
    assert not missing, f"'branchline {' '.join(path)}': {missing} not in docs/cli.md"


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"^```python\n(.*?)^```", readme, re.M | re.S)
    expected = re.search(r"print\(.*\)\s+#\s*(\S+)", code)
    assert expected is not None, "the README example says what it prints"
    code = code.replace('"/tmp/hcm"', repr(str(tmp_path / "hcm")))
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert out.getvalue().split() == [expected[1]]
