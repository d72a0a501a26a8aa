"""configs/reference.yaml: every field documented, equal to what the code generates, loading to the defaults."""

from __future__ import annotations

from pathlib import Path

import yaml

from orchestration.cli import main
from orchestration.config import RunConfig, load_config
from orchestration.config_reference import fields_of, is_section, reference_yaml

REFERENCE = Path(__file__).resolve().parents[2] / "configs" / "reference.yaml"


def test_the_committed_reference_is_the_generated_one(capsys):
    assert main(["reference-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == reference_yaml()
    assert REFERENCE.read_text() == printed, "stale: rwkv-pipeline reference-config > configs/reference.yaml"


def test_the_reference_loads_to_the_defaults():
    assert load_config(REFERENCE).model_dump() == load_config(None).model_dump()


def test_the_reference_keeps_declared_defaults_not_resolved_ones():
    # 0 means "follow n_embd": a reference that pinned the resolved 128 would break a copy that changes n_embd.
    tree = yaml.safe_load(REFERENCE.read_text())
    assert tree["model"]["dim_att"] == 0 and tree["model"]["dim_ffn"] == 0


def test_every_field_of_every_section_has_a_description():
    undocumented = []

    def walk(cls: type, prefix: str) -> None:
        for name, annotation, _, description in fields_of(cls):
            if is_section(annotation):
                walk(annotation, f"{prefix}{name}.")
            elif not description:
                undocumented.append(prefix + name)

    walk(RunConfig, "")
    assert undocumented == []
