"""Shared pieces of the variants tests: the tiny model, per-row references for mixed batches, and the
base-modifying-init conversion round trip."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import torch
import transformers as tf

import lorakit


def tiny_llama_config(**overrides: object) -> tf.LlamaConfig:
    """1-layer Llama config, hidden 32, intermediate 64, 4 heads (2 key/value), vocab 61; ``overrides`` replace
    or add fields."""
    fields = dict(
        vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return tf.LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed: int | None = None, **overrides: object) -> tf.LlamaForCausalLM:
    """``tiny_llama_config(**overrides)`` as a causal LM in eval mode; seeded first when ``seed`` is given."""
    if seed is not None:
        torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def row_logits(model: lorakit.PeftModel, ids: torch.Tensor, name: str) -> torch.Tensor:
    """Logits of ``ids`` through adapter ``name`` alone (``"__base__"``: adapters disabled): a mixed batch's row."""
    if name == "__base__":
        with model.disable_adapter():
            return model(ids).logits
    model.set_adapter(name)
    return model(ids).logits


def check_generate_equals_per_row(
    model: lorakit.PeftModel, ids: torch.Tensor, rows: list[str], **generate_kw
) -> None:
    """Greedy ``generate(..., adapter_names=rows)`` equals each row generated alone with its adapter; with
    ``num_return_sequences=k`` row ``i``'s k sequences are rows ``k*i .. k*i+k-1`` of the output."""
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, **generate_kw)
    k = kw.get("num_return_sequences", 1)
    got = model.generate(input_ids=ids, adapter_names=rows, **kw)
    for i, name in enumerate(rows):
        if name == "__base__":
            with model.disable_adapter():
                want = model.generate(input_ids=ids[i : i + 1], **kw)
        else:
            model.set_adapter(name)
            want = model.generate(input_ids=ids[i : i + 1], **kw)
        n = want.shape[1]  # a row that hit EOS is padded in the batch
        mine = got[k * i : k * i + k]
        assert torch.equal(mine[:, :n], want) and (mine[:, n:] == 0).all()


#: Units of rounding of a tensor's largest gradient allowed between two orders of the same sums: 32 u. Each fp32 run
#: was measured within ~6 u of its fp64 counterpart, so two runs within ~12 u of each other: 32 u is ~2.7x that
#: (``check_grads_equal_per_row``).
GRAD_ULPS = 32


def check_grads_equal_per_row(
    model: lorakit.PeftModel, ids: torch.Tensor, rows: list[str], tol: float, nonzero: bool = False,
    rtol: float = 1e-4,
) -> None:
    """Gradients of a weighted sum of ``model(ids, adapter_names=rows)`` equal the sum of each row's run through
    its adapter alone (the base row has no trainable path); ``nonzero``: and every trainable tensor gets one.

    Tolerance: ``tol`` plus ``GRAD_ULPS`` units of rounding (``u = eps / 2`` of the dtype) of the tensor's largest
    gradient. Both runs compute the same sums in another order (a batch of rows vs one row at a time, the mixed
    batch's stacked factors), and an entry that is the sum of terms of size ``M`` carries a rounding error of a
    few ``u M`` whatever its own size: entries near zero from cancellation cannot be held to ``tol`` absolute when
    ``M`` is large (o_proj's lora_A gradients reach ~300 in test_mixed_modules_to_save, where ``u M = 1.7e-5`` is
    above ``tol = 1e-5`` on its own). Measured there: each fp32 run is within 3.4e-7 ``max|g|`` (~6 u) of the same
    run in fp64, and the two fp64 runs agree to 6e-14: the fp32 difference is rounding, not a wrong gradient (the
    fp64 test in test_mixed_modules_to_save holds that to 1e-10)."""
    weights = torch.randn(*ids.shape, model.config.vocab_size, dtype=model.dtype)
    (model(ids, adapter_names=rows).logits * weights).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    mixed = {n: p.grad.clone() for n, p in trainable.items()}
    model.zero_grad()
    for i, name in enumerate(rows):
        if name != "__base__":
            (row_logits(model, ids[i : i + 1], name) * weights[i : i + 1]).sum().backward()
    for n, p in trainable.items():
        if nonzero:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        rounding = GRAD_ULPS * torch.finfo(p.grad.dtype).eps / 2 * p.grad.abs().max().item()
        torch.testing.assert_close(mixed[n], p.grad, atol=tol + rounding, rtol=rtol, msg=n)


def check_conversion_to_plain_lora(
    model: lorakit.PeftModel, base: torch.nn.Module, ids: torch.Tensor, tmp_path: Path
) -> lorakit.LoraConfig:
    """``model`` was just initialised by a base-modifying init on a copy of ``base``: it must equal ``base`` at
    init; after 3 SGD steps, the adapter saved with ``path_initial_model_for_weight_conversion`` must reproduce the
    trained model on the untouched ``base`` in lorakit and in PEFT (1e-4). Returns the converted config."""
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=1e-4)  # unchanged at init
    model.save_pretrained(tmp_path / "init")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert (trained - base(ids).logits).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    for side in (lorakit, peft):
        converted = side.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain").eval()
        with torch.no_grad():
            torch.testing.assert_close(converted(ids).logits, trained, atol=1e-4, rtol=1e-4)
    return lorakit.LoraConfig.from_pretrained(tmp_path / "plain")
