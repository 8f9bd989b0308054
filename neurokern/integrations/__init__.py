"""Integrations with other tools: the top layer (it may import the cli, engine, methods, tint,
ops and base; nothing in the library imports it). peft: LoRA adapters."""
