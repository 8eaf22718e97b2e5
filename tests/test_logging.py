"""Metric names and where they go: every logged metric is in the registry (dppo.metrics) with a meaning and a pooling
rule; W&B receives the same records as metrics.jsonl (offline mode); the EOS set includes the chat template's
end-of-turn token."""

from __future__ import annotations

import pytest

from dppo.loss import METRIC_KEYS
from dppo.metrics import LOSS_METRICS, METRICS, describe
from dppo.report.plot import PANELS
from dppo.report.summary import DEFAULT_METRICS, SUMMARY_KEYS
from dppo.rundir.metrics_log import read_metrics
from test_trainer import tiny_cfg


def test_every_loss_metric_has_a_pooling_rule():
    assert set(METRIC_KEYS) == set(LOSS_METRICS)


def test_plots_and_reports_name_registered_metrics():
    keys = [k for _, series in PANELS for k, _ in series] + list(DEFAULT_METRICS) + list(SUMMARY_KEYS.values())
    assert [k for k in keys if k not in METRICS] == []


@pytest.mark.parametrize("report_to", [(), ("wandb",)], ids=["jsonl+tb", "wandb"])
def test_trainer_logs_only_registered_metrics_and_wandb_mirrors_them(tmp_path, monkeypatch, report_to):
    """The real wandb client in offline mode: every record of metrics.jsonl reaches run.log at its step (a spy wraps
    run.log and still calls it), and the offline run file is written."""
    sent = []
    if report_to:
        wandb = pytest.importorskip("wandb")
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        real_init = wandb.init

        def init(*a, **k):
            run = real_init(*a, **k)
            real_log = run.log
            run.log = lambda data, step=None, **kw: (sent.append((step, dict(data))), real_log(data, step=step, **kw))
            return run

        monkeypatch.setattr(wandb, "init", init)
    from dppo.run.loop import train

    out = tmp_path / "run"
    train(tiny_cfg(out, str(tmp_path / "c"), steps=2, eval_every=1, plot=False, report_to=report_to),
          log=lambda m: None)
    rows = read_metrics(str(out / "metrics.jsonl"))
    logged = {k for r in rows for k in r} - {"step"}
    assert [k for k in sorted(logged) if describe(k) == k] == []
    if not report_to:
        return
    assert [s for s, _ in sent] == [r["step"] for r in rows]
    for (_, data), r in zip(sent, rows):
        assert data == {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    run_id = (out / "wandb_id").read_text().strip()
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_eos_set_includes_the_chat_templates_end_of_turn(tmp_path):
    from tokenizers import AddedToken

    from dppo.hf.model import build_char_tokenizer, build_tiny_model, eos_token_ids

    tok = build_char_tokenizer("abc")
    tok.add_special_tokens({"additional_special_tokens": [AddedToken("<|end|>", special=True)]})
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|end|>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    model = build_tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2, eos_token_id=tok.eos_token_id)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert eos_token_ids(model, tok) == sorted({tok.eos_token_id, end})
    assert eos_token_ids(model, tok, ("a",)) == sorted({tok.eos_token_id, end, tok.convert_tokens_to_ids("a")})
    with pytest.raises(ValueError, match="'abc' is not one token"):
        eos_token_ids(model, tok, ("abc",))
    tok.chat_template = None
    assert eos_token_ids(model, tok) == [tok.eos_token_id]


def test_truncated_sampling_with_a_trust_region_warns(tmp_path):
    from dppo.run.trainer import Trainer

    logged = []
    Trainer(tiny_cfg(tmp_path / "r", str(tmp_path / "c"), top_p=0.9), log=logged.append)
    assert any("biases the ratio and the trust region (trl#6789)" in m for m in logged)
    logged.clear()
    Trainer(tiny_cfg(tmp_path / "r", str(tmp_path / "c"), top_p=0.9, method="pg-is"), log=logged.append)
    assert not any("trl#6789" in m for m in logged)
