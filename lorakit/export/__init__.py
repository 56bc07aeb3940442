"""Export writers: GGUF (llama.cpp, LM Studio), llama.cpp LoRA-adapter GGUF, and Ollama (GGUF + Modelfile)."""

from lorakit.export.gguf_model import export_gguf
from lorakit.export.lora import export_gguf_lora
from lorakit.export.ollama import export_ollama

__all__ = ["export_gguf", "export_gguf_lora", "export_ollama"]
