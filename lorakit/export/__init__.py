"""Export writers: GGUF (llama.cpp, LM Studio), llama.cpp LoRA-adapter GGUF, and Ollama (GGUF + Modelfile)."""

from lorakit.export.gguf_model import export_gguf

__all__ = ["export_gguf"]
