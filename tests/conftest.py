"""The suite's environment and shared fixtures: tiny configs and models, so the whole suite runs in minutes on
2 CPU cores, and the tiny runs' tokenizer. Plain builders are in helpers.py."""

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


@pytest.fixture
def tiny_config():
    """Factory of tiny DuoLlamaConfigs: ``tiny_config(route_options=[...], ...)``."""
    from duo_llm_hf import DuoLlamaConfig
    from tests.helpers import tiny_llama_kwargs

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


@pytest.fixture(scope="session")
def builtin_tokenizer():
    """The tiny runs' tokenizer: a 300-token BPE trained on the first 3000 characters of the built-in corpus."""
    from duo_llm_hf.data.corpus import builtin_corpus
    from duo_llm_hf.data.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(builtin_corpus("train", max_chars=3000)["text"], vocab_size=300)
