"""Mixed-adapter batches with ``modules_to_save``: row ``i`` goes through adapter ``i``'s own copy of the module
("__base__" and adapters without a copy: the original). Equal to PEFT's ``adapter_names`` path (1e-5, fp32) and
to single-adapter runs of each row, in eval, in training (gradients reach each copy from its rows only) and in
``generate``. Copies are perturbed away from the original, so a row sent to the wrong module fails.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers as tf

import lorakit
from lorakit.dispatch import MIXED_BATCH
from lorakit.layers import ModulesToSaveWrapper

from .common import check_generate_equals_per_row, check_grads_equal_per_row, row_logits, tiny_llama, tiny_llama_config

TOL = 1e-5  # fp32; the same ops in a different order
ROWS = ["a", "b", "__base__", "c", "a", "b"]


def _perturb_copies(model: torch.nn.Module, seed: int) -> None:
    """Move every modules_to_save copy away from the original module (they start as exact copies)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModulesToSaveWrapper):
                for clone in module.modules_to_save.values():
                    for p in clone.parameters():
                        p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def _causal_lm() -> lorakit.PeftModel:
    """Adapters a, b with their own ``lm_head`` copy (different ranks and targets); c with LoRA only."""
    model = lorakit.get_peft_model(
        tiny_llama(seed=0),
        lorakit.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], init_lora_weights=False
        ),
        adapter_name="a",
    )
    model.add_adapter(
        "b",
        lorakit.LoraConfig(
            r=2, lora_alpha=4, target_modules=["o_proj"], modules_to_save=["lm_head"], init_lora_weights=False
        ),
    )
    model.add_adapter("c", lorakit.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    _perturb_copies(model, seed=1)
    return model




def test_rows_equal_single_adapter_runs_and_each_copy_runs_once():
    model = _causal_lm().eval()
    head = model.get_base_model().lm_head
    calls = {}
    for name, module in [("original", head.original_module), *head.modules_to_save.items()]:
        module.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    ids = torch.randint(0, 61, (len(ROWS), 5))
    with torch.no_grad():
        got = model(ids, adapter_names=ROWS).logits
        assert calls == {"original": 1, "a": 1, "b": 1}  # grouped: one call per module, not per row
        rows = [row_logits(model, ids[i : i + 1], n) for i, n in enumerate(ROWS)]
    assert MIXED_BATCH.get() is None
    for i, want in enumerate(rows):
        torch.testing.assert_close(got[i : i + 1], want, atol=TOL, rtol=TOL)
    with torch.no_grad():  # the copies matter: the same input through the original head differs
        model.set_adapter("a")
        hidden = model.get_base_model().model(ids[:1]).last_hidden_state
        assert (head.modules_to_save["a"](hidden) - head.original_module(hidden)).abs().max() > 1e-2


def test_one_module_for_every_row_skips_the_regrouping():
    model = _causal_lm().eval()
    ids = torch.randint(0, 61, (3, 4))
    with torch.no_grad():
        got = model(ids, adapter_names=["b"] * 3).logits
        model.set_adapter("b")
        torch.testing.assert_close(got, model(ids).logits, atol=TOL, rtol=TOL)


def test_mixed_batch_trains_each_copy_from_its_rows():
    model = _causal_lm().train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("modules_to_save.a." in n for n in trainable) and any("modules_to_save.b." in n for n in trainable)
    check_grads_equal_per_row(model, torch.randint(0, 61, (len(ROWS), 5)), ROWS, TOL, nonzero=True)


def test_mixed_batch_gradients_are_exact_in_fp64():
    """The fp32 test above allows rounding (``check_grads_equal_per_row``); in fp64 the mixed batch and the per-row
    runs must agree to 1e-10 (measured: 6e-14), so a wrong gradient cannot hide in that allowance."""
    model = _causal_lm().train().double()
    check_grads_equal_per_row(model, torch.randint(0, 61, (len(ROWS), 5)), ROWS, 1e-10, nonzero=True, rtol=1e-10)


def test_generate_equals_perrow_logits():
    model = _causal_lm().eval()
    ids = torch.randint(1, 61, (len(ROWS), 4))
    check_generate_equals_per_row(model, ids, ROWS)


def _seq_cls() -> tf.LlamaForSequenceClassification:
    torch.manual_seed(0)
    return tf.LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0)).eval()


@pytest.mark.parametrize("task", ["SEQ_CLS", "CAUSAL_LM"])
def test_equals_peft(tmp_path, task):
    """PEFT takes ``"__base__"`` and adapters with a copy (its mixed path has no rule for adapters without one)."""
    base = _seq_cls() if task == "SEQ_CLS" else tiny_llama(seed=0)
    extra = {} if task == "SEQ_CLS" else {"modules_to_save": ["lm_head"]}  # SEQ_CLS adds the "score" head itself
    ours = lorakit.get_peft_model(
        copy.deepcopy(base),
        lorakit.LoraConfig(task_type=task, r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **extra),
        adapter_name="a",
    )
    ours.add_adapter(
        "b",
        lorakit.LoraConfig(
            task_type=task, r=2, lora_alpha=4, target_modules=["o_proj"], init_lora_weights=False, **extra
        ),
    )
    _perturb_copies(ours, seed=1)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a").eval()
    theirs.load_adapter(tmp_path / "b", "b")
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", "b")
    rows = ["a", "b", "__base__", "b", "a"]
    ids = torch.randint(1, 61, (len(rows), 6))  # no pad id: SEQ_CLS pools the last token of every row
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=rows).logits
        got = ours(ids, adapter_names=rows).logits
        single = [row_logits(ours, ids[i : i + 1], n) for i, n in enumerate(rows)]
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    torch.testing.assert_close(got, torch.cat(single), atol=TOL, rtol=TOL)
    assert (got[0] - got[2]).abs().max() > 1e-3 and (got[1] - got[2]).abs().max() > 1e-3


def test_generate_with_beams_expands_rows_in_place():
    """``generate`` repeats each row (beams x return sequences) in place: row ``i``'s copies keep its adapter."""
    model = _causal_lm().eval()
    ids = torch.randint(1, 61, (len(ROWS), 4))
    check_generate_equals_per_row(model, ids, ROWS, num_beams=2, num_return_sequences=2)
