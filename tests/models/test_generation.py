"""generate() with the KV cache: equal to recomputing the whole sequence for DuoLlama and DuoOPT under every routing
mode, with and without left padding, through pipeline("text-generation") and trust_remote_code; no deprecation
warnings; the cache argument's old name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from transformers import pipeline

from duo_llm_hf import BIG, DuoLlamaConfig, DuoLlamaForCausalLM, DuoOPTForCausalLM
from tests import helpers
from tests.models.generation_checks import PAD, ROUTING_MODES, check_cached_generation, prompt

OPTIONS = ["small", "big", "skip"]


def tiny_llama(vocab_size: int = 96) -> DuoLlamaForCausalLM:
    torch.manual_seed(0)
    config = DuoLlamaConfig(
        **helpers.tiny_llama_kwargs(vocab_size=vocab_size, route_options=OPTIONS, small_intermediate_size=8)
    )
    return DuoLlamaForCausalLM(config).eval()


def tiny_opt() -> DuoOPTForCausalLM:
    return DuoOPTForCausalLM.from_dense(helpers.tiny_opt(pad_token_id=PAD), route_options=OPTIONS).eval()


MODELS = {"llama": tiny_llama, "opt": tiny_opt}


@pytest.mark.numerics
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("mode", ROUTING_MODES)
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_cached_generation_equals_full_forward(arch, mode, padded):
    check_cached_generation(MODELS[arch](), mode, padded)


def test_explicit_routes_must_cover_the_generated_positions():
    model = tiny_llama()
    model.set_routing("explicit")
    ids, mask = prompt(padded=False)
    routes = torch.full((2, ids.shape[1] + 2, 3), BIG)  # the prompt and 2 new tokens, not 4
    with pytest.raises(ValueError, match="covers 7 positions"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, routes=routes)


def test_past_key_values_still_works_with_transformers_deprecation_warning():
    """As for LlamaForCausalLM: the old name of the cache argument maps to `cache`, with a FutureWarning."""
    model = tiny_llama()
    model.set_routing("fixed", pattern="sB-")
    ids, _ = prompt(padded=False)
    with torch.no_grad():
        prefill = model(ids[:, :-1], use_cache=True)
        expected = model(ids[:, -1:], cache=prefill.cache).logits
        prefill = model(ids[:, :-1], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            got = model(ids[:, -1:], past_key_values=prefill.cache).logits
    assert torch.equal(got, expected)  # the same computation, only the argument's name differs


def test_text_generation_pipeline(builtin_tokenizer):
    """pipeline("text-generation") continues a prompt as greedy decoding by full recomputation does."""
    model = tiny_llama(vocab_size=len(builtin_tokenizer))
    model.set_routing("fixed", pattern="sBs")
    generator = pipeline("text-generation", model=model, tokenizer=builtin_tokenizer)
    text = "The model routes every token"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = generator(text, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert not [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]

    tokens = builtin_tokenizer(text, return_tensors="pt").input_ids
    prompt_len = tokens.shape[1]
    with torch.no_grad():
        for _ in range(8):  # no cache: every step recomputes the whole sequence
            logits = model(tokens, use_cache=False).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    expected = builtin_tokenizer.decode(tokens[0, prompt_len:], skip_special_tokens=True)
    assert result[0]["generated_text"] == expected


def test_generate_emits_no_deprecation_warning():
    """generate() and cached forwards raise no FutureWarning / DeprecationWarning, from our code or from what it
    calls. Not filtered by module: transformers' deprecation warnings point (stacklevel) at torch's
    Module.__call__, not at the caller who passed the deprecated argument."""
    for make in MODELS.values():
        model = make()
        ids, mask = prompt(padded=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            warnings.simplefilter("error", FutureWarning)
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
            with torch.no_grad():
                out = model(ids, attention_mask=mask, use_cache=True)
                model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), cache=out.cache)
                model(ids, output_hidden_states=True, output_attentions=True, return_dict=False)


REMOTE_SCRIPT = """
import logging, sys
sys.modules["duo_llm_hf"] = None  # the package must not be importable here
sys.path.insert(0, {tests!r})
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from generation_checks import ROUTING_MODES, check_cached_generation

records = []
handler = logging.Handler()
handler.emit = records.append
hf_logging.get_logger().addHandler(handler)  # transformers logs some deprecations instead of warning
for folder in {folders!r}:
    for mode in ROUTING_MODES:
        for padded in (False, True):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            check_cached_generation(model, mode, padded)
deprecated = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
assert not deprecated, deprecated
print("REMOTE-GENERATION-OK")
"""


@pytest.mark.numerics
@pytest.mark.slow
def test_cached_generation_through_trust_remote_code(tmp_path):
    """The same checks on the code saved next to the models, in a fresh process without duo_llm_hf."""
    folders = []
    for arch, make in sorted(MODELS.items()):
        make().save_pretrained(tmp_path / arch)
        folders.append(str(tmp_path / arch))
    script = REMOTE_SCRIPT.format(tests=str(Path(__file__).parent), folders=folders)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300
    )
    assert "REMOTE-GENERATION-OK" in result.stdout, result.stderr[-3000:]
