"""Parity with PEFT (the oracle) found by a sweep of PEFT user code: what ``peft_config`` and
``adapter_config.json`` record, PEFT's model attributes and switches, and PEFT's warnings on doubtful input.
Tiny seeded models from transformers configs; ``init_lora_weights=False`` so adapters change the outputs.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers as tf

import lorakit

IDS = torch.tensor([[1, 5, 7, 9, 11, 3], [2, 4, 6, 8, 10, 12]])


def _llama(seed: int = 0) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    return tf.LlamaForCausalLM(config).eval()


def _t5() -> tf.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=64, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                         decoder_start_token_id=0)
    return tf.T5ForConditionalGeneration(config).eval()


def _gpt2() -> tf.GPT2LMHeadModel:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()


def _roberta_cls() -> tf.RobertaForSequenceClassification:
    torch.manual_seed(0)
    return tf.RobertaForSequenceClassification(tf.RobertaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, intermediate_size=64))


def _recorded(lib, model, tmp_path, **kwargs) -> tuple[object, object]:
    """(target_modules in ``peft_config``, in the saved adapter_config.json), lists sorted (PEFT keeps a set)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = lib.get_peft_model(model, lib.LoraConfig(r=4, **kwargs))
        pm.save_pretrained(tmp_path / lib.__name__)
    saved = json.loads((tmp_path / lib.__name__ / "adapter_config.json").read_text())
    in_memory = pm.peft_config["default"].target_modules
    return tuple(sorted(x) if not isinstance(x, str) else x for x in (in_memory, saved["target_modules"]))


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (_llama, {}),  # None: PEFT records its default for the model type
        (_t5, {}),
        (_gpt2, {}),
        (_llama, {"target_modules": "all-linear"}),  # < 20 layers: full names
        (_llama, {"target_modules": "all-linear", "exclude_modules": ["down_proj"]}),  # expanded before exclusion
        (_t5, {"target_modules": "all-linear"}),  # >= 20 layers: condensed to suffixes
        (_t5, {"target_modules": [f"{s}.block.{i}.layer.0.SelfAttention.{p}" for s in ("encoder", "decoder")
                                  for i in range(2) for p in "qkvo"] + ["decoder.block.0.layer.1.EncDecAttention.q"]}),
        (_llama, {"target_modules": r".*\.q_proj"}),
        (_roberta_cls, {"target_modules": "all-linear", "task_type": "SEQ_CLS"}),  # the head's layers listed too
    ],
)
def test_target_modules_recorded_as_peft(tmp_path, make, kwargs) -> None:
    assert _recorded(lorakit, make(), tmp_path, **kwargs) == _recorded(peft, make(), tmp_path, **kwargs)


@pytest.mark.parametrize("make, target", [(_llama, ["q_proj"]), (_gpt2, ["c_attn"])])
def test_fan_in_fan_out_recorded_as_peft(tmp_path, make, target) -> None:
    """PEFT corrects fan_in_fan_out to what the layer type needs, in memory and in the file, both ways."""
    for wrong in (True, False):
        recorded = {}
        for lib in (lorakit, peft):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pm = lib.get_peft_model(make(), lib.LoraConfig(r=4, target_modules=target, fan_in_fan_out=wrong))
                pm.save_pretrained(tmp_path / f"{lib.__name__}{wrong}")
            saved = json.loads((tmp_path / f"{lib.__name__}{wrong}" / "adapter_config.json").read_text())
            recorded[lib] = (pm.peft_config["default"].fan_in_fan_out, saved["fan_in_fan_out"])
        assert recorded[lorakit] == recorded[peft]


def _two_adapters(lib):
    pm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False, modules_to_save=["lm_head"]))
    torch.manual_seed(1)
    pm.add_adapter("other", lib.LoraConfig(r=2, target_modules=["k_proj", "v_proj"], init_lora_weights=False))
    return pm


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_set_adapter_takes_inference_mode(lib) -> None:
    pm = _two_adapters(lib)
    pm.set_adapter("other", inference_mode=True)
    assert pm.active_adapters == ["other"]
    assert not any(p.requires_grad for n, p in pm.named_parameters() if ".other." in n)
    pm.base_model.set_adapter(["default", "other"], inference_mode=True)
    assert pm.active_adapters == ["default", "other"]
    assert not any(p.requires_grad for p in pm.parameters())


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_deleting_the_active_adapter_warns(lib) -> None:
    pm = _two_adapters(lib)
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted. Setting active adapter "
                                         "to other."):
        pm.delete_adapter("default")
    if lib is lorakit:  # PEFT 0.21.2 says so but leaves [] here (the last layer it visits, lm_head, had no "other")
        assert pm.active_adapters == ["other"]


def test_model_attributes_as_peft() -> None:
    seen = {}
    for lib in (lorakit, peft):
        pm = _two_adapters(lib)
        base = pm.base_model
        seen[lib] = [sorted(base.targeted_module_names), pm.peft_type, pm.modules_to_save, base.active_adapter]
        base.set_adapter("other")
        seen[lib].append(base.active_adapter)
        base.set_adapter(["default", "other"])
        seen[lib].append(base.active_adapter)
    assert seen[lorakit] == seen[peft]
    assert seen[lorakit][2] == {"lm_head"} and seen[lorakit][3] == ["default"]


def test_disable_and_enable_adapter_layers_as_peft() -> None:
    outputs = {}
    for lib in (lorakit, peft):
        pm = _two_adapters(lib)
        pm.base_model.set_adapter(["default", "other"])
        with torch.no_grad():
            pm.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2)  # the copy differs from the base
            out = [pm(IDS).logits]
            pm.disable_adapter_layers()
            out.append(pm(IDS).logits)
            with pm.disable_adapter():  # nested in the disabled state, stays disabled
                out.append(pm(IDS).logits)
            out.append(pm(IDS).logits)
            pm.enable_adapter_layers()
            out.append(pm(IDS).logits)
            pm.merge_adapter()
            pm.base_model.disable_adapter_layers()  # merged: the base model's output all the same
            out.append(pm(IDS).logits)
            pm.base_model.enable_adapter_layers()
            out.append(pm(IDS).logits)
        outputs[lib] = out
    for ours, theirs in zip(outputs[lorakit], outputs[peft], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    base = _llama()(IDS).logits
    torch.testing.assert_close(outputs[lorakit][1], base, atol=1e-5, rtol=0)
    assert not torch.allclose(outputs[lorakit][0], base, atol=1e-3)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_disable_adapter_layers_with_trained_biases_warns(lib) -> None:
    pm = lib.get_peft_model(_gpt2(), lib.LoraConfig(r=4, target_modules=["c_attn"], bias="all"))
    with pytest.warns(UserWarning, match="disabling adapter layers with bias configured to be 'all'"):
        pm.disable_adapter_layers()
    pm.enable_adapter_layers()
    with pytest.warns(UserWarning, match="disabling adapter layers with bias configured to be 'all'"):
        with pm.disable_adapter():
            pass


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_lora_bias_on_layers_without_bias_warns(lib) -> None:
    with pytest.warns(UserWarning, match="lora_bias=True.*(no bias|merging)"):
        lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_exclude_modules_matching_nothing_warns(lib) -> None:
    with pytest.warns(UserWarning, match="exclude_modules=.* but no modules were excluded"):
        lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"], exclude_modules=["qproj"]))


def test_layers_to_transform_keeps_exact_names_as_peft(tmp_path) -> None:
    """PEFT filters only name-suffix matches by layer; an entry naming a module fully is adapted in any layer. A
    PEFT folder made so loads, with PEFT's outputs."""
    kwargs = dict(r=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1],
                  init_lora_weights=False)
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.get_peft_model(_llama(), lorakit.LoraConfig(**kwargs))
    assert ours.base_model.targeted_module_names == sorted(theirs.base_model.targeted_module_names)
    loaded = lorakit.PeftModel.from_pretrained(_llama(), tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_get_peft_model_on_a_peft_model_warns(lib) -> None:
    pm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="modify a model with PEFT for a second time"):
        lib.get_peft_model(pm, lib.LoraConfig(r=4, target_modules=["k_proj"]))


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt_neo":
        config = tf.GPTNeoConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                 attention_types=[[["global", "local"], 1]], max_position_embeddings=32)
        return tf.GPTNeoForCausalLM(config)
    if kind == "electra":
        return tf.ElectraModel(tf.ElectraConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64))
    return tf.CodeGenForCausalLM(tf.CodeGenConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                  n_positions=32))


@pytest.mark.parametrize("kind", ["gpt_neo", "electra", "codegen"])
def test_default_target_modules_for_more_model_types_as_peft(kind) -> None:
    """target_modules=None works for every model type PEFT has a default for."""
    seen = {}
    for lib in (lorakit, peft):
        pm = lib.get_peft_model(_tiny(kind), lib.LoraConfig(r=4))
        seen[lib] = (sorted(pm.base_model.targeted_module_names), sorted(pm.peft_config["default"].target_modules))
    assert seen[lorakit] == seen[peft]


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_config_from_pretrained_takes_peft_keyword(tmp_path, lib) -> None:
    lib.LoraConfig(r=3, target_modules=["q_proj"]).save_pretrained(str(tmp_path / "sub"))
    config = lib.LoraConfig.from_pretrained(pretrained_model_name_or_path=str(tmp_path), subfolder="sub")
    assert config.r == 3


def test_loading_a_base_changing_init_says_it_is_not_rerun(tmp_path) -> None:
    """PEFT re-runs init_lora_weights='pissa' on load (it subtracts the principal part from the base again); lorakit
    does not, so a PEFT folder saved that way gives other outputs on the original base: lorakit says so."""
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'.*without re-running"):
        lorakit.PeftModel.from_pretrained(_llama(), tmp_path)
    plain = lorakit.get_peft_model(_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.PeftModel.from_pretrained(_llama(), tmp_path / "plain")


def test_task_forward_takes_positional_arguments_in_peft_order() -> None:
    """PEFT's task classes give positional arguments their own meaning (CausalLM: input_ids, attention_mask,
    inputs_embeds, labels; Seq2SeqLM: ... decoder_input_ids 4th), not the base model's order."""
    outputs = {}
    for lib in (lorakit, peft):
        lm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                         task_type="CAUSAL_LM"))
        s2s = lib.get_peft_model(_t5(), lib.LoraConfig(r=4, init_lora_weights=False, task_type="SEQ_2_SEQ_LM"))
        outputs[lib] = (lm(IDS, torch.ones_like(IDS), None, IDS).loss, s2s(IDS, None, None, IDS[:, :3]).logits,
                        lm(input_ids=IDS, task_ids=None).logits)
    for ours, theirs in zip(outputs[lorakit], outputs[peft], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["embed_tokens", "lm_head"])
def test_merging_a_trained_copy_of_a_tied_embedding_unties_the_config_as_peft(head) -> None:
    """The trained copy leaves input and output embeddings apart; with tie_word_embeddings=True, tie_weights() (or
    a save/reload elsewhere) would tie them again and change the merged model's outputs."""
    results = {}
    for lib in (lorakit, peft):
        torch.manual_seed(0)
        config = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        pm = lib.get_peft_model(tf.LlamaForCausalLM(config).eval(),
                                lib.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[head]))
        with torch.no_grad():
            getattr(pm.base_model.model.model if head == "embed_tokens" else pm.base_model.model, head) \
                .modules_to_save["default"].weight.add_(0.1)
        expected = pm(IDS).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = pm.merge_and_unload()
        merged.tie_weights()
        torch.testing.assert_close(merged(IDS).logits, expected, atol=1e-5, rtol=0)
        results[lib] = (merged.config.tie_word_embeddings,
                        any("no longer tied after merging" in str(w.message) for w in caught))
    assert results[lorakit] == results[peft] == (False, True)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_merging_lora_into_a_tied_embedding_keeps_the_outputs(tmp_path, target) -> None:
    """PEFT 0.21.2 merges into the weight shared by embed_tokens and lm_head, so the other layer changes too and its
    merged model differs from the unmerged one (by ~9 and ~500 here); lorakit unties first."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    pm = lorakit.get_peft_model(tf.LlamaForCausalLM(config).eval(),
                                lorakit.LoraConfig(r=4, target_modules=["q_proj", target], init_lora_weights=False))
    expected = pm(IDS).logits
    with pytest.warns(UserWarning, match="tied input/output embedding"):
        pm.merge_adapter()
    torch.testing.assert_close(pm(IDS).logits, expected, atol=1e-5, rtol=0)
    pm.unmerge_adapter()
    torch.testing.assert_close(pm(IDS).logits, expected, atol=1e-5, rtol=0)
    merged = pm.merge_and_unload()
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(IDS).logits, expected, atol=1e-5, rtol=0)


def test_all_linear_token_classification_folder_loads_in_peft(tmp_path) -> None:
    """PEFT 0.21.2 cannot create this adapter (LoRA lands on the classifier, then modules_to_save refuses it);
    lorakit keeps the head out of LoRA, records it among the linear layers as PEFT would, and PEFT loads the file."""
    torch.manual_seed(0)
    bert = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = tf.BertForTokenClassification(tf.BertConfig(**bert)).eval()
    ours = lorakit.get_peft_model(model, lorakit.LoraConfig(r=4, target_modules="all-linear", task_type="TOKEN_CLS",
                                                            init_lora_weights=False))
    assert "classifier" in ours.peft_config["default"].target_modules
    ours.save_pretrained(tmp_path)
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(tf.BertForTokenClassification(tf.BertConfig(**bert)).eval(), tmp_path)
    torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lib", [lorakit, peft])
def test_a_missing_adapter_raises_a_value_error_as_peft(tmp_path, lib) -> None:
    """PEFT code often catches ValueError to create an adapter when none was saved; lorakit's error is a
    FileNotFoundError too."""
    with pytest.raises(ValueError):
        lib.PeftModel.from_pretrained(_llama(), str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError):
        lib.PeftModel.from_pretrained(_llama(), str(tmp_path))  # a folder without adapter_config.json
    pm = lib.get_peft_model(_llama(), lib.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError):
        pm.load_adapter(str(tmp_path), adapter_name="other")


@pytest.mark.parametrize(
    "field, value", [("exclude_modules", []), ("use_rslora", None), ("lora_bias", None), ("layers_pattern", "")]
)
def test_peft_folder_with_empty_or_null_fields_loads(tmp_path, field, value) -> None:
    """PEFT takes exclude_modules=[] and layers_pattern="" as none and reads these flags by truth value, and saves
    them as given."""
    theirs = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                                                           **{field: value}))
    theirs.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[field] == value
    ours = lorakit.PeftModel.from_pretrained(_llama(), tmp_path)
    torch.testing.assert_close(ours(IDS).logits, theirs(IDS).logits, atol=1e-5, rtol=0)
