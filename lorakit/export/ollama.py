"""``--format ollama``: a folder with ``model.gguf`` and a ``Modelfile`` that ``ollama create NAME -f Modelfile``
takes: ``FROM ./model.gguf``, a ``TEMPLATE`` (Go text/template) converted from the tokenizer's Jinja chat template,
and ``PARAMETER stop`` for the end-of-turn tokens (https://github.com/ollama/ollama/blob/main/docs/modelfile.md).

Conversion: Jinja cannot be translated to Go in general, so the chat template is *rendered* with marker strings
as message contents, and the text around the markers gives each role's prefix and suffix, the default system
block (SmolLM2 adds one when no system message is given) and the generation prompt (:func:`chat_pieces`). The
Go template replays those pieces over ``.Messages``; :func:`render_pieces` replays them in Python, and the tests
check it against ``apply_chat_template`` on several conversations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.export.gguf_model import export_gguf

_S, _U, _A, _U2 = "LKSYSMARK7", "LKUSERMARK7", "LKASSTMARK7", "LKUSER2MARK7"


@dataclass(frozen=True)
class ChatPieces:
    """The literal text a chat template puts around each message."""

    default_system: str
    """Text at the start when the first message is not a system message (a default system turn, a BOS)."""
    system_prefix: str
    """Text before a leading system message's content (includes what starts every conversation)."""
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    """Appended after the last message when a reply is asked for (add_generation_prompt)."""


def _split(text: str, *markers: str) -> list[str]:
    parts = []
    for marker in markers:
        if text.count(marker) != 1:
            raise NotImplementedError(f"the chat template does not place each message's content once (marker "
                                      f"{marker!r}): it cannot be converted to an Ollama TEMPLATE")
        head, text = text.split(marker)
        parts.append(head)
    return [*parts, text]


def _common_suffix(*texts: str) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - n - 1] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:] if n else ""


def chat_pieces(tokenizer: Any) -> ChatPieces:
    """Each role's prefix / suffix, found by rendering the tokenizer's chat template with markers."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: an Ollama TEMPLATE cannot be made (set "
                         "tokenizer.chat_template, or use --format gguf and write the Modelfile yourself)")

    def render(messages: list[tuple[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                             add_generation_prompt=gen)

    sys_before, sys_user, user_after = _split(render([("system", _S), ("user", _U)], False), _S, _U)
    u_before, u_after = _split(render([("user", _U)], False), _U)
    gen = render([("user", _U)], True)
    if not gen.startswith(u_before + _U + u_after):
        raise NotImplementedError("the chat template's generation prompt does not extend the conversation: it "
                                  "cannot be converted to an Ollama TEMPLATE")
    _, user_asst, asst_user, _ = _split(render([("user", _U), ("assistant", _A), ("user", _U2)], False), _U, _A, _U2)
    assistant_suffix = _split(render([("user", _U), ("assistant", _A)], False), _U, _A)[2]
    if asst_user.startswith(assistant_suffix) and sys_user.endswith(asst_user[len(assistant_suffix):]):
        user_prefix = asst_user[len(assistant_suffix):]
    else:  # the template adds text after a final assistant turn that it does not put between turns
        user_prefix = _common_suffix(sys_user, asst_user, u_before)
        assistant_suffix = asst_user[: len(asst_user) - len(user_prefix)]
    if not user_asst.startswith(u_after) or not u_before.endswith(user_prefix):
        raise NotImplementedError("the chat template frames user turns differently in different places: it "
                                  "cannot be converted to an Ollama TEMPLATE")
    return ChatPieces(
        default_system=u_before[: len(u_before) - len(user_prefix)],
        system_prefix=sys_before,
        system_suffix=sys_user[: len(sys_user) - len(user_prefix)],
        user_prefix=user_prefix,
        user_suffix=u_after,
        assistant_prefix=user_asst[len(u_after):],
        assistant_suffix=assistant_suffix,
        generation_prompt=gen[len(u_before + _U + u_after):],
    )


def render_pieces(p: ChatPieces, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """What the Go template of :func:`go_template` renders, in Python (the reference the tests compare)."""
    out = "" if messages and messages[0]["role"] == "system" else p.default_system
    for i, m in enumerate(messages):
        last = i == len(messages) - 1
        if m["role"] == "system":
            out += p.system_prefix + m["content"] + p.system_suffix
        elif m["role"] == "user":
            out += p.user_prefix + m["content"] + p.user_suffix
        elif m["role"] == "assistant":
            out += p.assistant_prefix + m["content"] + ("" if last and add_generation_prompt else p.assistant_suffix)
    if add_generation_prompt and messages and messages[-1]["role"] == "user":
        out += p.generation_prompt
    return out


def go_template(p: ChatPieces) -> str:
    """An Ollama TEMPLATE (Go text/template over ``.Messages``) replaying the pieces; one line, no trim markers,
    so every literal keeps its whitespace."""
    for name, text in vars(p).items():
        if "{{" in text or '"""' in text:
            raise NotImplementedError(f"the chat template's {name} contains '{{{{' or '\"\"\"': it cannot be "
                                      "written into a Modelfile TEMPLATE")
    return (
        '{{ if and .Messages (eq (index .Messages 0).Role "system") }}{{ else }}' + p.default_system + "{{ end }}"
        "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq .Role "system" }}' + p.system_prefix + "{{ .Content }}" + p.system_suffix +
        '{{ else if eq .Role "user" }}' + p.user_prefix + "{{ .Content }}" + p.user_suffix +
        "{{ if $last }}" + p.generation_prompt + "{{ end }}"
        '{{ else if eq .Role "assistant" }}' + p.assistant_prefix + "{{ .Content }}"
        "{{ if not $last }}" + p.assistant_suffix + "{{ end }}"
        "{{ end }}{{ end }}"
    )


def stop_tokens(tokenizer: Any, p: ChatPieces) -> list[str]:
    """The EOS token and the special tokens that end an assistant turn or start the next user turn."""
    special = [t.content for t in tokenizer.added_tokens_decoder.values() if t.special]
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    for token in special:
        if token and (token in p.assistant_suffix or token in p.user_prefix) and token not in stops:
            stops.append(token)
    return stops


def modelfile(tokenizer: Any, gguf_name: str = "model.gguf") -> str:
    """The Modelfile text for ``FROM ./gguf_name``."""
    pieces = chat_pieces(tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(pieces)}"""']
    for token in stop_tokens(tokenizer, pieces):
        if '"' in token:
            raise NotImplementedError(f"stop token {token!r} contains a quote")
        lines.append(f'PARAMETER stop "{token}"')
    return "\n".join(lines) + "\n"


def export_ollama(
    model: str | os.PathLike | Any,
    out: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    outtype: str = "q8_0",
    tokenizer: Any = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> Path:
    """Write ``out/model.gguf`` (as :func:`export_gguf`) and ``out/Modelfile``; returns the folder.

    ``out`` must be a new or empty folder, or one holding only an earlier export (model.gguf, Modelfile).
    """
    from lorakit.export.source import open_source
    from lorakit.io.files import atomic_write_text

    folder = Path(os.path.expanduser(os.fspath(out))).resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {os.fspath(out)!r} is a file; --format ollama writes a folder (model.gguf + "
                         "Modelfile)")
    if folder.is_dir() and any(p.name not in ("model.gguf", "Modelfile") for p in folder.iterdir()):
        raise ValueError(f"--out {os.fspath(out)!r} holds other files; give a new or empty folder")
    if tokenizer is None and not hasattr(model, "state_dict"):
        tokenizer = open_source(model).tokenizer if adapter is None else _adapter_tokenizer(adapter, model)
    text = modelfile(tokenizer)  # before the long write: a template that cannot be converted fails first
    folder.mkdir(parents=True, exist_ok=True)
    export_gguf(model, folder / "model.gguf", adapter=adapter, outtype=outtype, tokenizer=tokenizer,
                progress=progress, echo=echo)
    atomic_write_text(folder / "Modelfile", text)
    if echo is not None:
        echo(f"[lorakit] wrote {folder / 'Modelfile'}: run `ollama create NAME -f {folder / 'Modelfile'}`")
    return folder


def _adapter_tokenizer(adapter: str | os.PathLike, model: Any) -> Any:
    """The tokenizer saved with the adapter (lorakit train saves it there), else the base model's."""
    from transformers import AutoTokenizer

    from lorakit.export.source import open_source

    if (Path(adapter) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter)
    return open_source(model).tokenizer
