"""Adapters for the serve tests, made on the shipped tiny model (examples/tiny_model) with random B
(init_lora_weights=False), so each adapter's greedy output differs from the base's."""

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

TINY = REPO / "examples" / "tiny_model"
PROMPTS = ["the quick brown fox", "a", "what is the meaning of life and everything in it", "hello there, friend"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tiny model's ops are too small to share, and on a loaded 2-core machine two threads
    wait on each other (these tests ran 5-10x slower with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter_configs() -> dict:
    from lorakit import LoraConfig

    return {
        "ad1": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "ad2": LoraConfig(r=8, target_modules="all-linear", use_dora=True, init_lora_weights=False),
        "ad3": LoraConfig(r=4, target_modules=["o_proj"], modules_to_save=["model.norm"], init_lora_weights=False),
        "ad4": LoraConfig(r=2, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "down_proj"],
                          init_lora_weights=False),
        "ad5": LoraConfig(r=4, target_modules=["k_proj", "up_proj"], init_lora_weights=False),
    }


def save_adapter(base, config, folder: Path, seed: int, safe: bool = True) -> Path:
    from lorakit import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, config, adapter_name="default")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(2.0)  # big enough that greedy tokens change within a few steps
            if ".modules_to_save." in name:
                p.mul_(1.5)  # the copy differs from the original module
    model.save_pretrained(folder, safe_serialization=safe)
    return folder


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ad1..ad5 (LoRA, DoRA, modules_to_save, rsLoRA, one for runtime loading), `other_base` (the same modules on
    a wider model: shapes differ) and `pickled` (ad1's tensors as adapter_model.bin only)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("adapters")
    for i, (name, config) in enumerate(adapter_configs().items()):
        save_adapter(AutoModelForCausalLM.from_pretrained(TINY), config, root / name, seed=i)
    save_adapter(make_tiny_llama(layers=4, vocab=444, hidden=64), adapter_configs()["ad1"], root / "other_base", seed=9)
    save_adapter(AutoModelForCausalLM.from_pretrained(TINY), adapter_configs()["ad1"], root / "pickled", seed=0,
                 safe=False)
    return root


def reference_ids(adapter: Path | None, prompts: list[list[int]], max_new_tokens: int, quantization: str = "none"):
    """Greedy ``PeftModel.generate`` ids of each prompt alone, with ``adapter`` alone (None: the bare base)."""
    from lorakit import PeftModel
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.evaluate import load_base_model

    model, tok = load_base_model(str(TINY), "float32", QuantizationConfig(method=quantization))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(y[0, x.shape[1]:].tolist())
    return out
