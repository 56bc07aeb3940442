"""Config values `lorakit train` cannot honour are refused up front, not trained around."""

from __future__ import annotations

import pytest

from lorakit.train.config import ConfigError, build_config

BASE = {"model": "m", "data": {"path": "d.jsonl"}}


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM"])
def test_a_task_type_other_than_causal_lm_is_refused(task):
    """lora.task_type=SEQ_CLS used to train next-token loss anyway and save an adapter labelled SEQ_CLS."""
    with pytest.raises(ConfigError, match=f"lora.task_type='{task}': `lorakit train` fine-tunes causal"):
        build_config({**BASE, "lora": {"task_type": task}})


@pytest.mark.parametrize("task", ["CAUSAL_LM", None])
def test_causal_lm_and_no_task_type_are_fine(task):
    build_config({**BASE, "lora": {"task_type": task}})
