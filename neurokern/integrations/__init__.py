"""Integrations with other tools: the top layer (it may import the cli, engine, methods, tint,
ops and base; nothing in the library imports it). mergekit: neurokern's methods inside mergekit
(mergekit 0.1.5). peft: LoRA adapters. fusion_bench: FusionBench (fusion-bench 0.2.33) algorithms
that its program builds by `_target_`."""
