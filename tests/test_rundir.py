"""dppo.rundir: the run directory's files as plain JSON, for the reports (no TrainConfig needed)."""

import json

from dppo.methods import get_method, method_from_dict
from dppo.run.config import make_config, save_config
from dppo.rundir import read_config_json, read_method_json, run_title, write_method_json


def test_title_from_a_saved_config(tmp_path):
    save_config(make_config(method="cispo", seed=3, out=str(tmp_path)), str(tmp_path / "config.json"))
    assert read_config_json(str(tmp_path))["method"]["name"] == "cispo"
    assert run_title(str(tmp_path)) == "cispo · arithmetic · tiny qwen3 · seed 3"


def test_title_without_or_with_an_old_flat_config(tmp_path):
    assert run_title(str(tmp_path)) == str(tmp_path) and read_config_json(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"method": "grpo", "seed": 0}))  # the flat file of older runs
    assert run_title(str(tmp_path)) == str(tmp_path)


def test_method_json_round_trip(tmp_path):
    m = get_method("dppo-topk-kl")
    write_method_json(str(tmp_path), m.to_dict())
    assert method_from_dict(read_method_json(str(tmp_path))) == m
    assert read_method_json(str(tmp_path / "nope")) is None
