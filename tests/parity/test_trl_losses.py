"""Preference losses against TRL 1.16: the same batch gives TRL's loss, LoRA gradients and reward metrics.

DPO, IPO and KTO go through TRL's real trainers (``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``) on a
PEFT model; lorakit loads that adapter and computes `PreferenceLoss` on the rows of `lorakit.train.preference_data`
(token ids checked equal to TRL's). ORPO and SimPO live in ``trl.experimental`` trainers built around full logits:
their loss functions (``ORPOTrainer.odds_ratio_loss``, ``CPOTrainer.cpo_loss``) are called on the log-probs of
their own ``get_batch_logps`` (full logits) of the same lorakit model. Tolerance 1e-5: fp32, the same sums in
another order (chunked LM head vs full logits).
"""

import re
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from lorakit.train.config import PreferenceConfig  # noqa: E402
from lorakit.train.data import DataConfig  # noqa: E402
from lorakit.train.losses.preference import MetricSums, PreferenceLoss, dpo_loss  # noqa: E402
from lorakit.train.preference_data import add_kl_rows, collate_preference, tokenize_record  # noqa: E402

TOL = {"rtol": 1e-5, "atol": 1e-5}
PAIRS = [  # chosen completions of one token + EOS each (ORPO's NLL is then the same per pair and per batch)
    {"prompt": "second word: horse tree bear\nanswer:", "chosen": " tree", "rejected": " bear"},
    {"prompt": "second word: red owl fox happy\nanswer:", "chosen": " owl", "rejected": " red fox"},
    {"prompt": "second word: cat dog\nanswer:", "chosen": " dog", "rejected": " cat cat dog"},
]
KTO = [
    {"prompt": "second word: horse tree bear\nanswer:", "completion": " tree", "label": True},
    {"prompt": "second word: red owl fox happy\nanswer:", "completion": " red fox", "label": False},
    {"prompt": "second word: cat dog\nanswer:", "completion": " dog", "label": True},
    {"prompt": "second word: big stone river\nanswer:", "completion": " river stone", "label": False},
]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """TRL's trainers create accelerate's process-wide state; reset it so later tests build their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _lorakit_model(model_dir: Path, adapter_dir: Path):
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir),
                                     is_trainable=True)


def _grads(model) -> dict[str, torch.Tensor]:
    """LoRA gradients by PEFT name (lorakit: ``x.adapters.default.lora_A`` -> ``x.lora_A.default``)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = re.sub(r"adapters\.default\.(lora_[AB])", r"\1.default", name)
            out[name] = p.grad.detach().clone()
    return out


def _peft_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                           init_lora_weights=False)  # B != 0: the policy differs from the reference


def _trl_step(trainer, n):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return batch, loss.detach(), _grads(trainer.model), metrics


def _lorakit_step(model, method, pref, rows, tokenizer):
    stats = MetricSums()
    module = PreferenceLoss(model, method, pref, chunked=True, stats=stats, eval_stats=MetricSums()).train()
    batch = collate_preference(rows, method, tokenizer.pad_token_id)
    loss = module(**batch) / len(rows)
    loss.backward()
    return batch, loss.detach(), _grads(model), stats


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_matches_trl_dpo_trainer(tiny_model_dir, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lorakit.train.preference import PAIR_METRICS

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.3, loss_type=[loss_type], use_cpu=True,
                     bf16=False, per_device_train_batch_size=len(PAIRS))
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tok, peft_config=_peft_config())
    trainer.model.save_pretrained(tmp_path / "adapter")  # the adapter TRL created, before any step
    trl_batch, trl_loss, trl_grads, trl_metrics = _trl_step(trainer, len(PAIRS))

    pref = PreferenceConfig(beta=0.3, loss_type=loss_type)
    rows = [tokenize_record(r, "dpo", tok, 64, DataConfig(path="x")) for r in PAIRS]
    model = _lorakit_model(tiny_model_dir, tmp_path / "adapter")
    batch, loss, grads, stats = _lorakit_step(model, "dpo", pref, rows, tok)

    def unpadded(ids, mask):
        return [row[: int(m.sum())].tolist() for row, m in zip(ids, mask, strict=True)]

    # the same token ids and the same completion tokens as TRL's (prompt and completion tokenized apart)
    assert unpadded(batch["input_ids"], batch["attention_mask"]) == unpadded(trl_batch["input_ids"],
                                                                            trl_batch["attention_mask"])
    assert unpadded((batch["labels"] != -100).long(), batch["attention_mask"]) == unpadded(
        trl_batch["completion_mask"], trl_batch["attention_mask"])
    torch.testing.assert_close(loss, trl_loss, **TOL)
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], **TOL, msg=name)
    ours = stats.pop(PAIR_METRICS)
    assert ours["rewards/margins"] != 0  # the policy is not the reference: a real comparison
    for key in PAIR_METRICS[:-1]:
        assert ours[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


def test_kto_matches_trl_kto_trainer(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to=[], beta=0.3, use_cpu=True, bf16=False,
                     per_device_train_batch_size=len(KTO), desirable_weight=1.5, undesirable_weight=0.7,
                     train_sampling_strategy="sequential")
    trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(KTO), processing_class=tok, peft_config=_peft_config())
    trainer.model.save_pretrained(tmp_path / "adapter")
    _, trl_loss, trl_grads, trl_metrics = _trl_step(trainer, len(KTO))

    pref = PreferenceConfig(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    rows = [tokenize_record(r, "kto", tok, 64, DataConfig(path="x")) for r in KTO]
    add_kl_rows(rows, 64)  # prompt i with completion i - 1: TRL's pairing within one batch
    model = _lorakit_model(tiny_model_dir, tmp_path / "adapter")
    _, loss, grads, stats = _lorakit_step(model, "kto", pref, rows, tok)

    torch.testing.assert_close(loss, trl_loss, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], **TOL, msg=name)
    ours = stats.pop(("kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"))
    for key, value in ours.items():
        assert value == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("method", ["orpo", "simpo"])
def test_reference_free_losses_match_trl(tiny_model_dir, tmp_path, method):
    """ORPO / SimPO: TRL's loss functions on TRL's full-logit log-probs of the same model and batch."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), _peft_config()).save_pretrained(
        tmp_path / "adapter")
    model = _lorakit_model(tiny_model_dir, tmp_path / "adapter")
    rows = [tokenize_record(r, method, tok, 64, DataConfig(path="x")) for r in PAIRS]
    pref = PreferenceConfig(beta=0.4, simpo_gamma=0.3, label_smoothing=0.1 if method == "simpo" else 0.0)
    batch, loss, grads, stats = _lorakit_step(model, method, pref, rows, tok)

    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, T, V)
    avg = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=True)  # (2B,)
    chosen, rejected = avg.chunk(2)
    device = types.SimpleNamespace(device=chosen.device)
    if method == "orpo":
        me = types.SimpleNamespace(beta=0.4, accelerator=device)
        losses, r_c, r_r, _, _ = ORPOTrainer.odds_ratio_loss(me, chosen, rejected)
        labels = batch["labels"][: len(rows)]  # TRL's NLL term (cross_entropy_loss) on the chosen completions
        nll = torch.nn.functional.cross_entropy(logits[: len(rows), :-1].flatten(0, 1), labels[:, 1:].flatten())
        trl_loss = nll - losses.mean()
    else:
        me = types.SimpleNamespace(beta=0.4, alpha=0.0, loss_type="simpo", simpo_gamma=0.3, label_smoothing=0.1,
                                   accelerator=device)
        losses, r_c, r_r = CPOTrainer.cpo_loss(me, chosen, rejected)
        trl_loss = losses.mean()
    trl_loss.backward()
    torch.testing.assert_close(loss, trl_loss.detach(), **TOL)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grads[name], grad, **TOL, msg=name)
    ours = stats.pop(("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"))
    trl = {"rewards/chosen": r_c.mean().item(), "rewards/rejected": r_r.mean().item(),
           "rewards/accuracies": (r_c > r_r).float().mean().item(), "rewards/margins": (r_c - r_r).mean().item()}
    for key, value in trl.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_dpo_label_smoothing_is_trl_conservative_sigmoid():
    """cDPO: TRL's sigmoid-with-label-smoothing formula (CPOTrainer.cpo_loss, on the policy/reference log-ratios)."""
    from trl.experimental.cpo import CPOTrainer

    g = torch.Generator().manual_seed(0)
    c, r, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    ours, _, _ = dpo_loss(c, r, rc, rr, beta=0.2, label_smoothing=0.15)
    me = types.SimpleNamespace(beta=0.2, alpha=0.0, loss_type="sigmoid", label_smoothing=0.15,
                               accelerator=types.SimpleNamespace(device=c.device))
    theirs, _, _ = CPOTrainer.cpo_loss(me, c - rc, r - rr)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
