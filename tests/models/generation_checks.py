"""The check that cached generation equals recomputing the whole sequence, for every routing mode.

tests/models/test_generation.py runs it in-process and, through ``trust_remote_code``, in a fresh process where
``duo_llm_hf`` is not importable: this file imports only torch and the standard library, and reaches the Duo code
through the model it is given (``model.set_routing``, ``type(model.model.route_sampler)``).
"""

from __future__ import annotations

import warnings

import torch

PAD = 0
NEW_TOKENS = 6
ROUTING_MODES = ("fixed", "explicit", "learned", "random")
# A cached step computes its token's attention as one query row against the cached keys, the full forward as a
# square over the whole sequence: other GEMM / SDPA shapes, so fp32 rounding differs (at most 1.2e-7 over every
# case here on this machine's kernels; other CPU kernels (default, avx2, avx512) round differently, by the same
# order). A broken cache (positions and masks restarting at 0) moves the logits by 0.02 to 0.4 in these models
# (issue 13 measured 0.39 and 0.87): 1e-4 tells the two apart with margin either side.
ATOL = 1e-4


def prompt(padded: bool, vocab: int = 96, batch: int = 2, seq: int = 5, seed: int = 0):
    """Prompt ids and attention mask; with ``padded`` the second row is left-padded by 2 tokens."""
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask


def set_mode(model, mode: str, batch: int, total_len: int, seed: int = 0) -> dict:
    """Put ``model`` in routing ``mode``; return the extra ``generate`` keyword arguments it needs.

    fixed: a pattern cycling through the route options; explicit: seeded routes covering the prompt and every new
    token (``total_len`` positions), which ``generate`` passes at each step; learned: routers with seeded weights
    large enough that their choices vary; random: the sampler reseeded with ``seed``.
    """
    config = model.config
    layers, options = config.num_hidden_layers, config.route_options
    if mode == "fixed":
        model.set_routing("fixed", pattern=[options[i % len(options)] for i in range(layers)])
        return {}
    if mode == "explicit":
        model.set_routing("explicit")
        sampler = type(model.model.route_sampler)({name: 1 / len(options) for name in options}, seed)
        return {"routes": sampler.sample((batch, total_len, layers))}
    if mode == "learned":
        model.set_routing("learned")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in model.model.layers:
                for param in layer.mlp.router.parameters():
                    param.copy_(0.5 * torch.randn(param.shape, generator=generator))
        return {}
    model.set_routing("random", route_seed=seed)
    return {}


def check_cached_generation(model, mode: str, padded: bool, new_tokens: int = NEW_TOKENS) -> None:
    """Greedy ``generate`` with the KV cache equals one full forward over the generated sequence.

    The full forward (no cache, generate's positions) is given the routing of the cached run: the same mode, the
    explicit routes, or under random routing the routes the cached run drew (each forward returns the routes it
    took; a hook collects them), which must be the seeded sampler's draws, the prompt's first and then one token's
    per step. Logits agree within ATOL, the greedy tokens where the top two logits are further apart than 2 x ATOL
    (nearer ones may swap), the routes exactly, and generate() raises no deprecation warning.
    """
    ids, mask = prompt(padded, vocab=model.config.vocab_size)
    (batch, prompt_len), layers = ids.shape, model.config.num_hidden_layers
    extra = set_mode(model, mode, batch, prompt_len + new_tokens)
    taken = []
    handle = model.register_forward_hook(lambda module, args, output: taken.append(output.routes))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD,
                return_dict_in_generate=True, output_logits=True, **extra,
            )
    finally:
        handle.remove()
    deprecations = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, [str(w.message) for w in deprecations]

    # The prefill routes the prompt, every later step its one new token; the last new token is never fed back.
    routes_taken = torch.cat(taken, dim=1)
    assert routes_taken.shape == (batch, prompt_len + new_tokens - 1, layers), routes_taken.shape
    if mode == "random":
        sampler = type(model.model.route_sampler)(model.config.route_probs, model.config.route_seed)
        draws = [sampler.sample((batch, prompt_len, layers))]
        draws += [sampler.sample((batch, 1, layers)) for _ in range(new_tokens - 1)]
        assert torch.equal(routes_taken, torch.cat(draws, dim=1))

    sequence = out.sequences[:, :-1]
    full_mask = torch.cat([mask, mask.new_ones(batch, new_tokens - 1)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)  # what generate() gives the model
    routes = {"random": routes_taken, "explicit": extra.get("routes")}.get(mode)
    with torch.no_grad():
        full = model(sequence, attention_mask=full_mask, position_ids=positions, routes=routes, use_cache=False)
    step_logits = torch.stack(out.logits, dim=1)
    full_logits = full.logits[:, prompt_len - 1 :]
    torch.testing.assert_close(step_logits, full_logits, rtol=0, atol=ATOL)
    top2 = step_logits.topk(2, dim=-1).values
    decided = top2[..., 0] - top2[..., 1] > 2 * ATOL
    assert torch.equal(step_logits.argmax(-1)[decided], full_logits.argmax(-1)[decided])
    real = full_mask.bool()  # padding positions attend to nothing: their outputs carry no meaning
    assert torch.equal(routes_taken[real], full.routes[real])
