"""dppo compare: method specs, report generation on tiny fake metrics, and the resumable/parallel orchestration."""

from __future__ import annotations

import json
import math
import os

import pytest

from dppo.report import compare, summary


def _fake(root, label, seed, rewards, mismatch=0.003):
    d = root / "runs" / label / f"seed{seed}"
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for i, r in enumerate(rewards):
            f.write(json.dumps({"step": i, "reward": r, "mismatch/abs_diff_mean": mismatch * (1 + i),
                                "loss/masked_frac": 0.01, "eval/accuracy": r}) + "\n")
        f.write('{"step": 99, "rew')  # a line cut by a kill is ignored


def test_parse_method_spec():
    assert compare.parse_method_spec("grpo") == ("grpo", {})
    assert compare.parse_method_spec("cispo@ratio_cap=3") == ("cispo", {"ratio_cap": 3})
    name, over = compare.parse_method_spec("dppo-binary-tv@delta_low=0.2,delta_high=inf")
    assert name == "dppo-binary-tv" and over["delta_low"] == 0.2 and math.isinf(over["delta_high"])
    with pytest.raises(ValueError, match="unknown method"):
        compare.parse_method_spec("nope")
    with pytest.raises(ValueError, match="unknown Method field"):
        compare.parse_method_spec("grpo@no_such_field=1")


def test_report_from_fake_metrics(tmp_path):
    _fake(tmp_path, "stable", 0, [0.2, 0.5, 0.8, 0.9, 0.95])
    _fake(tmp_path, "stable", 1, [0.3, 0.6, 0.7, 0.9, 1.0])
    _fake(tmp_path, "collapses", 0, [0.3, 0.6, 0.8, 0.1, 0.0])
    runs = summary.load_runs(tmp_path)
    assert set(runs) == {"stable", "collapses"} and len(runs["stable"][0]) == 5
    s = summary.write_report(tmp_path, runs, title="fake", command="dppo compare ...", wall_s=12.0,
                             target=("eval/accuracy", 0.9))
    assert s["collapses"]["collapsed_seeds"] == 1 and s["stable"]["collapsed_seeds"] == 0
    assert s["stable"]["target"]["steps"] == [3, 3] and s["collapses"]["target"]["reached"] == 0
    assert s["stable"]["final_reward"][0] == pytest.approx((0.95 + 1.0) / 2)
    md = (tmp_path / "report.md").read_text()
    assert "| `stable` | 2 |" in md and "never (0/1)" in md and "curves.png" in md
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["wall_s"] == 12.0


def test_orchestration_resumes_and_passes_args(tmp_path):
    # a stand-in runner: writes 3 metric lines (+ the extra args it got) and exits 0
    script = tmp_path / "runner.py"
    script.write_text(
        "import json, sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "with open(out / 'metrics.jsonl', 'a') as f:\n"
        "    for i in range(3): f.write(json.dumps({'step': i, 'reward': 0.1 * i, 'argv': sys.argv[1:]}) + '\\n')\n"
    )
    out = tmp_path / "cmp"
    cmd = (f"{{python}} {script} --method {{method}} --spec {{spec}} --over {{overrides}} --seed {{seed}} "
           "--out {run_dir}")
    argv = ["--methods", "grpo,pg-is", "cispo@ratio_cap=3", "--seeds", "0,1", "--out", str(out), "--jobs", "2",
            "--cmd", cmd, "--", "--steps", "3"]
    assert compare.main(argv) == 0
    runs = summary.load_runs(out)
    assert set(runs) == {"grpo", "pg-is", "cispo@ratio_cap=3"} and all(len(v) == 2 for v in runs.values())
    got = runs["cispo@ratio_cap=3"][1][0]["argv"]
    assert got[got.index("--method") + 1] == "cispo" and json.loads(got[got.index("--over") + 1]) == {"ratio_cap": 3}
    assert got[got.index("--spec") + 1] == "cispo@ratio_cap=3"
    assert got[-2:] == ["--steps", "3"]
    assert (out / "report.md").exists()
    machine = json.loads((out / "summary.json").read_text())["machine"]
    assert f"{os.cpu_count()} cores" in machine and f"Machine: {machine}." in (out / "report.md").read_text()
    # second call: every run has done.json, so nothing is re-run (metrics not appended twice)
    assert compare.main(argv) == 0
    assert len(summary.load_runs(out)["grpo"][0]) == 3


def test_summary_reads_dppo_train_metric_names(tmp_path):
    # `dppo train` logs mismatch/abs_diff_mean (before the step's first update), loss/abs_diff_mean (over the
    # updates), loss/masked_frac and eval/accuracy (every N steps, on its own line at step 0): one column each.
    d = tmp_path / "runs" / "m" / "seed0"
    d.mkdir(parents=True)
    recs = [dict(step=0, **{"eval/accuracy": 0.4})]
    recs += [dict(step=i, reward=0.5, **{"mismatch/abs_diff_mean": 0.01 * i, "loss/abs_diff_mean": 0.1 * i,
                                         "loss/masked_frac": 0.02}) for i in range(1, 11)]
    recs[-1]["eval/accuracy"] = 0.7
    d.joinpath("metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    d.joinpath("method.json").write_text(json.dumps({"name": "m", "ratio_cap": 3.0}))
    s = summary.summarise(summary.load_runs(tmp_path), target=("eval/accuracy", 0.6))["m"]
    assert s["final_mismatch"][0] == pytest.approx((0.09 + 0.10) / 2)  # last 20 % of 10 steps
    assert s["final_drift"][0] == pytest.approx((0.9 + 1.0) / 2)
    assert s["peak_mismatch"][0] == pytest.approx(0.10)
    assert s["masked_frac"][0] == pytest.approx(0.02)
    assert s["final_heldout_acc"][0] == pytest.approx(0.7)
    assert s["target"]["steps"] == [10]


def test_dppo_runner_passes_the_whole_spec(tmp_path, monkeypatch):
    """The default runner hands `--method SPEC` to `dppo train`, which resolves the overrides and records the method
    (the override is not dropped under a label that claims it); the report prints the resolved method."""
    from dppo.run.cli import parse_config
    from dppo.run.validate import resolve_method

    cmd = compare.RUNNER.format(python="py", spec="cispo@ratio_cap=3", seed=0, run_dir="x").split()
    cfg = parse_config(cmd[cmd.index("train") + 1:])
    assert resolve_method(cfg).ratio_cap == 3.0
    d = tmp_path / "runs" / "cispo@ratio_cap=3" / "seed0"
    d.mkdir(parents=True)
    d.joinpath("metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    d.joinpath("method.json").write_text(json.dumps({"name": "cispo@ratio_cap=3", "ratio_cap": 3.0}))
    summary.write_report(tmp_path, summary.load_runs(tmp_path), title="t")
    assert "- `cispo@ratio_cap=3`: name=cispo@ratio_cap=3, ratio_cap=3.0" in (tmp_path / "report.md").read_text()


def test_custom_cmd_without_overrides_is_refused(tmp_path, capsys):
    argv = ["--methods", "cispo@ratio_cap=3", "--seeds", "0", "--out", str(tmp_path), "--cmd",
            "{python} x.py --method {method} --out {run_dir}"]
    assert compare.main(argv) == 2
    assert "overrides of 'cispo@ratio_cap=3' would not reach the run" in capsys.readouterr().err
