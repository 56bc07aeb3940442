"""Shared fixtures: seeds, tiny models built from configs, and training-config writers (CPU, repeatable)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def make_tiny_llama(layers: int = 2, vocab: int = 97, seed: int = 0, hidden: int = 32):
    """A tiny LlamaForCausalLM built from a config (no download); fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(1))

def make_tiny_model(out: Path) -> Path:
    """hidden 32, 2 layers, the tokenizer of examples/tiny_model; seeded, so every test sees the same model."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


def write_config(path: Path, model_dir: Path, output_dir: Path, fmt: str = "prompt_completion",
                 **sections: dict) -> Path:
    """A small training config on examples/data; `sections` update the defaults section by section."""
    raw = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "lora_dropout": 0.1},
        "data": {"path": str(DATA / f"second_word_{fmt}_train.jsonl"), "max_examples": 32,
                 "validation_path": str(DATA / f"second_word_{fmt}_eval.jsonl")},
        "training": {"output_dir": str(output_dir), "max_steps": 4, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 16, "learning_rate": 1e-2, "logging_steps": 1,
                     "max_seq_length": 64, "disable_tqdm": True, "report_to": "none"},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def config_writer():
    """`write_config` as a fixture (test modules cannot import a conftest by name)."""
    return write_config


def llama_cpp_module(tmp: Path):
    """`llama_cpp`, installed or built now from the sdist (CPU, a few minutes); skip when that fails."""
    try:
        import llama_cpp

        return llama_cpp
    except ImportError:
        pass
    target = tmp / "llama_cpp_site"
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF")
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-binary", "llama-cpp-python",
                            "llama-cpp-python", "diskcache", "--target", str(target)],  # its one dep missing here
                           capture_output=True, text=True, env=env)
    if build.returncode != 0:
        pytest.skip("could not build llama-cpp-python from its sdist: " + build.stderr.strip()[-300:])
    sys.path.insert(0, str(target))
    import llama_cpp

    return llama_cpp
