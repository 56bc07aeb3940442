"""A transformers tokenizer as GGUF ``tokenizer.*`` metadata: llama.cpp's ``gpt2`` byte-level BPE vocabulary, or its
``llama`` SentencePiece vocabulary (`sentencepiece_metadata`: pieces, scores and types from ``tokenizer.model``).

Byte-level BPE keys (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md#tokenizer): ``tokenizer.ggml.model =
"gpt2"``, ``.pre`` (which pre-tokenizer regex llama.cpp applies), ``.tokens`` (by id), ``.token_type`` (1 normal, 3
control = special added tokens, 4 user-defined = other added tokens, 5 unused = padding ids past the tokenizer),
``.merges`` (``"a b"``), the bos / eos / unk / pad ids, ``.add_bos_token`` and ``tokenizer.chat_template``.

``.pre`` is found as llama.cpp's converter finds it: encode a fixed text and look up the sha256 of the ids'
``str()`` (``get_vocab_base_pre`` in ``convert_hf_to_gguf.py``); the table below holds the Llama-family entries.
"""

from __future__ import annotations

import json
import os
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

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


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


def tokenizer_metadata(tokenizer: Any, vocab_size: int, sentencepiece_file: str | os.PathLike | None = None
                       ) -> dict[str, Any]:
    """``{key: value}`` for the GGUF writer; ``vocab_size`` is the model's (rows past the tokenizer are padding).

    Byte-level BPE tokenizers are written as llama.cpp's ``gpt2`` vocabulary; SentencePiece ones (Llama 2,
    Mistral 7B, TinyLlama: BPE with byte fallback and the ``▁`` metaspace) as its ``llama`` vocabulary from
    `sentencepiece_file` (their ``tokenizer.model``, which holds the pieces' scores). Raises NotImplementedError
    for other tokenizers, and for a SentencePiece one without its ``tokenizer.model``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise NotImplementedError(f"GGUF export needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec["decoder"])
    if model.get("type") == "BPE" and not byte_level and model.get("byte_fallback"):
        if sentencepiece_file is None:
            raise NotImplementedError("GGUF export of a SentencePiece tokenizer needs its tokenizer.model (the pieces' "
                                      "scores are not in tokenizer.json): export from the model folder that has it, "
                                      "or copy the base model's tokenizer.model beside the tokenizer")
        return sentencepiece_metadata(tokenizer, vocab_size, sentencepiece_file)
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type") + ("" if byte_level else " without ByteLevel or byte fallback")
        raise NotImplementedError(f"GGUF export of a {kind} tokenizer is not implemented: byte-level BPE (SmolLM, "
                                  "Llama 3, Qwen2, GPT-2 style) and SentencePiece BPE (Llama 2, Mistral) are written")
    _check_vocab_size(tokenizer, vocab_size)
    vocab = tokenizer.get_vocab()  # includes added tokens
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
    return kv | _special_metadata(tokenizer)


def sentencepiece_metadata(tokenizer: Any, vocab_size: int, sentencepiece_file: str | os.PathLike) -> dict[str, Any]:
    """llama.cpp's ``llama`` (SentencePiece) vocabulary, as its converter writes it (``_set_vocab_sentencepiece``):
    every piece with its score and type (normal 1, unknown 2, control 3, unused 5, byte 6) from the SentencePiece
    model, then the tokenizer's added tokens over them (control when special, else user-defined with ``▁`` as a
    space; score -1000), and ``[PAD<i>]`` (unused) up to the model's ``vocab_size``. llama.cpp then tokenizes as
    for its own conversion of the model (it puts a space before the text, and after each special token)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as err:
        raise ImportError("exporting a SentencePiece tokenizer needs the sentencepiece package: pip install "
                          "'lorakit[gguf]' (or pip install sentencepiece)") from err
    _check_vocab_size(tokenizer, vocab_size)
    sp = SentencePieceProcessor(model_file=os.fspath(sentencepiece_file))
    if sp.vocab_size() > vocab_size:
        raise ValueError(f"{sentencepiece_file} has {sp.vocab_size()} pieces, more than the model's vocab_size "
                         f"{vocab_size}: is it this model's tokenizer.model?")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [TOKEN_UNUSED] * vocab_size
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (TOKEN_UNKNOWN if sp.is_unknown(i) else TOKEN_CONTROL if sp.is_control(i) else
                    TOKEN_UNUSED if sp.is_unused(i) else TOKEN_BYTE if sp.is_byte(i) else TOKEN_NORMAL)
    for token_id, added in tokenizer.added_tokens_decoder.items():  # <s>, </s>, <unk> too, as the converter does
        text = added.content if added.special else added.content.replace("\u2581", " ")
        tokens[token_id], scores[token_id] = text, -1000.0
        types[token_id] = TOKEN_CONTROL if added.special else TOKEN_USER_DEFINED
    kv: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
    }
    return kv | _special_metadata(tokenizer)


def _check_vocab_size(tokenizer: Any, vocab_size: int) -> None:
    if len(tokenizer.get_vocab()) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer.get_vocab())} tokens, more than the model's vocab_size "
                         f"{vocab_size}: resize the model's embeddings (model.resize_token_embeddings) before "
                         "exporting")


def _special_metadata(tokenizer: Any) -> dict[str, Any]:
    """The bos / eos / unk / pad ids, whether the tokenizer adds BOS / EOS, and the chat template."""
    kv: dict[str, Any] = {}
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if token_id is not None:
            kv[f"tokenizer.ggml.{key}_token_id"] = int(token_id)
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    kv["tokenizer.ggml.add_bos_token"] = bool(bos is not None and ids[:1] == [bos])
    kv["tokenizer.ggml.add_eos_token"] = bool(eos is not None and ids[-1:] == [eos])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        kv["tokenizer.chat_template"] = template
    return kv
