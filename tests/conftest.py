"""Shared fixtures: tiny configs so the whole suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# trust_remote_code copies modeling files here: keep them out of the user's cache (set before transformers loads).
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="duo-hf-modules-"))
# Every model in the suite is tiny: thread hand-offs cost more than the work (and oversubscribe a shared CPU).
torch.set_num_threads(1)


def tiny_llama_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def tiny_config():
    """Factory of tiny DuoLlamaConfigs: ``tiny_config(route_options=[...], ...)``."""
    from duo_llm_hf import DuoLlamaConfig

    def make(**overrides):
        overrides.setdefault("small_intermediate_size", 8)
        return DuoLlamaConfig(**tiny_llama_kwargs(**overrides))

    return make


@pytest.fixture
def tiny_model(tiny_config):
    """Factory of tiny DuoLlamaForCausalLM models in eval mode, seeded."""
    from duo_llm_hf import DuoLlamaForCausalLM

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return DuoLlamaForCausalLM(tiny_config(**overrides)).eval()

    return make
