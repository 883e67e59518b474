"""docs/configuration.md is generated from the schema: it lists every knob with its comment and default, a knob
without a comment fails, and the committed page is current."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
from conftest import REPO

from dash_exp import config as schema
from dash_exp import config_reference as ref
from dash_exp.errors import ConfigError

pytestmark = pytest.mark.unit


def test_the_committed_page_is_what_the_schema_generates():
    assert ref.main(["--check", str(REPO / "docs" / "configuration.md")]) == 0, (
        "docs/configuration.md is stale: python -m dash_exp.config_reference --out docs/configuration.md")


def test_every_field_of_every_section_is_on_the_page_with_its_default_and_comment():
    page = ref.render()
    for prefix, cls, _ in ref.SECTIONS:
        comments = ref.field_comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
            assert row is not None, key
            assert comments[f.name] and comments[f.name].replace("|", "\\|") in row, key
    # defaults as the schema holds them, options as conf/ holds them
    assert "| `algorithm.clip_high` | `0.2` |" in page and "| `kl.estimator` | `k3` |" in page
    assert "| `logger.entity` | `null` |" in page and "| `tune` | `off` |" in page
    for option in ("dash", "grpo", "ppo_mini", "rloo", "gspo", "dapo"):
        assert f"| `{option}` |" in page, option
    assert "`kl.beta=0.04`" in page  # kl/on.yaml sets keys under its group's package
    assert "`algorithm.ppo_minibatches=32`" in page  # ppo_mini.yaml is @package _global_


def test_a_field_without_a_comment_fails_naming_it(tmp_path, monkeypatch, capsys):
    source = tmp_path / "schema_with_a_new_knob.py"
    source.write_text(
        "from dataclasses import dataclass\n\n\n"
        "@dataclass\nclass NewConfig:\n"
        "    # documented: what it does\n    documented: int = 1\n"
        "    undocumented: float = 0.5\n")
    spec = importlib.util.spec_from_file_location("schema_with_a_new_knob", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "schema_with_a_new_knob", module)
    spec.loader.exec_module(module)
    assert ref.field_comments(module.NewConfig) == {"documented": "documented: what it does", "undocumented": ""}
    monkeypatch.setattr(ref, "SECTIONS", [*ref.SECTIONS, ("new", module.NewConfig, None)])
    assert ref.missing_comments() == ["new.undocumented"]
    with pytest.raises(ConfigError, match=r"new\.undocumented"):
        ref.render()
    assert ref.main(["--check", str(REPO / "docs" / "configuration.md")]) == 2
    assert "new.undocumented" in capsys.readouterr().err


def test_the_reference_covers_the_whole_schema():
    """A section added to the schema (a new dataclass in dash_exp/config.py) must get its place on the page."""
    covered = {cls for _, cls, _ in ref.SECTIONS}
    schema_classes = {obj for obj in vars(schema).values() if dataclasses.is_dataclass(obj) and isinstance(obj, type)}
    assert schema_classes == covered, schema_classes ^ covered
