"""Interoperability with other checkpoint formats: `moejax.interop.hf` (Hugging Face safetensors)."""
