"""`--format gguf-lora`: llama.cpp's LoRA adapter GGUF. llama.cpp adds ``scale * B @ A`` with ``scale = alpha / r``
(``adapter.lora.alpha``, ``r`` from the tensors; llama-adapter.cpp); applied to the base GGUF's tensors that must
give the merged GGUF's tensors (float32: 1e-5)."""

import numpy as np
import pytest
import torch

from lorakit.export import export_gguf, export_gguf_lora
from lorakit.export.lora import lora_pairs
from tests.export.conftest import save_adapter

pytest.importorskip("gguf")


def tensors(file) -> dict[str, torch.Tensor]:
    from gguf import GGUFReader

    out = {}
    for t in GGUFReader(file).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(shape))
    return out


def check_llama_cpp_sum(base_dir, adapter, tmp_path) -> dict:
    from gguf import GGUFReader

    base = tensors(export_gguf(base_dir, tmp_path / "base.gguf", outtype="f32", progress=False, echo=None))
    merged = tensors(export_gguf(base_dir, tmp_path / "merged.gguf", adapter=adapter, outtype="f32", progress=False,
                                 echo=None))
    lora_file = export_gguf_lora(adapter, tmp_path / "lora.gguf", base=base_dir, progress=False, echo=None)
    fields = {k: f.contents() for k, f in GGUFReader(lora_file).fields.items()}
    alpha = fields["adapter.lora.alpha"]
    pairs = lora_pairs(lora_file)
    assert pairs, "no LoRA tensors"
    for name, (a, b) in pairs.items():
        r = b.shape[1]  # llama.cpp: rank = b->ne[0]
        torch.testing.assert_close(base[name] + alpha / r * (b @ a), merged[name], atol=1e-5, rtol=0, msg=name)
    changed = {n for n in merged if not torch.equal(merged[n], base[n])}
    assert changed == set(pairs)  # every changed weight has its pair, and nothing else
    return fields


def test_lora_gguf_plus_base_is_the_merged_model(tiny_dir, tiny_adapter, tmp_path):
    fields = check_llama_cpp_sum(tiny_dir, tiny_adapter, tmp_path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    names = set(lora_pairs(tmp_path / "lora.gguf"))
    assert "blk.1.attn_q.weight" in names and "blk.0.ffn_down.weight" in names


def test_rslora_and_patterns_are_folded_into_b(tiny_dir, tmp_path):
    """llama.cpp only knows alpha / r: rsLoRA's alpha / sqrt(r) and per-module alphas must still come out right."""
    adapter = save_adapter(tiny_dir, tmp_path / "rs", use_rslora=True, r=4, rank_pattern={"v_proj": 2})
    check_llama_cpp_sum(tiny_dir, adapter, tmp_path)
    adapter = save_adapter(tiny_dir, tmp_path / "ap", alpha_pattern={"q_proj": 3.0})
    check_llama_cpp_sum(tiny_dir, adapter, tmp_path / "ap")


def test_whole_tensor_adapters_are_refused(tiny_dir, tmp_path):
    adapter = save_adapter(tiny_dir, tmp_path / "mts", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(NotImplementedError, match="--format gguf instead"):
        export_gguf_lora(adapter, tmp_path / "x.gguf", base=tiny_dir, progress=False, echo=None)
    assert not (tmp_path / "x.gguf").exists()
