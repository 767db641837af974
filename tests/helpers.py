"""Builders the test files share: tiny model configs and models, tiny runs' arguments, model folders.

Fixtures live in conftest.py; these are plain functions, imported as ``from tests.helpers import ...``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import OPTConfig, OPTForCausalLM

from duo_llm_hf.training.arguments import TrainArguments
from duo_llm_hf.training.router_arguments import RouterTrainArguments

# Float32 results of the same math in another batch shape, order or process round differently under other CPU
# kernels (ATEN_CPU_CAPABILITY=default, avx2, avx512 block and vectorise their sums differently): the last bits
# change. The tiny models' losses and logits are of order 1 to 10 (one float32 ulp: 1e-7 to 1e-6) after sums of 32
# to 64 products per layer; 1e-5 is 10 to 100 ulps, far below what a wrong route, weight or mask changes (1e-2 and
# more in these tests).
FLOAT_TOL = 1e-5


def decided(losses: torch.Tensor, tol: float = FLOAT_TOL) -> torch.Tensor:
    """Where the minimum over dim 0 of ``losses`` (the candidates) is decided: the best beats the second best by
    more than ``tol``, so every rounding of the same losses picks it. Bool, shaped ``losses.shape[1:]``."""
    if losses.shape[0] == 1:
        return torch.ones(losses.shape[1:], dtype=torch.bool)
    two = losses.topk(2, dim=0, largest=False).values
    return two[1] - two[0] > tol


def assert_same_choice(
    losses: torch.Tensor, chosen: torch.Tensor, expected: torch.Tensor | None = None, tol: float = FLOAT_TOL
) -> int:
    """Decisions computed in another shape or order agree: ``chosen`` (positions along dim 0 of ``losses``,
    shaped ``losses.shape[1:]``; ``inf`` marks forbidden candidates) is within ``tol`` of the best everywhere, and
    equals ``expected`` (default: ``losses.argmin(0)``) wherever the choice is decided (``decided``).
    Returns how many choices were decided, for the caller to check that the test compared something."""
    picked = losses.gather(0, chosen.unsqueeze(0)).squeeze(0)
    assert bool((picked <= losses.amin(0) + tol).all()), "a choice is worse than the best by more than tol"
    sure = decided(losses, tol)
    reference = losses.argmin(0) if expected is None else expected
    assert torch.equal(chosen[sure], reference[sure]), "a decided choice differs"
    return int(sure.sum())


def budget_table(space, table: torch.Tensor, g: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """An oracle table ``[P, N, T]`` with ``inf`` where budget ``g`` of ``space`` forbids the pattern at that position
    (or the pattern is not in the bool mask ``among`` ``[P]``): the candidates of the budget's per-token minimum."""
    allowed = space.budgets[g].allowed(space.counts, table.shape[-1])[:, None, :]  # [P, 1, T]
    if among is not None:
        allowed = allowed & among[:, None, None]
    return table.masked_fill(~allowed, float("inf"))


def to_ranks(space, index: torch.Tensor) -> torch.Tensor:
    """Pattern indices -> positions along an oracle table's pattern dim."""
    return space.ranks(index.flatten()).view(index.shape)


def assert_same_search(space, table: torch.Tensor, a: dict, b: dict, samples: torch.Tensor) -> None:
    """Two oracle searches of the same sequences (``BatchReduction.tensors()`` or ``OracleResult.tensors``) computed
    in other shapes, chunks or processes agree: losses up to float rounding; the oracle's and best-of-K's patterns
    (best-of-K drew ``samples``) wherever ``table`` (``pattern_losses``) decides them, and exactly at tokens
    without a target (all losses exactly 0: the tie-break decides); the causal oracle up to its first near tie."""
    assert a.keys() == b.keys()
    mask = a["token_mask"]
    for name in a:
        if name.startswith("causal_") or name.endswith("_index"):
            continue
        if not a[name].is_floating_point():
            assert torch.equal(a[name], b[name]), name
            continue
        # A sum over the tokens adds up one rounding error per token.
        tol = FLOAT_TOL * int(mask.sum()) if name.endswith("_sum") else FLOAT_TOL
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, equal_nan=True, msg=name)
    decisions = 0
    for kind, among in (("oracle", None), ("best_of_k", samples)):
        if f"{kind}_index" not in a:
            continue
        for g in range(len(space.budgets)):
            candidates = budget_table(space, table, g, None if among is None else among[g])
            expected, got = a[f"{kind}_index"][g], b[f"{kind}_index"][g]
            decisions += assert_same_choice(candidates, to_ranks(space, got), to_ranks(space, expected))
            assert torch.equal(got[~mask], expected[~mask]), kind
    assert decisions > 0, "no choice is decided: the test compares nothing"
    if "causal_index" in a:
        assert_same_causal(a["causal_loss"], a["causal_index"], b["causal_loss"], b["causal_index"])


def assert_same_causal(loss_a, index_a, loss_b, index_b, tol: float = FLOAT_TOL) -> None:
    """Two causal oracles ``[..., N, T]`` agree token by token until their first different choice in a sequence,
    which must be a near tie (the chosen losses within ``tol``); the later tokens see other earlier routes and are
    not comparable."""
    differs = index_a != index_b
    after_first = (differs.long().cumsum(-1) - differs.long()) > 0  # positions after the first difference
    torch.testing.assert_close(loss_a[~after_first], loss_b[~after_first], rtol=0, atol=tol)
    assert torch.equal(index_a[~after_first & ~differs], index_b[~after_first & ~differs])


def tiny_llama_kwargs(**overrides) -> dict:
    """Fields of a tiny Llama-shaped config (LlamaConfig or DuoLlamaConfig): 3 layers of width 32, GQA."""
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


def tiny_opt_kwargs(**overrides) -> dict:
    """Fields of a tiny OPT-shaped config (OPTConfig or DuoOPTConfig): 3 layers of width 32, ffn_dim 128."""
    kwargs = dict(
        vocab_size=96,
        hidden_size=32,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_opt(seed: int = 0, **overrides) -> OPTForCausalLM:
    """A seeded tiny OPTForCausalLM (`tiny_opt_kwargs`) in eval mode, every weight away from its initial value.

    LayerNorms start at the identity and biases at 0: they are perturbed so that a wrong conversion of any
    parameter changes the outputs.
    """
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**tiny_opt_kwargs(**overrides))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_model_folder(folder: str | Path, model, tokenizer=None) -> str:
    """Save ``model`` (and ``tokenizer``, if given) in one folder, as a Hub checkpoint is; return the folder."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_run_fields(tmp_path: Path, name: str = "run", **overrides) -> dict:
    """The fields every tiny run's arguments share: its output folder, the first 3000 characters of the built-in
    corpus, 16-token blocks in batches of 4, 2 evaluation blocks, no checkpoints, no progress bar."""
    values = dict(
        output_dir=str(tmp_path / name),
        builtin_max_chars=3000,
        block_size=16,
        batch_size=4,
        eval_blocks=2,
        checkpoint_every=0,
        progress=False,
        cache_dir=str(tmp_path / "cache"),
    )
    values.update(overrides)
    return values


def tiny_train_args(tmp_path: Path, name: str = "run", **overrides) -> TrainArguments:
    """A short stage 1 run of a 2-layer DuoLlama on the first 3000 characters of the built-in corpus."""
    model = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128)
    run = dict(max_steps=8, eval_every=0, warmup_steps=1, learning_rate=3e-3, report_to="jsonl")
    return TrainArguments(**tiny_run_fields(tmp_path, name, **{**model, **run, **overrides}))


def tiny_router_args(tmp_path: Path, model_dir: str, name: str = "run", **overrides) -> RouterTrainArguments:
    """A short router training run on the Duo model folder ``model_dir``: 8 steps toward a BIG usage of 0.5."""
    values = dict(model=model_dir, target_usage="0.5", max_steps=8, report_to="none")
    return RouterTrainArguments(**tiny_run_fields(tmp_path, name, **{**values, **overrides}))


def train_duo_argv(output_dir: Path, cache_dir: Path, **flags) -> list[str]:
    """Command-line flags of ``training/train_duo.py`` for a tiny run; ``flags`` (``max_steps=6``) override them."""
    values = dict(
        output_dir=output_dir, builtin_max_chars=2000, vocab_size=300, hidden_size=32, num_layers=2, num_heads=4,
        block_size=16, batch_size=2, max_steps=2, eval_every=0, report_to="none", cache_dir=cache_dir,
    )
    values.update(flags)
    argv = [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]
    return [*argv, "--no-progress"]


def assert_outputs_like_dense(duo, dense, routes, **inputs) -> None:
    """All-BIG ``duo`` returns ``dense``'s attentions (eager), hidden states and ``return_dict=False`` tuple.

    ``inputs`` are the forward's inputs besides ``labels`` (set to the input ids). Values are compared within
    FLOAT_TOL: the Duo layer runs the same modules, on gathered rows when it dispatches.
    """
    ids = inputs["input_ids"]
    with torch.no_grad():
        expected = dense(**inputs, labels=ids, output_attentions=True, output_hidden_states=True)
        got = duo(**inputs, labels=ids, routes=routes, output_attentions=True, output_hidden_states=True)
        as_tuple = duo(**inputs, labels=ids, routes=routes, return_dict=False)
        dense_tuple = dense(**inputs, labels=ids, return_dict=False)
    close = dict(rtol=0, atol=FLOAT_TOL)
    num_layers = duo.config.num_hidden_layers
    assert len(got.attentions) == num_layers and got.attentions[0].dim() == 4  # [batch, heads, query, key]
    for got_layer, expected_layer in zip(got.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(got_layer, expected_layer, **close)
    assert len(got.hidden_states) == num_layers + 1  # the embeddings, then each layer's output
    for got_layer, expected_layer in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(got_layer, expected_layer, **close)
    # A tuple of the set fields in order, as the dense model's: loss, logits, cache, then the Duo fields.
    assert isinstance(as_tuple, tuple) and isinstance(dense_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], dense_tuple[0], **close)
    torch.testing.assert_close(as_tuple[1], dense_tuple[1], **close)
    assert type(as_tuple[2]) is type(dense_tuple[2])  # the cache (eval mode)
    assert torch.equal(as_tuple[3], routes)  # then the Duo fields: routes, token_losses
    assert len(as_tuple) == len(got.to_tuple()) - 2  # without the attentions and hidden states asked for above


def assert_same_greedy(got, expected, prompt_len: int, atol: float = FLOAT_TOL) -> None:
    """Two greedy ``generate`` runs (``return_dict_in_generate=True, output_logits=True``) of one model, computed
    in other shapes, agree: per row, equal tokens and step logits within ``atol`` up to the first step where the
    expected top two logits lie within ``2 * atol`` (rounding may pick either there; the rows part after it)."""
    got_logits, expected_logits = torch.stack(got.logits, 1), torch.stack(expected.logits, 1)
    top2 = expected_logits.topk(2, dim=-1).values
    near_tie = (top2[..., 0] - top2[..., 1]) <= 2 * atol
    for row in range(expected_logits.shape[0]):
        steps = expected_logits.shape[1]
        ties = near_tie[row].nonzero()
        last = int(ties[0]) if len(ties) else steps  # steps before the first near tie are decided
        torch.testing.assert_close(got_logits[row, :last], expected_logits[row, :last], rtol=0, atol=atol)
        new = slice(prompt_len, prompt_len + last)
        assert torch.equal(got.sequences[row, new], expected.sequences[row, new])
