"""A transformers tokenizer as GGUF ``tokenizer.*`` metadata (llama.cpp's ``gpt2`` byte-level BPE vocabulary).

Keys (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#tokenizer): ``tokenizer.ggml.model = "gpt2"``,
``.pre`` (which pre-tokenizer regex llama.cpp applies), ``.tokens`` (by id), ``.token_type`` (1 normal, 3 control
= special added tokens, 4 user-defined = other added tokens, 5 unused = padding ids past the tokenizer),
``.merges`` (``"a b"``), the bos / eos / unk / pad ids, ``.add_bos_token`` and ``tokenizer.chat_template``.

``.pre`` is found as llama.cpp's converter finds it: encode a fixed text and look up the sha256 of the ids'
``str()`` (``get_vocab_base_pre`` in ``convert_hf_to_gguf.py``); the table below holds the Llama-family entries.
"""

from __future__ import annotations

import json
import warnings
from hashlib import sha256
from typing import Any

# llama.cpp convert_hf_to_gguf.py, get_vocab_base_pre: the text whose token ids identify the pre-tokenizer.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids)) -> tokenizer.ggml.pre, for the families lorakit exports (hashes from the same function).
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen/Qwen3-Embedding-0.6B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; ``"default"`` (with a warning) when it is not known."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT, add_special_tokens=False)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        warnings.warn(f"the tokenizer's pre-tokenizer is not one lorakit knows (check hash {digest[:16]}...): "
                      "tokenizer.ggml.pre is written as 'default', and llama.cpp may split text differently "
                      "from transformers", stacklevel=3)
        return "default"
    return name


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """``{key: value}`` for the GGUF writer; ``vocab_size`` is the model's (rows past the tokenizer are padding).

    Raises NotImplementedError for tokenizers other than byte-level BPE (e.g. SentencePiece), naming the model.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec["decoder"])
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type") + ("" if byte_level else " without ByteLevel (SentencePiece-style)")
        raise NotImplementedError(f"GGUF export of a {kind} tokenizer is not implemented: only byte-level BPE "
                                  "tokenizers (SmolLM, Llama 3, Qwen2, GPT-2 style) are written")
    vocab = tokenizer.get_vocab()  # includes added tokens
    if len(vocab) > vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab)} tokens, more than the model's vocab_size {vocab_size}: "
                         "resize the model's embeddings (model.resize_token_embeddings) before exporting")
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(token)
            types.append(TOKEN_NORMAL if token not in added else TOKEN_CONTROL if added[token] else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    kv: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_tokenizer_name(tokenizer),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            kv[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
    ids = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    kv["tokenizer.ggml.add_bos_token"] = bool(bos is not None and ids[:1] == [bos])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kv["tokenizer.chat_template"] = template
    return kv
