"""Config values `lorakit train` cannot honour are refused up front, not trained around."""

from __future__ import annotations

import pytest

from lorakit.train.config import ConfigError, build_config, load_config

BASE = {"model": "m", "data": {"path": "d.jsonl"}}


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM"])
def test_a_task_type_other_than_causal_lm_is_refused(task):
    """lora.task_type=SEQ_CLS used to train next-token loss anyway and save an adapter labelled SEQ_CLS."""
    with pytest.raises(ConfigError, match=f"lora.task_type='{task}': `lorakit train` fine-tunes causal"):
        build_config({**BASE, "lora": {"task_type": task}})


@pytest.mark.parametrize("task", ["CAUSAL_LM", None])
def test_causal_lm_and_no_task_type_are_fine(task):
    build_config({**BASE, "lora": {"task_type": task}})


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: `max_steps: 20` further down silently replaced `max_steps: 10`."""
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: {path: d.jsonl}\ntraining:\n  max_steps: 10\n  seed: 1\n  max_steps: 20\n")
    with pytest.raises(ConfigError, match="key 'max_steps' appears twice in one section \\(first at line 4\\); "
                                          "keep one at line 6"):
        load_config(path)
    path.write_text("model: m\ndata: {path: d.jsonl}\nlora: {r: 4}\ntraining: {seed: 1}\nevaluation: {}\n")
    assert load_config(path).training.seed == 1  # the same key in different sections is fine
