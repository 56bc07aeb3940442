"""lorakit as a library, in one screen: wrap the shipped tiny model, train a few steps, save, reload, merge.

    python examples/quickstart.py

Runs on a CPU in seconds. The same code runs with PEFT by changing the import.
"""

from __future__ import annotations

import pathlib
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model

MODEL = pathlib.Path(__file__).parent / "tiny_model"


def main() -> None:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type=TaskType.CAUSAL_LM)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    chat = [{"role": "user", "content": "second word: cat red tree"}, {"role": "assistant", "content": "red"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    batch = tokenizer([text] * 8, return_tensors="pt")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(10):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, 9):
            print(f"step {step}: loss {loss.item():.3f}")

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        print(f"saved adapter: {sorted(p.name for p in pathlib.Path(folder).iterdir())}")
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(MODEL), folder)
    with torch.no_grad():
        ours = model(**batch).logits
        again = reloaded(**batch).logits
        merged = reloaded.merge_and_unload()
        print(f"reloaded vs trained, max |logit diff|: {(again - ours).abs().max().item():.2e}")
        print(f"merged ({type(merged).__name__}) vs unmerged: {(merged(**batch).logits - ours).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
