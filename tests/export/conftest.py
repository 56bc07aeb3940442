"""Fixtures for the export tests: a tiny Llama folder (examples/tiny_model's byte-level BPE tokenizer), a LoRA
adapter trained-looking (B non-zero), and helpers to load a GGUF back with transformers' own loader."""

from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_model


def load_back(file: Path):
    """transformers' GGUF loader (the oracle): ``from_pretrained(folder, gguf_file=name)`` in float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()


def save_adapter(base_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A LoRA adapter on every linear of the model in ``base_dir`` with random non-zero A and B."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False} | lora_kwargs
    peft = get_peft_model(model, LoraConfig(**kwargs))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(20)  # init_lora_weights=False gives small B: make the merge visible in the logits
    peft.save_pretrained(out)
    return out


def merged(base_dir: Path, adapter: Path):
    """The float32 reference: the base with the adapter merged by lorakit (merge_and_unload)."""
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("export_tiny"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter(tiny_dir, tmp_path_factory.mktemp("export_adapter") / "adapter")


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    return torch.randint(3, 400, (2, 12), generator=torch.Generator().manual_seed(3))
