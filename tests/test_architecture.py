"""The architecture's promises (docs/architecture.md): the worked example "how to add a variant" — one class and
one table row — trains, merges, saves, loads back and runs in mixed batches; and the core modules import without
cycles."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapter import ADAPTER_CLASSES, LoraAdapter

from .conftest import make_tiny_llama

TOL = 1e-5  # fp32; the same ops in another order


# ---- the worked example of docs/architecture.md -----------------------------------------------------------------
class GatedLoraAdapter(LoraAdapter):
    """LoRA with a learned scalar gate: ``y = W x + g * s * B A x``, ``g`` saved as ``<path>.lora_gate``."""

    TENSOR_SUFFIXES = (*LoraAdapter.TENSOR_SUFFIXES, ("lora_gate", -1))

    def __init__(self, in_features, out_features, spec, device=None, dtype=torch.float32):
        super().__init__(in_features, out_features, spec, device, dtype)
        self.lora_gate = nn.Parameter(torch.full((1,), 0.5, device=device, dtype=dtype))

    def apply(self, x, result, wrapper):
        return result + self.lora_gate * self(x).to(result.dtype)  # self(x) = s * B A dropout(x)

    def delta_weight(self):
        return super().delta_weight() * self.lora_gate.float()

    def stack_factors(self):  # mixed batches: the gate folded into B
        a, b, bias = super().stack_factors()
        return a, b * self.lora_gate, None if bias is None else bias * self.lora_gate


@dataclasses.dataclass
class GatedConfig(lorakit.LoraConfig):
    @property
    def variant(self) -> str:
        return "gated"


@pytest.fixture
def gated(monkeypatch):
    monkeypatch.setitem(ADAPTER_CLASSES, ("linear", "gated"), GatedLoraAdapter)  # the one table row


def _config(**kw) -> GatedConfig:
    return GatedConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)


def test_a_new_variant_is_one_class_and_one_table_row(gated, tmp_path, input_ids):
    base = make_tiny_llama()
    model = lorakit.get_peft_model(make_tiny_llama(), _config())
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    ad = q.adapters["default"]
    assert type(ad) is GatedLoraAdapter
    x = torch.randn(2, 3, q.in_features)
    with torch.no_grad():  # the forward is the class's apply, not plain LoRA (fused path refused: no fused form)
        want = q.base_layer(x) + 0.5 * ad.scaling * x @ ad.lora_A.weight.T @ ad.lora_B.weight.T
        torch.testing.assert_close(q(x), want, atol=TOL, rtol=TOL)

    # trains: every tensor of the variant gets a gradient, the loss goes down
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        assert ad.lora_gate.grad is not None and ad.lora_gate.grad.abs().max() > 0
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=input_ids).logits
        model.merge_adapter()  # merges: merged == unmerged
        torch.testing.assert_close(model(input_ids=input_ids).logits, unmerged, atol=TOL, rtol=TOL)
        model.unmerge_adapter()

    # saves its tensors under PEFT-style keys and loads back to the same outputs
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_gate") for k in keys) == 4  # 2 layers x (q_proj, v_proj)
    loaded = lorakit.PeftModel.from_pretrained(base, tmp_path, config=_config())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, unmerged, atol=TOL, rtol=TOL)

    # mixed batches: a gated and a plain adapter per row equal each row run alone
    loaded.add_adapter("plain", lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    rows = ["default", "plain"]
    with torch.no_grad():
        got = loaded(input_ids=input_ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            loaded.set_adapter(name)
            torch.testing.assert_close(got[i : i + 1], loaded(input_ids=input_ids[i : i + 1]).logits, atol=TOL,
                                       rtol=TOL)


def test_an_unknown_variant_names_itself():
    with pytest.raises(NotImplementedError, match="'gated' on a linear layer is not implemented"):
        lorakit.get_peft_model(make_tiny_llama(), _config())


# ---- no import cycles in the core -----------------------------------------------------------------------------
CORE = ("config", "adapter", "dispatch", "layers", "inject", "lora_model", "model", "variants")


def _imports(node: ast.AST) -> list[str]:
    """Modules imported anywhere under ``node`` (in functions too), except under ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        return []
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module]
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [m for child in ast.iter_child_nodes(node) for m in _imports(child)]


def _core_imports() -> dict[str, set[str]]:
    """Module -> the core modules it imports, at module level or inside functions (not under TYPE_CHECKING)."""
    root = Path(lorakit.__file__).parent
    files = {f"lorakit.{n}": root / f"{n}.py" for n in CORE if (root / f"{n}.py").exists()}
    files |= {f"lorakit.variants.{p.stem}": p for p in (root / "variants").glob("*.py") if p.stem != "__init__"}
    return {m: {d for d in _imports(ast.parse(p.read_text())) if d in files} for m, p in files.items()}


def test_core_modules_import_without_cycles():
    graph = _core_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module in done:
            return
        for dep in graph[module]:
            visit(dep, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert graph["lorakit.config"] == set()  # the leaf
    assert not any(d.startswith("lorakit.variants") for d in graph["lorakit.layers"])  # layers never name a variant
