"""Config tree: YAML + dotted overrides, unknown keys and bad values named with their source."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def test_overrides_apply_on_top_of_yaml(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  n_layer: 3\ntrain:\n  lr_init: 1.0e-3\n")
    config = load_config(path, ["train.lr_init=3e-4", "model.n_embd=64"])
    assert config.train.lr_init == pytest.approx(3e-4)
    assert config.model.n_layer == 3 and config.model.n_embd == 64
    assert config.model.dim_ffn == 256  # derived default: 4 * n_embd


def test_unknown_key_names_field_and_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lr_inti: 1.0e-3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "train.lr_inti" in str(caught.value) and str(path) in str(caught.value)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr_init: [1.0e-3\n  steps: 10\n")
    with pytest.raises(ConfigError, match=rf'(?s){path}: not valid YAML: .*in "{path}", line \d+'):
        load_config(path)


def test_one_corpus_path_may_be_given_alone() -> None:
    assert load_config(None, ["data.paths=/data/corpus"]).data.paths == ["/data/corpus"]


def test_a_path_ending_in_a_colon_stays_a_path() -> None:
    assert load_config(None, ["data.paths=stdlib:"]).data.paths == ["stdlib:"]  # YAML alone reads {stdlib: None}


def test_an_item_of_a_list_the_config_holds_is_overridden_by_index_and_a_missing_one_is_named(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  ctx_len: 128\nextend:\n  - ctx_len: 256\n    steps: 10\n")
    assert load_config(path, ["extend.0.steps=20"]).extend[0].steps == 20
    for missing in ("extend.1.steps=5", "extend.x.steps=5"):
        with pytest.raises(ConfigError, match=r"extend holds 1 item\(s\), so there is no item .* extend=\[\{ctx_len"):
            load_config(path, [missing])
    with pytest.raises(ConfigError, match="extend holds 0 item"):  # no extend list at all: not a mapping
        load_config(None, ["extend.0.ctx_len=256"])


def test_bad_value_names_field() -> None:
    with pytest.raises(ConfigError, match=r"train\.micro_bsz"):
        load_config(None, ["train.micro_bsz=zero"])


def test_section_check_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="n_head"):
        load_config(None, ["model.arch=gpt", "model.n_embd=100", "model.n_head=3"])


def test_offload_at_zero_stage_0_is_rejected_naming_both_fields() -> None:
    # DeepSpeed would ignore it there, and on the CPU it would still change which optimizer it builds.
    with pytest.raises(ConfigError, match=r"train\.offload: train\.offload=true needs train\.zero_stage >= 1"):
        load_config(None, ["train.offload=true", "train.zero_stage=0"])
    assert load_config(None, ["train.offload=true", "train.zero_stage=1"]).train.offload
    assert not load_config(None, ["train.offload=false", "train.zero_stage=0"]).train.offload


def test_cli_print_config_and_error_exit() -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.cli",
            "print-config",
            str(REPO / "configs/quickstart.yaml"),
            "train.lr_init=0.002",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert ok.returncode == 0 and "lr_init: 0.002" in ok.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestration.cli",
            "print-config",
            str(REPO / "configs/quickstart.yaml"),
            "modle.n_layer=2",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "modle" in bad.stderr and "quickstart.yaml" in bad.stderr
    assert "Traceback" not in bad.stderr


# reference.yaml holds the defaults, which name no corpus (tests/unit/test_config_reference.py loads it).
RUNNABLE_CONFIGS = sorted(path for path in (REPO / "configs").glob("*.yaml") if path.name != "reference.yaml")


@pytest.mark.parametrize("path", RUNNABLE_CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads_and_plans(path: Path) -> None:
    from orchestration.stages import build_stages

    config = load_config(path)
    assert [stage.name for stage in build_stages(config)][:3] == ["tokenizer", "tokenize", "pretrain"]
