import textwrap

import pytest

from ratatouille.core.config import ConfigError, load_config, parse_config

MINIMAL = {"name": "exp", "data": {"dataset": "digits"}, "aux": {"tasks": ["digits_aux_a"]}}


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_minimal_config_fills_paper_defaults():
    config = parse_config(MINIMAL)
    assert config.target.n_runs == 20
    assert config.target.lp_steps == 200
    assert config.target.fusing_spread == 4.0
    assert config.target.hparams == "mild"
    assert config.model.freeze_bn is True
    assert config.probe.lr == 5e-5


def test_unknown_key_names_its_path(tmp_path):
    path = _write(
        tmp_path,
        """
        name: exp
        data: {dataset: digits}
        aux: {tasks: [digits_aux_a]}
        target: {n_run: 3}
    """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "target.n_run" in message and "unknown key" in message
    assert str(path) in message


def test_wrong_type_names_field():
    raw = {**MINIMAL, "target": {"n_runs": "many"}}
    with pytest.raises(ConfigError, match=r"target\.n_runs: Input should be a valid integer"):
        parse_config(raw)


def test_missing_required_field_names_it():
    with pytest.raises(ConfigError, match=r"data\.dataset: Field required"):
        parse_config({"name": "exp", "data": {}})


def test_out_of_range_value_names_field():
    raw = {**MINIMAL, "data": {"dataset": "digits", "holdout_fraction": 1.5}}
    with pytest.raises(ConfigError, match=r"data\.holdout_fraction: Input should be less than 1"):
        parse_config(raw)


def test_every_problem_reported_in_one_error():
    raw = {**MINIMAL, "target": {"n_runs": 0, "lp_steps": -1}}
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert "target.n_runs" in str(info.value) and "target.lp_steps" in str(info.value)


def test_target_dataset_cannot_be_its_own_auxiliary_task():
    raw = {**MINIMAL, "aux": {"tasks": ["digits"]}}
    with pytest.raises(ConfigError, match="leak"):
        parse_config(raw)


def test_pretrain_init_requires_pretrain_section():
    raw = {**MINIMAL, "model": {"arch": "test_resnet", "init": "pretrain"}}
    with pytest.raises(ConfigError, match="no pretrain section"):
        parse_config(raw)


def test_file_init_requires_weights_file():
    raw = {**MINIMAL, "model": {"init": "file"}}
    with pytest.raises(ConfigError, match="model: .*weights_file"):
        parse_config(raw)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed\n"))
