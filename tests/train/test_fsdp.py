"""training.distributed=fsdp (FSDP2) on CPU: 2 processes under torchrun (gloo) against one process.

Tolerance 1e-5 (fp32) as in the DDP test of test_loop.py: both runs sum the same per-token losses and gradients,
in another order (reduce-scatter instead of one process's sums), which moves fp32 results by a few ulps per step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli.main import main
from lorakit.train.config import load_config
from lorakit.train.loop import train

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
NO_DROPOUT = {"lora_dropout": 0.0}
EVAL_FILE = REPO / "examples" / "data" / "second_word_prompt_completion_eval.jsonl"


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def _torchrun(*args: str) -> str:
    proc = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _one_and_two(config_writer, tmp_path, model_dir, training, quantization=None) -> tuple[Path, Path]:
    """The same run as 1 process x batch 4 (plain) and 2 processes x batch 2 (fsdp)."""
    sections = {"quantization": quantization} if quantization else {}
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = config_writer(tmp_path / "one.yaml", model_dir, one, lora=NO_DROPOUT,
                        training={**training, "per_device_train_batch_size": 4}, **sections)
    train(load_config(cfg))
    cfg = config_writer(tmp_path / "two.yaml", model_dir, two, lora=NO_DROPOUT,
                        training={**training, "per_device_train_batch_size": 2, "distributed": "fsdp"}, **sections)
    _torchrun("-m", "lorakit.cli.main", "train", str(cfg))
    return one, two


def _assert_same_adapter(a: Path, b: Path, exact: bool = False) -> None:
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert any(v.abs().max() > 0 for k, v in wb.items() if "lora_B" in k)  # trained away from B = 0
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_fsdp_matches_one_process_and_saves_a_peft_adapter(config_writer, tmp_path, tiny_model_dir):
    """4 steps, checkpoint at 2: same losses and adapter as one process; the adapter loads in PEFT and
    `lorakit merge` folds it into the base; the checkpoint is sharded, resuming it under FSDP gives the
    uninterrupted run exactly, and resuming it with another number of processes is refused before the model
    loads."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    one, two = _one_and_two(config_writer, tmp_path, tiny_model_dir, {"max_steps": 4, "save_steps": 2})
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=1e-5)
    _assert_same_adapter(one, two)
    ckpt = two / "checkpoint-2"
    assert (ckpt / "sharded").is_dir() and not (ckpt / "trainable.safetensors").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["distributed"] == "fsdp"

    ids = torch.randint(2, 400, (2, 12))
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(two)).eval()
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(two)).eval()
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(two), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)

    resumed = tmp_path / "resumed"  # resume checkpoint-2 under FSDP: the uninterrupted run, bit for bit
    resumed.mkdir()
    shutil.copytree(ckpt, resumed / "checkpoint-2")
    (resumed / ".tmp-checkpoint-4").mkdir()  # a half-written checkpoint, as a kill leaves it
    training = {"max_steps": 4, "save_steps": 2, "per_device_train_batch_size": 2, "distributed": "fsdp"}
    cfg = config_writer(tmp_path / "resumed.yaml", tiny_model_dir, resumed, lora=NO_DROPOUT, training=training)
    _torchrun("-m", "lorakit.cli.main", "train", str(cfg), "--resume")
    assert _losses(resumed) == {s: v for s, v in _losses(two).items() if s > 2}
    _assert_same_adapter(two, resumed, exact=True)

    shutil.rmtree(two / "checkpoint-4")
    with pytest.raises(ValueError, match="world_size=2, this run has 1"):
        train(load_config(tmp_path / "two.yaml", ["training.resume=true"]))


def test_fsdp_qlora_matches_one_process(config_writer, tmp_path, tiny_model_dir):
    """A 4-bit base (NF4, double quantization, packed bytes stored as bf16) sharded over 2 processes trains the
    same adapter as the unsharded 4-bit model in one process; activation checkpointing composes with it. The
    model ties its LM head to its input embeddings (as SmolLM2 / Qwen do): one weight, saved once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    tied = AutoModelForCausalLM.from_config(config)
    tied.save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    quant = {"method": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"}
    training = {"max_steps": 3, "gradient_checkpointing": True}
    one, two = _one_and_two(config_writer, tmp_path, tmp_path / "tied", training, quant)
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=1e-5)
    _assert_same_adapter(one, two)


@pytest.fixture
def quantized_folder(tmp_path, tiny_model_dir) -> Path:
    """The tiny model saved 4-bit (NF4, double quantization, uint8 storage: bitsandbytes' default, the layout of
    pre-quantized Hub models), as lorakit and transformers + bitsandbytes write it (tests/quant/test_quant_load)."""
    from transformers import AutoTokenizer

    from lorakit import BitsAndBytesConfig
    from lorakit.quant.load import load_model

    model, _ = load_model(tiny_model_dir, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=torch.float32))
    model.save_pretrained(tmp_path / "quantized")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "quantized")
    return tmp_path / "quantized"


def test_fsdp_trains_an_already_quantized_folder_as_one_process(config_writer, tmp_path, quantized_folder):
    """A 4-bit model folder is loaded as stored under FSDP (each process keeps its rows of the stored packed
    bytes and scales; nothing is re-quantized) and trains the same adapter as one process loading it whole."""
    assert "model.layers.0.mlp.up_proj.weight.absmax" in load_file(quantized_folder / "model.safetensors")
    quant = {"method": "nf4", "bnb_4bit_use_double_quant": True}
    one, two = _one_and_two(config_writer, tmp_path, quantized_folder, {"max_steps": 3}, quant)
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=1e-5)
    _assert_same_adapter(one, two)


def test_fsdp_asks_for_the_quantization_method_of_an_already_quantized_folder(quantized_folder):
    from lorakit.train.config import QuantizationConfig
    from lorakit.train.distributed import empty_base_model

    with pytest.raises(ValueError, match="already quantized .* set quantization.method: nf4"):
        empty_base_model(str(quantized_folder), "float32", QuantizationConfig(), None, None, False)


def test_fsdp_exact_match_generates_what_one_process_does(config_writer, tmp_path, tiny_model_dir, capsys):
    """evaluation.path under FSDP: each process generates its share of the prompts with its shards (synced
    generate), before and after training; the printed generations and both scores are those of one process."""
    evaluation = {"path": str(EVAL_FILE), "max_examples": 10, "batch_size": 4, "max_new_tokens": 6,
                  "generate_samples": 10}
    one, two = tmp_path / "one", tmp_path / "two"
    training = {"max_steps": 3}
    train(load_config(config_writer(tmp_path / "one.yaml", tiny_model_dir, one, lora=NO_DROPOUT, evaluation=evaluation,
                                    training={**training, "per_device_train_batch_size": 4})))
    want = [line for line in capsys.readouterr().out.splitlines() if line.startswith("    generated ")]
    cfg = config_writer(tmp_path / "two.yaml", tiny_model_dir, two, lora=NO_DROPOUT, evaluation=evaluation,
                        training={**training, "per_device_train_batch_size": 2, "distributed": "fsdp"})
    got = [line for line in _torchrun("-m", "lorakit.cli.main", "train", str(cfg)).splitlines()
           if line.startswith("    generated ")]
    assert len(want) == 10 and got == want
    summary = [json.loads((out / "summary.json").read_text()) for out in (one, two)]
    for key in ("exact_match_before", "exact_match_after"):
        assert summary[1][key] == summary[0][key] is not None


@pytest.mark.parametrize(("method", "preference"), [("dpo", {}), ("kto", {}),
                                                    ("dpo", {"precompute_ref_log_probs": True})],
                         ids=["dpo", "kto", "dpo-precomputed-reference"])
def test_fsdp_preference_training_matches_one_process(config_writer, tmp_path, tiny_model_dir, method, preference):
    """DPO (2 processes x 2 pairs = 1 x 4) and KTO under FSDP: the losses, TRL's metrics and the adapter of one
    process. KTO's KL term pairs each row with the previous completion of its per-device batch (as TRL does), so
    its one-process run keeps the per-device batch of 4 and accumulates 2 micro-batches instead. With the
    reference precomputed, each process computes its share of the rows' reference log-probs with its shards."""
    import yaml

    from tests.conftest import DATA

    pairs = [json.loads(line) for line in (DATA / "animal_preference_train.jsonl").read_text().splitlines()[:16]]
    if method == "kto":
        rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
                for i, p in enumerate(pairs)]
        one_batch, two_batch, accum = 4, 4, 2
    else:
        rows, one_batch, two_batch, accum = pairs, 4, 2, 1
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = []
    for name, extra in [("one", {"per_device_train_batch_size": one_batch, "gradient_accumulation_steps": accum}),
                        ("two", {"per_device_train_batch_size": two_batch, "distributed": "fsdp"})]:
        cfg = config_writer(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, lora=NO_DROPOUT,
                            data={"path": str(data), "validation_path": None, "max_examples": None},
                            training={"max_steps": 3, **extra})
        raw = yaml.safe_load(cfg.read_text())
        raw["method"], raw["preference"] = method, preference
        raw["data"].pop("max_examples")
        cfg.write_text(yaml.safe_dump(raw))
        if name == "one":
            train(load_config(cfg))
        else:
            _torchrun("-m", "lorakit.cli.main", "train", str(cfg))
        outs.append([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    logs = [[r for r in records if "train_loss" in r] for records in outs]
    assert len(logs[0]) == len(logs[1]) == 3 and "rewards/chosen" in logs[1][0]
    for a, b in zip(*logs, strict=True):
        for key in ("train_loss", "grad_norm", "rewards/chosen", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    reference = json.loads((tmp_path / "two" / "summary.json").read_text())["reference"]
    assert reference == ("precomputed: adapter disabled" if preference else "adapter disabled")


def test_fsdp_dpo_after_sft_from_an_adapter_matches_one_process(config_writer, tmp_path, tiny_model_dir):
    """model.adapter_name_or_path under FSDP: each process loads its rows of the saved adapter; DPO from the SFT
    adapter (its log-probs precomputed as the reference, sharded) gives one process's losses and adapter."""
    import yaml

    from tests.conftest import DATA

    sft = tmp_path / "sft"
    train(load_config(config_writer(tmp_path / "sft.yaml", tiny_model_dir, sft, lora=NO_DROPOUT,
                                    training={"max_steps": 2})))
    data = {"path": str(DATA / "animal_preference_train.jsonl"), "max_examples": 16, "validation_path": None}
    model = {"name_or_path": str(tiny_model_dir), "adapter_name_or_path": str(sft)}
    for name, extra in [("one", {"per_device_train_batch_size": 4}),
                        ("two", {"per_device_train_batch_size": 2, "distributed": "fsdp"})]:
        cfg = config_writer(tmp_path / f"{name}.yaml", tiny_model_dir, tmp_path / name, model=model, data=data,
                            lora=NO_DROPOUT, training={"max_steps": 3, **extra})
        raw = yaml.safe_load(cfg.read_text())
        raw["method"] = "dpo"
        cfg.write_text(yaml.safe_dump(raw))
        if name == "one":
            train(load_config(cfg))
        else:
            _torchrun("-m", "lorakit.cli.main", "train", str(cfg))
    logs = [[r for r in (json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines())
             if "train_loss" in r] for n in ("one", "two")]
    assert logs[1][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference (SFT)
    for a, b in zip(*logs, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    start = load_file(sft / "adapter_model.safetensors")
    assert any((load_file(tmp_path / "two" / "adapter_model.safetensors")[k] - v).abs().max() > 1e-4
               for k, v in start.items())  # DPO moved the SFT adapter
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["reference"] == "precomputed: model.adapter_name_or_path as loaded"


def test_fsdp_bf16_mixed_precision_on_a_4bit_base(config_writer, tmp_path, tiny_model_dir):
    """training.bf16 under FSDP: parameters all-gathered in bf16, gradients reduced in fp32 (MixedPrecisionPolicy,
    on CPU as on a GPU), the packed 4-bit bytes and their scales gathered unchanged. The losses follow one process
    under bf16 autocast to rel 2e-4 (measured 3e-5: the same bf16 products, summed in another order), and the
    saved adapter is fp32."""
    quant = {"method": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"}
    one, two = tmp_path / "one", tmp_path / "two"
    training = {"max_steps": 3, "bf16": True}
    cfg = config_writer(tmp_path / "one.yaml", tiny_model_dir, one, lora=NO_DROPOUT, quantization=quant,
                        training={**training, "per_device_train_batch_size": 4})
    # its own process: accelerate keeps one mixed-precision setting per process, and other tests train in fp32 here
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli.main", "train", str(cfg)], capture_output=True,
                          text=True, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config_writer(tmp_path / "two.yaml", tiny_model_dir, two, lora=NO_DROPOUT, quantization=quant,
                        training={**training, "per_device_train_batch_size": 2, "distributed": "fsdp"})
    out = _torchrun("-m", "lorakit.cli.main", "train", str(cfg))
    assert "parameters are all-gathered in bf16 and gradients reduced in fp32" in out
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=2e-4)
    saved = load_file(two / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32} and saved.keys() == load_file(
        one / "adapter_model.safetensors").keys()


def test_fsdp_modules_to_save_on_a_tied_head_matches_one_process_and_resumes(config_writer, tmp_path, tiny_model_dir):
    """lora.modules_to_save=[lm_head] on a model whose head is tied to its input embeddings: the trainable copy and
    the frozen original are read from the embeddings' tensor, the embeddings stay in the group of the tie; same
    losses and adapter (head copy included, PEFT's key) as one process; a resume from the sharded checkpoint gives
    the uninterrupted run exactly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tied")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "tied")
    lora = {**NO_DROPOUT, "modules_to_save": ["lm_head"]}
    runs = {}
    for name, extra in [("one", {"per_device_train_batch_size": 4}),
                        ("two", {"per_device_train_batch_size": 2, "distributed": "fsdp"})]:
        runs[name] = config_writer(tmp_path / f"{name}.yaml", tmp_path / "tied", tmp_path / name, lora=lora,
                                   training={"max_steps": 3, "save_steps": 2, **extra})
    train(load_config(runs["one"]))
    _torchrun("-m", "lorakit.cli.main", "train", str(runs["two"]))
    for step, loss in _losses(tmp_path / "one").items():
        assert _losses(tmp_path / "two")[step] == pytest.approx(loss, rel=1e-5)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "two" / "adapter_model.safetensors")
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-2", resumed / "checkpoint-2")
    cfg = config_writer(tmp_path / "resumed.yaml", tmp_path / "tied", resumed, lora=lora,
                        training={"max_steps": 3, "save_steps": 2, "per_device_train_batch_size": 2,
                                  "distributed": "fsdp"})
    _torchrun("-m", "lorakit.cli.main", "train", str(cfg), "--resume")
    _assert_same_adapter(tmp_path / "two", resumed, exact=True)


@pytest.mark.parametrize(("quantized", "lora"), [
    (False, {"use_dora": True, "init_lora_weights": False}),
    (True, {"use_dora": True, "init_lora_weights": False}),
    (False, {"init_lora_weights": "pissa"}),
    (False, {"use_dora": True, "init_lora_weights": "olora"}),
    (False, {"init_lora_weights": False, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    (False, {"use_dora": True, "init_lora_weights": False, "target_modules": ["q_proj", "embed_tokens"]}),
    (True, {"init_lora_weights": "orthogonal"}),
    (True, {"init_lora_weights": "pissa"}),
    pytest.param(True, {"use_dora": True, "init_lora_weights": "olora"}, marks=pytest.mark.slow),
], ids=["dora-16-bit", "dora-4-bit", "pissa", "olora-dora", "embedding", "dora-embedding", "orthogonal-4-bit",
        "pissa-4-bit", "olora-dora-4-bit"])
def test_fsdp_inits_that_read_the_base_match_one_process(config_writer, tmp_path, tiny_model_dir, quantized, lora):
    """Inits that read the base weight under FSDP: each decoder layer is gathered once after loading and the init
    runs on a copy of each layer -- DoRA's magnitude m = ||W + s B A||_c (B non-zero; a 4-bit base dequantized from
    its sharded state), PiSSA's / OLoRA's factors from W and the residual base W - s B A -- and each process keeps
    its rows; same losses and adapter (magnitudes included) as one process. Adapters on the input embeddings
    (their own sharded group; DoRA's magnitude from the gathered embedding matrix) too; orthogonal init (drawn
    from the RNG in a one-process run's order, the base untouched: a 4-bit base too)."""
    quant = {"method": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_quant_storage": "bfloat16"}
    lora = {**NO_DROPOUT, **lora}
    one, two = tmp_path / "one", tmp_path / "two"
    sections = {"quantization": quant} if quantized else {}
    train(load_config(config_writer(tmp_path / "one.yaml", tiny_model_dir, one, lora=lora,
                                    training={"max_steps": 3, "per_device_train_batch_size": 4}, **sections)))
    cfg = config_writer(tmp_path / "two.yaml", tiny_model_dir, two, lora=lora, **sections,
                        training={"max_steps": 3, "per_device_train_batch_size": 2, "distributed": "fsdp"})
    _torchrun("-m", "lorakit.cli.main", "train", str(cfg))
    for step, loss in _losses(one).items():
        assert _losses(two)[step] == pytest.approx(loss, rel=1e-5)
    _assert_same_adapter(one, two)
    saved = load_file(two / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in saved) == bool(lora.get("use_dora"))
    assert any("lora_embedding_A" in k for k in saved) == ("embed_tokens" in lora.get("target_modules", []))


def test_user_loop_recipe_and_sharded_load_memory(tmp_path, tiny_model_dir):
    """(1) README recipe: fully_shard on a get_peft_model model (16-bit and 4-bit base) in a plain AdamW loop ==
    one process (2 steps).
    (2) Each of 2 processes reads only its rows: its peak RSS growth while loading stays below one copy of the
    model (a ~120 MB fp32 model; a whole-model load per process needs at least that). One launch for both."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model").save_pretrained(tmp_path / "model")
    del model
    out = tmp_path / "out"
    _torchrun("-m", "tests.train.fsdp_worker", str(out), str(tiny_model_dir), str(tmp_path / "model"))
    recipe = json.loads(out.with_suffix(".recipe.json").read_text())
    assert recipe["max_diff"] < 1e-5 and recipe["max_diff_4bit"] < 1e-5
    for rank in range(2):
        growth = json.loads(out.with_suffix(f".{rank}.json").read_text())["peak_rss_growth"]
        print(f"rank {rank}: peak RSS growth {growth / 2**20:.1f} MiB, model {size / 2**20:.1f} MiB")
        assert growth < size, (growth, size)


def test_exposed_4bit_layer_computes_the_same():
    """Linear4bit.expose_quant_state (the form FSDP shards) gives the same outputs and gradients."""
    from lorakit.quant.linear4bit import Linear4bit

    torch.manual_seed(0)
    for nested in (False, True):
        layer = Linear4bit.from_linear(torch.nn.Linear(128, 64), compute_dtype=torch.float32,
                                       compress_statistics=nested, quant_storage=torch.bfloat16)
        x = torch.randn(3, 128, requires_grad=True)
        y = layer(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        layer.expose_quant_state()
        assert type(layer.weight) is torch.nn.Parameter and layer.weight_absmax.dtype in (torch.int32, torch.uint8)
        x2 = x.detach().clone().requires_grad_(True)
        y2 = layer(x2)
        (gx2,) = torch.autograd.grad(y2.square().sum(), x2)
        assert torch.equal(y, y2) and torch.equal(gx, gx2)
        with pytest.raises(ValueError, match="keeps its packed bytes in torch.bfloat16"):
            layer.half()


def test_fsdp_refusals(config_writer, tmp_path, tiny_model_dir, capsys):
    """What is not implemented is refused by name (with 2 processes); one process trains and says why."""
    from lorakit.train.plan import prepare_run

    base = {"distributed": "fsdp"}
    quant = {"method": "nf4"}
    for extra, message in [({"lora": {"init_lora_weights": "eva"}}, "init_lora_weights='eva' is not"),
                           ({"lora": {"init_lora_weights": "pissa_niter_4"}, "quantization": quant},
                            "init_lora_weights='pissa_niter_4' is not"),
                           ({"quantization": {"method": "int8"}}, "quantization=int8 is not implemented")]:
        cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "run", training=base, **extra)
        with pytest.raises(NotImplementedError, match=message):
            prepare_run(load_config(cfg), world_size=2)
    cfg = config_writer(tmp_path / "c.yaml", tiny_model_dir, tmp_path / "run1", training={**base, "max_steps": 1})
    train(load_config(cfg))
    assert "training.distributed=fsdp with one process: nothing to shard" in capsys.readouterr().out


@pytest.mark.slow
def test_fsdp_resume_after_kill_9(config_writer, tmp_path, tiny_model_dir):
    """Kill -9 a 2-process FSDP run after its first checkpoint, `--resume`: same adapter as a full run."""
    training = {"max_steps": 8, "save_steps": 2, "per_device_train_batch_size": 2, "distributed": "fsdp"}
    full = tmp_path / "full"
    _torchrun("-m", "lorakit.cli.main", "train",
              str(config_writer(tmp_path / "full.yaml", tiny_model_dir, full, training=training)))
    out = tmp_path / "killed"
    cfg = config_writer(tmp_path / "killed.yaml", tiny_model_dir, out, training=training)
    cmd = [*TORCHRUN, "-m", "lorakit.cli.main", "train", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
    proc.wait()
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it could be killed"
    _torchrun("-m", "lorakit.cli.main", "train", str(cfg), "--resume")
    assert _losses(out) == _losses(full)
    _assert_same_adapter(full, out, exact=True)
