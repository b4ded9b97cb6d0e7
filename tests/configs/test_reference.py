"""The README's flag reference is what `--help` offers, flag for flag, and every boolean has one natural pair."""

from __future__ import annotations

import re
from pathlib import Path

from configs.loader import build_parser, load_config
from configs.reference import BEGIN, END, PROGRAMS, flag_reference
from configs.schema import BootstrapOptions

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_reference() -> str:
    text = README.read_text()
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def test_the_readme_holds_the_current_flag_reference():
    assert readme_reference() == flag_reference(), "run: python -m configs.reference --write README.md"


def test_every_flag_of_every_program_is_in_the_reference_and_nothing_else():
    tables = readme_reference().split("#### ")[1:]
    assert [table.split("\n", 1)[0].strip("`") for table in tables] == [program for program, _ in PROGRAMS]
    for (program, schema), table in zip(PROGRAMS, tables):
        offered = {
            flag
            for action in build_parser(schema, program, "")._actions
            for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"
        }
        listed = set(re.findall(r"`(--[a-z0-9-]+)`", table))
        assert offered == listed, program
        assert not any(flag.startswith("--no-no-") for flag in offered), program


def test_a_negative_option_has_its_positive_flag_too():
    parser = build_parser(BootstrapOptions, "python -m bootstrap", "")
    assert load_config(BootstrapOptions, parser, ["--no-bridge"], {}).no_bridge is True
    assert load_config(BootstrapOptions, parser, ["--bridge"], {"SWARM_NO_BRIDGE": "1"}).no_bridge is False
    assert load_config(BootstrapOptions, parser, ["--no-relay"], {}).no_bridge is True  # its earlier name
    assert load_config(BootstrapOptions, parser, [], {}).no_bridge is False
