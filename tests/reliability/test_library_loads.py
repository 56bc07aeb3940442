"""Library loads of bad input: NaN/inf configs, damaged and non-finite weights, misleading path errors (issue 17,
items 1 and 10)."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli.generate import parse_adapters
from lorakit.cli.main import main

from ..conftest import make_tiny_llama


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lora_alpha_is_refused_naming_the_field(alpha) -> None:
    with pytest.raises(ValueError, match="lora_alpha=.* must be a finite number"):
        LoraConfig(lora_alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\]=.* must be a finite number"):
        LoraConfig(alpha_pattern={"q_proj": alpha})


def test_lora_alpha_zero_warns_of_a_no_op_adapter() -> None:
    with pytest.warns(UserWarning, match="lora_alpha=0 makes scaling = 0: the adapter changes nothing"):
        LoraConfig(lora_alpha=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig(lora_alpha=16)


@pytest.fixture
def saved(tmp_path):
    """A saved adapter folder (non-zero B)."""
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_0xff_bytes_in_the_weights_are_refused_on_load(saved) -> None:
    """0xFF bytes are a NaN in fp32: the adapter loaded and generated garbage."""
    weights = saved / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = b"\xff" * 16
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{weights}.* has non-finite weights .*NaN or inf"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_safetensors_names_its_path(saved, damage) -> None:
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07garbage" * 50)
    with pytest.raises(ValueError, match=f"{weights} is damaged or incomplete"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)


def test_a_missing_folder_says_it_does_not_exist(tmp_path) -> None:
    for path in (tmp_path / "nope", "work/adapter-v1.5/", "./adapter"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            PeftModel.from_pretrained(make_tiny_llama(), path)


def test_a_folder_without_adapter_config_is_not_an_adapter_folder(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not an adapter folder: it has no adapter_config.json"):
        PeftModel.from_pretrained(make_tiny_llama(), tmp_path)


def test_an_offline_hub_id_says_offline_and_fails_fast(monkeypatch) -> None:
    """With HF_HUB_OFFLINE set after huggingface_hub was imported, a Hub id was retried for ~50 s and then
    reported as "No adapter_config.json found ...: is this an adapter folder?"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"the Hub is offline \(HF_HUB_OFFLINE=1"):
        PeftModel.from_pretrained(make_tiny_llama(), "someone-lorakit-test/no-such-adapter")
    assert time.perf_counter() - start < 10  # no network call: the cache answers at once (10 s: a loaded machine)


@pytest.mark.parametrize("key", ["lora_alpha", "r", "target_modules"])
def test_a_missing_required_config_key_is_refused(saved, key) -> None:
    """A missing lora_alpha loaded silently as 8 (the default), so the weights computed something else."""
    path = saved / "adapter_config.json"
    config = json.loads(path.read_text())
    del config[key]
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"adapter_config.json lacks '{key}'"):
        PeftModel.from_pretrained(make_tiny_llama(), saved)


def test_adapter_paths_with_dots_are_paths(tmp_path) -> None:
    """`--adapter work/adapter-v1.5` said "choose a name without '.'"."""
    assert parse_adapters(["work/adapter-v1.5"]) == [("adapter-v1_5", "work/adapter-v1.5")]
    assert parse_adapters(["v15=work/adapter-v1.5"]) == [("v15", "work/adapter-v1.5")]
    with pytest.raises(ValueError, match=r"the adapter name 'v1.5' \(NAME in NAME=PATH\) must not contain '.'"):
        parse_adapters(["v1.5=work/adapter"])


def test_train_names_a_damaged_adapter_of_model_adapter_name_or_path(tmp_path, tiny_model_dir, config_writer,
                                                                     capsys) -> None:
    """The fix lives in the shared loader (lorakit.io.adapter.load_adapter_weights), so `lorakit train` gets it."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                    lora_dropout=0.1)).save_pretrained(adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "run",
                        model={"name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(adapter)})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is damaged or incomplete" in err and "Traceback" not in err, err
