"""Mixed-adapter batches (``adapter_names=``): each row equals a single-adapter run of that row (1e-5, fp32),
in eval and in training (gradients), with adapters of different ranks, DoRA, an embedding adapter and
``"__base__"``; and equal to PEFT's ``adapter_names`` path for LoRA adapters.
"""

from __future__ import annotations

import copy
import gc
import weakref

import peft
import pytest
import torch

import lorakit
from lorakit.dispatch import MIXED_BATCH

from .common import check_generate_equals_per_row, check_grads_equal_per_row, row_logits, tiny_llama

TOL = 1e-5
ROWS = ["a", "b", "__base__", "c", "a"]




def _model(dora_c: bool = True, dropout: float = 0.0):
    model = lorakit.get_peft_model(
        tiny_llama(),
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], init_lora_weights=False,
                           lora_dropout=dropout),
        adapter_name="a",
    )
    model.add_adapter("b", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                              lora_bias=True, init_lora_weights=False, lora_dropout=dropout / 2))
    model.add_adapter("c", lorakit.LoraConfig(r=4, target_modules=["v_proj", "down_proj"], use_dora=dora_c,
                                              init_lora_weights=False, lora_dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.2)
    return model




SKEWED = ["a", "a", "a", "a", "b", "c"]  # q_proj, v_proj: groups of 4 and 1 (the grouped form pads 3 rows)


def _branch(tokens: int) -> str:
    """The form the linear layers take for ROWS and SKEWED (little padding): "grouped" rows or "gathered" factors
    (mixed_linear_forward's rule on the tokens per row)."""
    from lorakit.variants import mixed

    return "grouped" if tokens <= mixed._GROUPED_TOKENS else "gathered"


@pytest.mark.parametrize(
    "tokens, rows, branch",
    [(1, ROWS, "grouped"), (4, SKEWED, "grouped"), (12, ROWS, "gathered"), (12, SKEWED, "gathered")],
)
def test_mixed_batch_equals_per_row_runs(tokens, rows, branch):
    model = _model().eval()
    assert _branch(tokens) == branch
    ids = torch.randint(0, 61, (len(rows), tokens))
    with torch.no_grad():
        got = model(ids, adapter_names=rows).logits
        want = [row_logits(model, ids[i : i + 1], n) for i, n in enumerate(rows)]
    assert MIXED_BATCH.get() is None  # the call's batch is dropped with it
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i : i + 1], w, atol=TOL, rtol=TOL)
    assert (want[0] - want[-1]).abs().max() > 1e-3  # adapters change the outputs


# q_proj and v_proj hold a, d and b or c: groups of 8, 1 and 1 pad to 3 * 8 = 24 positions for 11 rows
VERY_SKEWED = ["a"] * 8 + ["b", "c", "d"]


@pytest.mark.parametrize("rows, form", [(VERY_SKEWED, "gathered"), (["a", "b", "c", "d", "__base__"], "grouped")])
def test_decode_groups_only_while_the_padding_is_small(monkeypatch, rows, form):
    """One token per row: the grouped form pads every adapter's group to the largest, so a skewed batch takes
    the gathered form (no padding); either way each row equals its single-adapter run."""
    from lorakit.variants import mixed

    model = _model().eval()
    model.add_adapter("d", lorakit.LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, 61, (len(rows), 1))
    computed = []  # (rows, tokens) of each first bmm operand: grouped (n, G*T, in), gathered (batch, T, in)
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: computed.append(a.shape[0] * a.shape[1]) or bmm(a, b))
    with torch.no_grad():
        got = model(ids, adapter_names=rows).logits
    monkeypatch.setattr(torch, "bmm", bmm)
    assert max(computed) <= len(rows)  # neither form computes pad rows here
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    present = tuple(n for n in dict.fromkeys(rows) if n in q.adapters)
    assert mixed._Slots(tuple(rows), present, ids.device).grouped == (form == "grouped")
    with torch.no_grad():
        want = [row_logits(model, ids[i : i + 1], n) for i, n in enumerate(rows)]
    for i, w in enumerate(want):
        torch.testing.assert_close(got[i : i + 1], w, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("dora_c", [True, False])  # without DoRA, v_proj adds its grouped rows in place
@pytest.mark.parametrize("tokens, rows", [(2, SKEWED), (6, ROWS)])  # grouped rows (padded); gathered factors
def test_mixed_batch_trains(tokens, rows, dora_c):
    model = _model(dora_c)
    model.train()
    check_grads_equal_per_row(model, torch.randint(0, 61, (len(rows), tokens)), rows, TOL)


def test_mixed_batch_generate_equals_perrow_logits():
    model = _model().eval()
    ids = torch.randint(1, 61, (len(ROWS), 5))
    check_generate_equals_per_row(model, ids, ROWS)


def test_mixed_batch_equals_peft(tmp_path):
    ours = _model(dora_c=False).eval()
    ours.save_pretrained(tmp_path)
    base = tiny_llama()
    ours_base = copy.deepcopy(base)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a").eval()
    ours = lorakit.PeftModel.from_pretrained(ours_base, tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name, name)
        ours.load_adapter(tmp_path / name, name)
    ids = torch.randint(0, 61, (len(ROWS), 6))
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=ROWS).logits
        got = ours(ids, adapter_names=ROWS).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)


def test_unknown_adapter_name_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="unknown adapters"):
        model(torch.zeros(1, 3, dtype=torch.long), adapter_names=["nope"])


def test_cached_factors_follow_weight_changes():
    """Inference reuses stacked factors across calls; an in-place update (an optimizer step, a load) or a new
    tensor must be seen by the next call, never a stale stack."""
    model = _model(dora_c=False).eval()
    ids = torch.randint(0, 61, (len(ROWS), 6))
    with torch.no_grad():
        first = model(ids, adapter_names=ROWS).logits
        again = model(ids, adapter_names=ROWS).logits
        torch.testing.assert_close(again, first)
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        v = model.base_model.model.model.layers[0].self_attn.v_proj  # v moves the logits more than q
        v.adapters["a"].lora_B.weight.add_(0.5)  # in place: version counter moves
        changed = model(ids, adapter_names=ROWS).logits
        rows = [row_logits(model, ids[i : i + 1], n) for i, n in enumerate(ROWS)]
        q.adapters["b"].lora_A.weight = torch.nn.Parameter(torch.randn_like(q.adapters["b"].lora_A.weight))
        replaced = model(ids, adapter_names=ROWS).logits
        rows_replaced = [row_logits(model, ids[i : i + 1], n) for i, n in enumerate(ROWS)]
    assert (changed - first).abs().max() > 1e-3
    for i, want in enumerate(rows):
        torch.testing.assert_close(changed[i : i + 1], want, atol=TOL, rtol=TOL)
    for i, want in enumerate(rows_replaced):
        torch.testing.assert_close(replaced[i : i + 1], want, atol=TOL, rtol=TOL)


def test_cached_plans_follow_storage_scaling_and_rows():
    """``.data =`` (new storage, version counter unchanged), a new scaling, and new row names in the next call
    must each be seen: the caches are keyed on all three."""
    model = _model(dora_c=False).eval()
    attn = model.base_model.model.model.layers[0].self_attn  # v_proj, o_proj: q has no effect on 1 token
    ids = torch.randint(0, 61, (len(ROWS), 1))  # decode shape: the masked form and its cached masks

    def check(names):
        got = model(ids, adapter_names=names).logits
        want = torch.cat([row_logits(model, ids[i : i + 1], n) for i, n in enumerate(names)])
        torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
        return got

    with torch.no_grad():
        first = check(ROWS)
        attn.v_proj.adapters["a"].lora_A.weight.data = torch.randn_like(attn.v_proj.adapters["a"].lora_A.weight)
        after_data = check(ROWS)
        attn.o_proj.adapters["b"].scaling *= 3
        after_scaling = check(ROWS)
        check(ROWS[::-1])
    assert (after_data[0] - first[0]).abs().max() > 1e-3  # a's rows changed with its new A
    assert (after_scaling[1] - after_data[1]).abs().max() > 1e-3  # b's rows changed with its scaling


def _per_row(model, ids, rows):
    return torch.cat([row_logits(model, ids[i : i + 1], n) for i, n in enumerate(rows)])


def test_adapter_stack_is_reused_until_a_weight_changes_and_sees_every_change(tmp_path):
    """An explicit stack is kept across calls while nothing changed (no rebuild), and every way an adapter's
    weights can change between two calls is seen (rebuilt, never served stale): an in-place update (an optimizer
    step), an in-place update through ``.data`` (no version bump), a new tensor assigned through ``.data``, a
    replaced adapter module, a replaced lora_B submodule, a new scaling, ``load_adapter`` into the adapter,
    ``hotswap_adapter``. A new adapter that no row uses changes nothing."""
    model = _model(dora_c=False).eval()
    attn = model.base_model.model.model.layers[0].self_attn
    ids = torch.randint(0, 61, (len(ROWS), 1))
    stack = model.stack_adapters(["a", "b", "c"])
    model.save_pretrained(tmp_path / "saved")
    with torch.no_grad():  # a copy of adapter a with other weights, for load_adapter and hotswap
        other = copy.deepcopy(model)
        for n, p in other.named_parameters():
            if ".adapters.a." in n:
                p.mul_(-1.5)
        other.save_pretrained(tmp_path / "other", selected_adapters=["a"])

    def mixed():
        return model(ids, adapter_names=ROWS, adapter_stack=stack).logits

    def negated_b(adapter):
        new = copy.deepcopy(adapter)
        new.lora_B.weight.mul_(-1)
        return new

    def new_lora_b(adapter):
        new = copy.deepcopy(adapter.lora_B)
        new.weight.mul_(2)
        adapter.lora_B = new

    def assign_data(p):
        p.data = p.detach() * 3

    with torch.no_grad():
        first = mixed()
        watch = stack._watch
        torch.testing.assert_close(mixed(), first)
        assert stack._watch is watch  # reused: nothing rebuilt
        torch.testing.assert_close(first, _per_row(model, ids, ROWS), atol=TOL, rtol=TOL)
        steps = [  # (change, whether the rows' outputs change)
            (lambda: attn.v_proj.adapters["a"].lora_B.weight.add_(0.5), True),  # in place (an optimizer step)
            (lambda: attn.v_proj.adapters["a"].lora_A.weight.data.mul_(2), True),  # through .data, no version bump
            (lambda: assign_data(attn.v_proj.adapters["a"].lora_B.weight), True),
            (lambda: attn.v_proj.adapters.__setitem__("c", negated_b(attn.v_proj.adapters["c"])), True),
            (lambda: new_lora_b(attn.o_proj.adapters["b"]), True),  # (q_proj does nothing on 1 token)
            (lambda: setattr(attn.o_proj.adapters["b"], "scaling", attn.o_proj.adapters["b"].scaling * 3), True),
            (lambda: model.load_adapter(tmp_path / "other" / "a", "a"), True),
            (lambda: lorakit.hotswap_adapter(model, tmp_path / "saved" / "a", "a"), True),
            (lambda: model.add_adapter("d", lorakit.LoraConfig(r=2, target_modules=["v_proj"])), False),
        ]
        for i, (change, changes_rows) in enumerate(steps):
            before = mixed()
            watch = stack._watch
            change()
            model.eval()
            got = mixed()
            assert (stack._watch is not watch) == changes_rows, i
            torch.testing.assert_close(got, _per_row(model, ids, ROWS), atol=TOL, rtol=TOL, msg=str(i))
            assert ((got - before).abs().max() > 1e-4) == changes_rows, i


def test_adapter_stack_refuses_deleted_adapters_and_rows_outside_it():
    model = _model(dora_c=False).eval()
    ids = torch.randint(0, 61, (len(ROWS), 1))
    stack = model.stack_adapters(["a", "b"])
    with torch.no_grad(), pytest.raises(ValueError, match=r"unknown adapters \['c'\].*adapter_stack"):
        model(ids, adapter_names=ROWS, adapter_stack=stack)
    with pytest.raises(ValueError, match="adapter_stack= is used with adapter_names="):
        model(ids, adapter_stack=stack)
    with pytest.raises(ValueError, match="unknown adapters"):
        model.stack_adapters(["a", "x"])
    rows = ["a", "b", "__base__"]
    model.delete_adapter("b")
    with torch.no_grad(), pytest.raises(ValueError, match=r"no longer has.*stack_adapters"):
        model(ids[:3], adapter_names=rows, adapter_stack=stack)


def test_adapter_stack_trains_and_serves_generate():
    """With gradients the stack's kept factors are not used (the factors are stacked in the graph): gradients
    equal the per-call path's; generate with a stack equals generate without."""
    model = _model(dora_c=True)
    model.train()
    ids = torch.randint(0, 61, (len(ROWS), 3))
    stack = model.stack_adapters(["a", "b", "c"])
    grads = []
    for kw in ({}, {"adapter_stack": stack}):
        model.zero_grad()
        model(ids, adapter_names=ROWS, **kw).logits.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)
    model.eval()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(input_ids=ids, adapter_names=ROWS, **kw)
        got = model.generate(input_ids=ids, adapter_names=ROWS, adapter_stack=stack, **kw)
    assert torch.equal(got, want)


def test_unload_and_delete_free_what_mixed_calls_kept():
    """The model's kept call holds wrappers, adapters and stacked factors: unload() and delete_adapter drop it."""
    for drop in ("unload", "merge_and_unload", "delete_adapter"):
        model = _model(dora_c=False).eval()
        ids = torch.randint(0, 61, (len(ROWS), 1))
        with torch.no_grad():
            for _ in range(3):
                model(ids, adapter_names=ROWS)
        q = model.base_model.model.model.layers[0].self_attn.q_proj
        kept = weakref.ref(q.adapters["b"].lora_A.weight)
        wrapper = weakref.ref(q)
        del q
        if drop == "delete_adapter":
            model.delete_adapter("b")
        else:
            getattr(model, drop)()
        gc.collect()
        assert kept() is None, drop
        if drop != "delete_adapter":
            assert wrapper() is None, drop


def test_kept_plans_after_inference_mode_serve_a_call_with_gradients():
    """Row indices kept from calls under torch.inference_mode() must be usable by a later call that saves them
    for backward (inference tensors cannot be); its gradients are those of a model that never ran inference."""
    model = _model(dora_c=False)
    fresh = copy.deepcopy(model)
    ids = torch.randint(0, 61, (len(ROWS), 1))
    with torch.inference_mode():
        for _ in range(3):
            model(ids, adapter_names=ROWS)
    grads = []
    for m in (model, fresh):
        m(ids, adapter_names=ROWS).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], msg=n)


def test_mixed_batch_under_torch_func_grad_on_repeated_calls():
    """torch.func.grad over adapter factors: functorch-wrapped tensors have no storage, so nothing is snapshotted
    or kept, and every call (not only the first) gives autograd's gradients."""
    from torch.func import functional_call, grad

    model = _model(dora_c=False).eval()
    ids = torch.randint(0, 61, (len(ROWS), 1))
    params = {n: p.detach() for n, p in model.named_parameters() if "lora_B" in n}

    def loss(p):
        return functional_call(model, p, (ids,), {"adapter_names": ROWS}).logits.square().sum()

    model(ids, adapter_names=ROWS).logits.square().sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if n in params}
    for _ in range(3):
        got = grad(loss)(params)
        for n in params:
            torch.testing.assert_close(got[n], want[n], msg=n)


@pytest.mark.parametrize("reentrant", [False, True])
def test_mixed_batch_trains_under_gradient_checkpointing(reentrant):
    """Gradient checkpointing recomputes each layer in the backward pass, after the call ended: the recompute
    runs the call's rows too (each row's gradients equal its single-adapter run's)."""
    model = _model()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    layer = model.base_model.model.model.layers[0]
    own = layer._gradient_checkpointing_func
    check_grads_equal_per_row(model, torch.randint(0, 61, (len(ROWS), 6)), ROWS, TOL, nonzero=True)
    assert layer._gradient_checkpointing_func is own  # put back after the call


def test_checkpointing_enabled_behind_the_peft_models_back_is_refused_in_mixed_training():
    """Checkpointing switched on on the base model after the PeftModel was built has checkpoint functions that do
    not carry the rows into the recompute: a mixed call with gradients refuses it (naming the fix) rather than
    computing wrong gradients; the PeftModel's own activation_checkpointing_enable works."""
    model = _model()
    model.train()
    ids = torch.randint(0, 61, (len(ROWS), 6))
    model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    with pytest.raises(ValueError, match=r"peft_model.gradient_checkpointing_enable"):
        model(ids, adapter_names=ROWS)
    with torch.no_grad():
        model(ids, adapter_names=ROWS)  # no gradients: no recompute, nothing to refuse
    model.activation_checkpointing_enable({"use_reentrant": False})
    check_grads_equal_per_row(model, ids, ROWS, TOL, nonzero=True)


def test_a_stack_serves_only_its_own_model():
    one, other = _model(dora_c=False).eval(), _model(dora_c=False).eval()
    stack = one.stack_adapters(["a", "b"])
    with torch.no_grad(), pytest.raises(ValueError, match="another model"):
        other(torch.randint(0, 61, (2, 1)), adapter_names=["a", "b"], adapter_stack=stack)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_mixed_and_plain_calls_in_one_backward(reentrant):
    """A mixed call and a plain call (the active adapter on every row) before one backward, with dropout: each
    recompute sees its own call's rows and dropout draws, so the gradients equal those without checkpointing."""
    ids = torch.randint(0, 61, (len(ROWS), 6))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = _model(dropout=0.3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(1)
        mixed = model(ids, adapter_names=ROWS).logits
        plain = model(ids).logits
        (mixed.square().sum() + plain.sin().sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    for n, g in grads[0].items():
        assert g is not None and g.abs().max() > 0, n
        torch.testing.assert_close(grads[1][n], g, atol=TOL, rtol=1e-4, msg=n)


@pytest.mark.parametrize("option", ["padding_idx", "scale_grad_by_freq"])
def test_mixed_embedding_keeps_the_base_embeddings_gradient_options(option):
    """The embedding adapter's lookup follows the base embedding as the single-adapter path does (F.embedding with
    its options): no gradient on the pad token's row of lora_embedding_A; with scale_grad_by_freq, gradients
    scaled by each token's count among the rows of that adapter."""
    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        tiny_llama(pad_token_id=0),
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False),
        adapter_name="a",
    )
    model.add_adapter("b", lorakit.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    embed = model.base_model.model.model.embed_tokens.base_layer
    assert embed.padding_idx == 0
    if option == "scale_grad_by_freq":
        embed.scale_grad_by_freq = True
    model.train()
    ids = torch.tensor([[0, 5, 5, 0, 7, 5], [3, 0, 3, 3, 9, 0], [0, 4, 4, 8, 8, 8]])
    rows = ["a", "b", "__base__"]
    check_grads_equal_per_row(model, ids, rows, TOL, nonzero=True)
    a = model.base_model.model.model.embed_tokens.adapters["a"].lora_embedding_A
    assert a.grad[:, 0].abs().max() == 0 and a.grad[:, 5].abs().max() > 0


def test_mixed_embedding_refuses_what_it_does_not_do():
    model = lorakit.get_peft_model(
        tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
    )
    embed = model.base_model.model.model.embed_tokens.base_layer
    ids = torch.randint(0, 61, (2, 3))
    embed.sparse = True
    with torch.no_grad():
        model(ids, adapter_names=["default", "__base__"])  # no gradient: sparse does not matter
    with pytest.raises(NotImplementedError, match="sparse=True"):
        model(ids, adapter_names=["default", "__base__"])
    embed.sparse, embed.max_norm = False, 1.0
    with pytest.raises(NotImplementedError, match="max_norm=1.0"):
        model(ids, adapter_names=["default", "__base__"])
