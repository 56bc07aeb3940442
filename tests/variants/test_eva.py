"""EVA (``init_lora_weights="eva"`` + ``initialize_lora_eva_weights``). PEFT's EVA runs a randomized low-rank
SVD inside its incremental PCA, so whole-model parity is not exact; tested instead: our incremental PCA against
PEFT's (full-SVD mode, 1e-4) and a one-shot PCA, and the properties of the init (A rows orthonormal, B = 0,
outputs unchanged, ranks sum to the budget and follow the explained variance), and PEFT loading the result."""

from __future__ import annotations

import copy

import peft
import torch

import lorakit
from lorakit.variants.eva import IncrementalPCA, get_eva_state_dict, initialize_lora_eva_weights

from .common import tiny_llama


def _loader():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 61, (4, 16), generator=g)} for _ in range(3)]


def test_incremental_pca_equals_peft_and_one_shot_pca():
    from peft.utils.incremental_pca import IncrementalPCA as PeftIPCA

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(40, 12, generator=g) @ torch.randn(12, 12, generator=g) for _ in range(3)]
    ours, theirs = IncrementalPCA(5), PeftIPCA(n_components=5, lowrank=False)
    for x in batches:
        ours.partial_fit(x)
        theirs.partial_fit(x.clone())
    torch.testing.assert_close(ours.components, theirs.components_.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.explained_variance_ratio.float(), theirs.explained_variance_ratio_.float())
    full = IncrementalPCA(12)  # nothing truncated: exactly the PCA of all the data at once
    for x in batches:
        full.partial_fit(x)
    data = torch.cat(batches)
    _, s, vh = torch.linalg.svd(data - data.mean(0), full_matrices=False)
    torch.testing.assert_close(full.singular_values, s, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close((full.components * vh).sum(1).abs(), torch.ones(12), atol=1e-4, rtol=0)


def test_eva_init_properties_and_peft_loads_it(tmp_path):
    base = tiny_llama(seed=0)
    ids = torch.randint(0, 61, (2, 6))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                             eva_config={"rho": 2.0, "tau": 0.7})
    model = lorakit.get_peft_model(copy.deepcopy(base), cfg)
    state = get_eva_state_dict(model, _loader())
    assert sum(a.shape[0] for a in state.values()) == 4 * len(targets)  # the rank budget is kept
    assert all(a.shape[0] <= 8 for a in state.values())  # at most round(r * rho)
    qkv = [a for n, a in state.items() if n.endswith(("q_proj", "k_proj", "v_proj"))]  # one shared PCA
    first = max(qkv, key=len)
    for a in qkv:
        torch.testing.assert_close(a, first[: len(a)])
    initialize_lora_eva_weights(model, eva_state_dict=state)
    for name, a in state.items():
        wrapper = model.get_submodule(name)
        if a.shape[0] == 0:
            assert "default" not in wrapper.adapters
            continue
        ad = wrapper.adapters["default"]
        assert ad.r == a.shape[0] and ad.lora_A.weight.requires_grad
        eye = torch.eye(ad.r)
        torch.testing.assert_close(ad.lora_A.weight @ ad.lora_A.weight.T, eye, atol=1e-5, rtol=0)  # orthonormal
        assert not ad.lora_B.weight.any()
        assert abs(ad.scaling - 2.0) < 1e-12  # alpha adjusted by k / r keeps alpha / r
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)  # B = 0: unchanged at init
    model.peft_config["default"].init_lora_weights = True  # PEFT's recipe for saving an EVA adapter
    model.save_pretrained(tmp_path)
    for side in (lorakit, peft):
        loaded = side.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        n = sum(p.numel() for k, p in loaded.named_parameters() if "lora_A" in k)
        assert n == sum(a.numel() for a in state.values())


def test_eva_rank_follows_explained_variance():
    """A layer whose inputs are concentrated in a few directions needs fewer ranks than one with spread inputs."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    with torch.no_grad():  # layer 1 sees the output of layer 0, squeezed to rank 2
        model[0].weight.copy_(torch.randn(16, 2) @ torch.randn(2, 16))
    cfg = lorakit.LoraConfig(r=4, target_modules=["0", "1"], init_lora_weights="eva", eva_config={"tau": 0.5})
    pm = lorakit.get_peft_model(model, cfg)
    loader = [torch.randn(64, 16) for _ in range(4)]
    state = get_eva_state_dict(
        pm, loader, forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None
    )
    ranks = {n.rsplit(".", 1)[-1]: a.shape[0] for n, a in state.items()}
    assert ranks["0"] + ranks["1"] == 8 and ranks["0"] > ranks["1"] and ranks["1"] <= 2
