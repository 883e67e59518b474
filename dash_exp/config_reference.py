"""The configuration reference (docs/configuration.md), generated from the structured configs and conf/.

Every knob's meaning is the comment above its field in `dash_exp/config.py`, its default the dataclass's; every
option of a config group is a file `conf/<group>/<option>.yaml`, described by its leading comment and listed with
the keys it sets. A field without a comment is an error, so the page cannot lack a knob nor drift from the code:

    python -m dash_exp.config_reference --out docs/configuration.md    # write it
    python -m dash_exp.config_reference --check docs/configuration.md  # exit 1 if it is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from dash_exp import config as schema
from dash_exp.errors import ConfigError
from dash_exp.mappings import flatten

# the sections of the reference, in order: (key prefix, dataclass, config group whose options set it)
SECTIONS: list[tuple[str, type, str | None]] = [
    ("", schema.Config, None),
    ("algorithm", schema.AlgorithmConfig, "algorithm"),
    ("kl", schema.KLConfig, "kl"),
    ("model", schema.ModelConfig, "model"),
    ("model.tiny", schema.TinyModelConfig, None),
    ("task", schema.TaskConfig, "task"),
    ("rollout", schema.RolloutConfig, "rollout"),
    ("logger", schema.LoggerConfig, "logger"),
]
# groups of conf/ that are not a schema section: the launchers of sweeps, and the sweeps themselves
EXTRA_GROUPS = {"sweep": "one Hydra multirun per study (`+sweep=NAME`; the files live in `sweeps/`)",
                "hydra/launcher": "how a `-m` sweep runs its jobs (`hydra/launcher=NAME`)"}


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment lines directly above it in the class body}, joined into one paragraph."""
    lines, _ = inspect.getsourcelines(cls)
    body = ast.parse(textwrap.dedent("".join(lines))).body[0]
    assert isinstance(body, ast.ClassDef)
    comments: dict[str, str] = {}
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 2  # 0-based index of the line above the field
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        comments[node.target.id] = " ".join(above)
    return comments


def missing_comments() -> list[str]:
    """Dotted keys of every schema field that has no comment above it."""
    return [f"{prefix + '.' if prefix else ''}{name}" for prefix, cls, _ in SECTIONS
            for name, text in field_comments(cls).items() if not text]


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value == "???":
        return "(set by its group)"
    if dataclasses.is_dataclass(value):
        return "(a section)"
    return f"`{_show(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _leading_comment(path: Path) -> str:
    """The file's leading comment block, without `@package` and without the last line when that is the comment of
    the first key (`# kl preset name` above `name: "on"`)."""
    lines = path.read_text().splitlines()
    block = []
    for line in lines:
        if not line.startswith("#"):
            break
        block.append(line.lstrip("#").strip())
    after = lines[len(block)] if len(block) < len(lines) else ""
    if len(block) > 1 and ":" in after and after.split(":", 1)[1].strip() and not after.startswith(("defaults", " ")):
        block.pop()
    return " ".join(text for text in block if not text.startswith("@package"))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _option_rows(conf_dir: Path, group: str) -> list[str]:
    rows, group_dir = [], conf_dir / group
    for path in sorted(group_dir.glob("*.yaml")):
        if path.stem == "common":
            continue
        text = path.read_text()
        data = yaml.safe_load(text) or {}
        data.pop("defaults", None)
        # a file without `@package _global_` sets keys under its group's package (kl/on.yaml: kl.beta)
        package = "" if "@package _global_" in text or group in EXTRA_GROUPS else group.replace("/", ".") + "."
        sets = {k: v for k, v in flatten(data, package).items()
                if not k.endswith(("name", "label")) and not k.startswith("hydra")}
        shown = ", ".join(f"`{k}={_show(v)}`" for k, v in sets.items())
        if len(shown) > 300:
            shown = shown[:300].rsplit(",", 1)[0] + ", ..."
        rows.append(f"| `{path.stem}` | {_cell(_leading_comment(path)) or '-'} | {_cell(shown) or '-'} |")
    return rows


def render(conf_dir: str | Path = schema.CONF_DIR) -> str:
    """The whole reference page as Markdown. Raises ConfigError naming every field without a comment."""
    missing = missing_comments()
    if missing:
        raise ConfigError(f"config fields without a comment in dash_exp/config.py: {', '.join(missing)} "
                          "(every knob needs one: it is its documentation)")
    conf_dir = Path(conf_dir)
    out = ["# Configuration reference", "",
           "<!-- generated by `python -m dash_exp.config_reference --out docs/configuration.md`; do not edit -->", "",
           "Every knob of `python -m dash_exp.run`, with its default and the comment it carries in the schema "
           "(`dash_exp/config.py`), then every option of every config group (`conf/<group>/<option>.yaml`) and the "
           "keys it sets. Pick an option with `group=option` (`algorithm=grpo`), set a knob with `key=value` "
           "(`algorithm.clip_high=0.28`); `python -m dash_exp.run --cfg job ...` prints the composed config. "
           "Every config is validated before any model loads.", ""]
    for prefix, cls, group in SECTIONS:
        title = f"`{prefix}.*`" if prefix else "Top level"
        out += [f"## {title}", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [inspect.cleandoc(cls.__doc__), ""]
        comments = field_comments(cls)
        out += ["| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            out.append(f"| `{key}` | {_cell(_default(f))} | {_cell(comments[f.name])} |")
        out.append("")
        if group:
            out += [f"### Options of `{group}`", "", "| option | what it is | what it sets |", "|---|---|---|",
                    *_option_rows(conf_dir, group), ""]
    for group, what in EXTRA_GROUPS.items():
        out += [f"## `{group}`", "", what[0].upper() + what[1:] + ".", "", "| option | what it is | what it sets |",
                "|---|---|---|", *_option_rows(conf_dir, group), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the page here (default: print it)")
    parser.add_argument("--check", metavar="FILE", help="exit 1 if FILE is not what would be generated")
    args = parser.parse_args(argv)
    try:
        page = render()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.check:
        if Path(args.check).read_text() != page:
            print(f"{args.check} is stale: run `python -m dash_exp.config_reference --out {args.check}`",
                  file=sys.stderr)
            return 1
        return 0
    if args.out:
        Path(args.out).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
