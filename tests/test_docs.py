"""The README's and docs' promises: every `loqt-ray ...` command line they show parses (its
subcommand's --help answers, its config files and --set keys are valid), and every relative link
resolves, anchors included."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from loqt_ray import cli
from loqt_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files a command line may name that an earlier command writes (an export's output): not checked.
SHIPPED = ("jobs/", "search_spaces/")


def fenced_lines(text: str) -> list[str]:
    """Lines inside ``` blocks, with backslash continuations joined."""
    lines, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return lines


def command_lines(text: str) -> list[tuple[str, str | None]]:
    """Every `loqt-ray ...` invocation shown in a code block (at a line's start, after a `$ `
    prompt or after the `-- ` of `ray job submit`), with the error message the block shows right
    after it, if any (`loqt-ray CMD: error: MESSAGE`)."""
    found = []
    lines = fenced_lines(text)
    for i, line in enumerate(lines):
        at = line.find("loqt-ray ")
        if at < 0 or not (at == 0 or line[:at].rstrip().endswith(("$", "--"))):
            continue
        command = line[at:]
        if command.split()[1].endswith(":"):  # an output line (`loqt-ray train: error: ...`)
            continue
        after = lines[i + 1] if i + 1 < len(lines) else ""
        shown = after.startswith("loqt-ray ") and ": error: " in after
        error = after.split(": error: ", 1)[1] if shown else None
        found.append((command, error))
    return found


def inline_commands(text: str) -> list[str]:
    """`loqt-ray ...` in inline code: prose names a subcommand, or shows a usage synopsis."""
    return re.findall(r"`(loqt-ray [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def argv_of(line: str) -> list[str]:
    tokens = shlex.split(line, comments=True)
    return tokens[1:]


def all_commands() -> list[tuple[str, str, str | None]]:
    return [(doc.name, line, error) for doc in DOCS for line, error in command_lines(doc.read_text())]


def check_command(argv: list[str]) -> None:
    """Parse as the console script would, ask the subcommand for --help, and load what it names."""
    from loqt_ray.sweep_plan import load_sweep

    with pytest.raises(SystemExit) as shown:
        cli.build_parser().parse_args([argv[0], "--help"] if argv[0] != "--help" else argv)
    assert shown.value.code == 0
    if argv[0] == "--help":
        return
    args = cli.build_parser().parse_args(argv)  # SystemExit(2) on a bad flag or subcommand
    config = getattr(args, "config", None) or getattr(args, "sweep_file", None)
    if config is not None and not config.startswith(SHIPPED):
        config = None  # written by an earlier command (an export): only its --set keys are checked
    if argv[0] == "sweep":
        if config is not None:
            load_sweep(config, args.overrides)
        return
    if hasattr(args, "overrides"):
        overrides = cli._memory_overrides(args) if argv[0] == "memory" else args.overrides
        load_config(config, overrides)


@pytest.mark.parametrize(("doc", "line", "error"), all_commands(), ids=lambda v: str(v)[:60])
def test_every_command_line_in_the_docs_parses_and_its_configs_are_valid(
    doc, line, error, monkeypatch, capsys
):
    """A command the docs show with its error message must fail with exactly that message."""
    monkeypatch.chdir(ROOT)
    try:
        check_command(argv_of(line))
    except SystemExit as exc:
        pytest.fail(f"{doc}: `{line}` does not parse: {capsys.readouterr().err.strip()} ({exc})")
    except ConfigError as exc:
        if error is None:
            pytest.fail(f"{doc}: `{line}`: {exc}")
        assert str(exc) == error, f"{doc}: `{line}` fails with another message"
    else:
        assert error is None, f"{doc}: `{line}` is shown failing with {error!r} but is accepted"


def subcommands() -> set[str]:
    return set(cli.build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_subcommand_named_in_prose_exists(doc):
    for span in inline_commands(doc.read_text()):
        words = span.split()[1].split("|") if "|" not in span else span.split()[1:]
        named = [w for w in words if w not in ("|", "...")]
        assert set(named) <= subcommands(), f"{doc.name}: `{span}` names no subcommand"


def test_the_docs_show_commands_of_every_subcommand():
    shown = {argv_of(line)[0] for _, line, _ in all_commands()}
    assert subcommands() <= shown, f"no example of {sorted(subcommands() - shown)}"


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for a markdown file's headings: lower case, punctuation dropped, spaces
    to hyphens."""
    anchors = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def relative_links(doc: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"[a-z]+:", link)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_every_relative_link_resolves(doc):
    for link in relative_links(doc):
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {link} points nowhere"
        if anchor:
            assert anchor in heading_anchors(path), f"{doc.name}: {link} names no heading of {path.name}"


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_the_training_page_lists_every_field_of_every_section():
    """docs/training.md's tables name each section's fields (`loqt-ray config` has their words)."""
    import dataclasses

    from loqt_ray.config import SECTIONS

    text = (ROOT / "docs" / "training.md").read_text()
    for section in ("model", "data", "loqt", "optim", "train", "scale"):
        table = text.split(f"### `{section}`", 1)[1].split("\n#", 1)[0]
        listed = set(re.findall(r"^\| `([a-z_]+)`", table, flags=re.M))
        listed |= {name for cell in re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)+) \|", table, flags=re.M)
                   for name in re.findall(r"`([a-z_]+)`", cell)}  # fmt: skip
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert listed == fields, f"{section}: missing {fields - listed}, unknown {listed - fields}"
