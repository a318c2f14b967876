"""The docs: their generated blocks are what the code writes now (tools/gen_docs.py), the
command-line reference names what ``--help`` names, and the README stays a front door whose
links and commands work."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from ummae.cli import COMMANDS, _command_in, _parser, main

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(_spec)
sys.modules["gen_docs"] = gen_docs
_spec.loader.exec_module(gen_docs)


def _block(page: Path, name: str) -> str:
    """The text between a page's markers of block ``name``, found here with a pattern of its own."""
    m = re.search(rf"<!-- {name}: begin.*?-->\n(.*?)<!-- {name}: end -->", page.read_text(), re.S)
    assert m, f"{page.name} has no {name} block"
    return m.group(1)


def test_docs__every_generated_block_is_current():
    """What `python tools/gen_docs.py --check` (and .ci/run, through this test) checks."""
    assert gen_docs.stale_blocks() == []


def _site(tmp_path: Path, body: str) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("# readme\n")
    (tmp_path / "docs" / "page.md").write_text(body)
    return tmp_path


def test_gen_docs__check_names_the_stale_block_and_write_mends_only_it(tmp_path):
    page = "intro\n<!-- a: begin (generated) -->\nold table\n<!-- a: end -->\nmiddle\n<!-- b: begin -->\nB\n<!-- b: end -->\nend\n"
    root = _site(tmp_path, page)
    blocks = {"a": lambda: "new table", "b": lambda: "B"}
    assert gen_docs.stale_blocks(root, blocks) == ["docs/page.md: block 'a' is stale"]
    written, problems = gen_docs.write_blocks(root, blocks)
    assert written == [root / "docs" / "page.md"] and problems == []
    assert (root / "docs" / "page.md").read_text() == page.replace("old table", "new table")
    assert gen_docs.stale_blocks(root, blocks) == []
    assert gen_docs.write_blocks(root, blocks) == ([], [])  # nothing left to write


def test_gen_docs__an_empty_block_is_filled(tmp_path):
    root = _site(tmp_path, "<!-- a: begin -->\n<!-- a: end -->\n")
    assert gen_docs.stale_blocks(root, {"a": lambda: "| x |"}) == ["docs/page.md: block 'a' is stale"]
    gen_docs.write_blocks(root, {"a": lambda: "| x |"})
    assert (root / "docs" / "page.md").read_text() == "<!-- a: begin -->\n| x |\n<!-- a: end -->\n"


def test_gen_docs__unknown_marker_and_unplaced_block_fail_the_check(tmp_path, capsys):
    root = _site(tmp_path, "<!-- nosuch: begin -->\nx\n<!-- nosuch: end -->\n")
    problems = gen_docs.stale_blocks(root, {"a": lambda: "A"})
    assert problems == [
        "docs/page.md: no generator for block 'nosuch' (tools/gen_docs.py BLOCKS)",
        "block 'a' is in no page (add its markers to one)",
    ]
    assert gen_docs.main(["--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "'nosuch'" in err and "block 'recipes' is in no page" in err


def _help_options(argv: list[str], capsys) -> set[str]:
    """The options `ummae ... --help` lists, read from the text it prints."""
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    return {opt for line in text.splitlines() for opt in re.findall(r"^ {2}(-[-\w]+(?:, -[-\w]+)*)", line)
            for opt in opt.split(", ")} - {"-h", "--help"}  # fmt: skip


def test_cli_reference__lists_every_option_that_help_lists(capsys):
    reference = _block(ROOT / "docs" / "cli.md", "cli")
    sections = dict(re.findall(r"### `ummae ([\w ]+)`\n\n(.*?)(?=\n### |\Z)", reference, re.S))
    assert list(sections) == list(COMMANDS)
    for name, spec in COMMANDS.items():
        assert sections[name].startswith(spec.help + "\n"), name
        documented = set(re.findall(r"`(-[-\w]+)`", "\n".join(r.split(" | ")[0] for r in sections[name].splitlines())))
        assert documented == _help_options(name.split(), capsys), name


def test_models_page__lists_every_registered_name():
    from ummae.models.registry import list_models  # torch: this test only

    listed = set(re.findall(r"^\| `(\w+)` \|", _block(ROOT / "docs" / "models.md", "models"), re.M))
    assert listed == set(list_models())  # the whole models; the heads have their task pages


def test_readme__is_a_front_door_whose_links_and_commands_hold():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    # the two commands of the quick start; .ci/run runs the second
    assert "pip install -c constraints.txt -e . && ummae pretrain --config demo" in readme
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest -q -n 2' in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -c constraints.txt -e ".[test]"' in ci and "step python -m pytest -q -n 2\n" in ci
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://", "../"))]  # ../shared: beside the repo
    assert local and [t for t in local if not (ROOT / t).exists()] == []
    linked = {t for t in local if t.startswith("docs/") and t.endswith(".md")}
    assert linked == {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}  # every page has its link


def _readme_command_lines() -> list[list[str]]:
    """The arguments of every `ummae ...` (or `... -m ummae ...`) line of the README's bash
    blocks: continuations joined, comments, `...` and the brackets of optional parts dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = [w.strip("[]") for w in shlex.split(line.split(" #")[0]) if w != "..."]
            if "ummae" in words:
                lines.append(words[words.index("ummae") + 1 :])
    return lines


def test_readme__every_example_command_parses():
    """Each example names a command and only flags it has (a renamed flag breaks this test)."""
    commands = _readme_command_lines()
    assert len(commands) >= 15
    for argv in commands:
        _, unknown = _parser(_command_in(argv)).parse_known_args(argv)
        assert unknown == [], (argv, unknown)
