"""Seed 002's rank-selection loop: ``get_peft_model(base_model, LoraConfig(r=r, ...))`` for several r on the same
base, as PEFT allows (its warning, a fresh adapter each time, counts for that r), and the ``peft.utils`` names
that seed imports, from ``lorakit.utils``."""

from __future__ import annotations

import warnings

import pytest
import torch

from ._helpers import LIBS, lib, tiny_base, trainable_count


def _rank_loop(name: str) -> list[tuple[int, int, list[str], int]]:
    m = lib(name)
    base_model = tiny_base(tied=False)
    rows = []
    for r in (2, 4, 8):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = m.get_peft_model(base_model, m.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                               target_modules=["q_proj", "v_proj"]))
        second_time = [str(w.message) for w in caught if "for a second time" in str(w.message)]
        a = next(p for n, p in model.named_parameters() if "q_proj" in n and "lora_A" in n)
        rows.append((r, trainable_count(model), second_time, a.shape[0]))
    return rows


def test_get_peft_model_twice_on_one_base_behaves_as_peft() -> None:
    rows = {name: _rank_loop(name) for name in LIBS}
    assert [(r, n, len(w), rank) for r, n, w, rank in rows["lorakit"]] == [
        (r, n, len(w), rank) for r, n, w, rank in rows["peft"]]
    assert [len(w) for _, _, w, _ in rows["lorakit"]] == [0, 1, 1]  # the warning from the second call on
    assert rows["lorakit"][1][2] == rows["peft"][1][2]  # PEFT's text
    assert [rank for *_, rank in rows["lorakit"]] == [2, 4, 8]  # a fresh adapter of the new rank each time


def test_lorakit_utils_reexports_the_peft_utils_names() -> None:
    import lorakit
    import lorakit.inject
    import lorakit.utils as utils

    peft_utils = pytest.importorskip("peft.utils")
    for name in utils.__all__:
        assert hasattr(peft_utils, name), name  # the names PEFT users import
    assert utils.get_peft_model_state_dict is lorakit.get_peft_model_state_dict
    assert utils.set_peft_model_state_dict is lorakit.set_peft_model_state_dict
    assert utils.prepare_model_for_kbit_training is lorakit.prepare_model_for_kbit_training
    assert utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING is lorakit.inject.DEFAULT_TARGET_MODULES
    assert (utils.CONFIG_NAME, utils.SAFETENSORS_WEIGHTS_NAME, utils.WEIGHTS_NAME) == (
        peft_utils.CONFIG_NAME, peft_utils.SAFETENSORS_WEIGHTS_NAME, peft_utils.WEIGHTS_NAME)
    for model_type in ("llama", "gpt2", "mistral", "qwen2"):
        assert utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type] == (
            peft_utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])


def test_load_peft_weights_reads_a_saved_adapter(tmp_path) -> None:
    from lorakit import LoraConfig, get_peft_model
    from lorakit.utils import get_peft_model_state_dict, load_peft_weights

    model = get_peft_model(tiny_base(tied=False), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    loaded, state = load_peft_weights(tmp_path), get_peft_model_state_dict(model)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
