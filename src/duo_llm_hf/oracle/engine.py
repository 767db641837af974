"""The oracle (stage 2): exhaustive route search, by evaluating the prefix tree of patterns.

For every pattern ``r`` of a route space the whole sequence is run with every token following ``r``, which gives
``loss[r, b, t]``; the oracle loss of a token is the minimum over ``r`` and its oracle pattern the argmin (ties to
the lowest pattern index, see `oracle.spaces`). The hidden state after layer ``l`` depends only on the first ``l``
choices, so the engine walks the tree of prefixes instead of running each pattern from scratch: per tree node the
attention of its layer runs once (``layer.attend``), then each allowed choice's FFN (``layer.mlp.run_choice``)
gives one child (``layer.merge``); the final norm, LM head and per-token cross-entropy run at the leaves only.
Nodes are batched along the batch dimension, at most ``chunk_tokens`` tokens per forward, and the frontier is
processed depth-first in chunks, so memory stays bounded; prefixes that cannot complete a pattern of the space
(under a budget) are pruned. The losses stream out chunk by chunk to the reducers (`oracle.reducers`): the full
``loss[pattern, token]`` table is never held.

Two oracles:

- **independent** (the paper's, the default): token ``t``'s loss under ``r`` is taken from the forward pass in
  which *every* token follows ``r``, so each token is scored on a context routed like itself; the oracle's choices
  for different tokens are not mutually consistent (no single forward pass realises all of them at once).
- **causal** (``causal=True``, beyond the paper): tokens are decided left to right. Token ``t`` is scored on the
  keys and values (KV cache) of the routes already chosen for tokens ``< t``; its best pattern is then fixed and
  its keys and values appended to the cache. The result is realisable: one forward pass with
  ``routes=<the causal oracle's routes>`` reproduces its losses (up to float rounding: the cache path adds in
  another order). It costs one tree walk per token and budget.

This module is part of the installed package, not of the remote code a saved model ships: the model's
``routing="oracle"`` mode imports it from ``duo_llm_hf`` (`models.modeling_duo.oracle_forward`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from ..models.losses import IGNORE_INDEX, mean_loss, next_token_targets, target_losses
from ..models.routes import BIG, CHOICE_NAMES
from ..utils.flops import attention_flops, ffn_flops
from .reducers import BatchReduction, OracleReducer, RunningMin
from .spaces import RouteSpace, index_to_pattern, pattern_index

# Tokens (prefix nodes x sequences x positions) per forward batch of the tree walk, by default. Memory is about
# chunk_tokens x 4 bytes x (3 x intermediate_size + 2 x vocab_size + 3 x num_layers x hidden_size). On a CPU,
# batches that stay in cache run fastest (bench_oracle.py); an accelerator wants large ones, as large as its free
# memory allows (ACCELERATOR_MEMORY_FRACTION of it, at most MAX_CHUNK_TOKENS).
CPU_CHUNK_TOKENS = 4096
ACCELERATOR_CHUNK_TOKENS = 65536
ACCELERATOR_MEMORY_FRACTION = 0.5
MAX_CHUNK_TOKENS = 1 << 20


def chunk_bytes_per_token(config) -> int:
    """Bytes of activations one token of a tree-walk batch takes at most (the estimate above)."""
    return 4 * (
        3 * config.intermediate_size + 2 * config.vocab_size + 3 * config.num_hidden_layers * config.hidden_size
    )


def default_chunk_tokens(device: torch.device | str, config=None) -> int:
    """The default ``chunk_tokens`` on a device: 4096 on a CPU; on a CUDA device with the model's ``config``, the
    largest power of two whose batch (`chunk_bytes_per_token`) fits in half the free memory (at least 4096, at most
    2^20 tokens); else 65536."""
    device = torch.device(device)
    if device.type == "cpu":
        return CPU_CHUNK_TOKENS
    if device.type != "cuda" or config is None:
        return ACCELERATOR_CHUNK_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(free * ACCELERATOR_MEMORY_FRACTION) // chunk_bytes_per_token(config)
    return max(CPU_CHUNK_TOKENS, min(MAX_CHUNK_TOKENS, 1 << max(fits, 1).bit_length() - 1))


# Token rows per block of the LM head at the leaves. A leaf chunk's logits would be [tokens, vocab] at once (805 MB
# for 4096 tokens of a 49,152-token vocabulary, and as much again for its log-softmax); in blocks of 256 rows they
# take 50 MB, and positions without a target (the last of each block) skip the head. Same numbers: the
# cross-entropy of a row does not depend on the rows beside it. An accelerator takes larger blocks.
CPU_HEAD_ROWS = 256
ACCELERATOR_HEAD_ROWS = 8192

# on_leaves(indices [m] ascending, losses [m, N, T], logits [m, N, T, vocab] or None without with_logits)
LeafFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class _SharedPrefixCache:
    """Stands in for the KV cache during a causal tree walk: every prefix node sees the keys and values that the
    earlier tokens got under their chosen routes; the new token's own keys and values are appended, not stored."""

    def __init__(self, cache: DynamicCache, num_sequences: int):
        self.cache = cache
        self.num_sequences = num_sequences

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        copies = key_states.shape[0] // self.num_sequences
        keys = layer.keys.repeat(copies, 1, 1, 1)
        values = layer.values.repeat(copies, 1, 1, 1)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


class _PrefixTree:
    """One walk of the prefix tree for a batch of ``N`` sequences of ``S`` positions.

    Every level keeps a queue of nodes (hidden states ``[m, N, S, hidden]`` with their prefixes ``[m, depth]``).
    A walk always serves the deepest level holding a full chunk (depth first, so queues stay short: each level
    holds fewer than ``(len(choices) + 1) x chunk`` nodes) and otherwise the shallowest non-empty one.

    The tree is cut at ``split_depth`` into *units*, the subtrees under its prefixes there: the top of the tree
    is walked whole, then each unit (those ``owned`` by this process) in a walk of its own. Which nodes share a
    forward batch then never depends on how the units are shared between processes, so every process computes
    bit for bit what a single process would (GEMM kernels may round differently for different batch sizes).
    """

    def __init__(
        self,
        model,
        choices: Sequence[int],
        feasible: Callable[[torch.Tensor], torch.Tensor],
        on_leaves: LeafFn,
        chunk_tokens: int | None,
        context: int,
        split_depth: int = 0,
        owned: Callable[[torch.Tensor], torch.Tensor] | None = None,
        past: _SharedPrefixCache | None = None,
        on_progress: Callable[[int], None] | None = None,
        with_logits: bool = False,
    ):
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={chunk_tokens!r}: give a positive number of tokens per forward batch.")
        self.model = model
        self.layers = model.model.layers
        self.choices = tuple(choices)
        self.feasible = feasible
        self.on_leaves = on_leaves
        self.chunk_tokens = chunk_tokens
        self.context = context
        self.split_depth = split_depth
        self.owned = owned
        self.past = past
        self.on_progress = on_progress
        self.with_logits = with_logits

    def run(self, hidden: torch.Tensor, layer_kwargs: dict, targets: torch.Tensor) -> None:
        """Walk the tree from the embeddings ``hidden`` (``[N, S, hidden]``) of the batch."""
        self.num_sequences = hidden.shape[0]
        self.layer_kwargs = layer_kwargs
        self.targets = targets
        # A node is N sequences x S positions; in a causal walk (S = 1) its one token attends to `context` keys,
        # which count like that many tokens (the cache is copied per node). A chunk holds at least one node.
        per_node = hidden.shape[0] * max(hidden.shape[1], self.context)
        chunk_tokens = self.chunk_tokens or default_chunk_tokens(hidden.device, self.model.config)
        self.max_nodes = max(1, chunk_tokens // per_node)
        root = torch.zeros(1, 0, dtype=torch.long)
        if self.feasible(root).all():
            self._walk(0, hidden[None], root)

    def _walk(self, start: int, states: torch.Tensor, prefixes: torch.Tensor) -> None:
        """Walk the subtrees under the nodes ``prefixes`` (all at depth ``start``)."""
        if start == self.split_depth:
            keep = torch.ones(len(prefixes), dtype=torch.bool) if self.owned is None else self.owned(prefixes)
            if not keep.any():
                return
            if not keep.all():
                states, prefixes = states[keep.nonzero().squeeze(1).to(states.device)], prefixes[keep]
        queues: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        sizes = [0] * (len(self.layers) + 1)
        self._push(queues, sizes, start, states, prefixes)
        while True:
            full = [level for level, size in enumerate(sizes) if size >= self.max_nodes]
            waiting = [level for level, size in enumerate(sizes) if size]
            if not waiting:
                return
            level = full[-1] if full else waiting[0]
            states, prefixes = self._pop(queues, sizes, level)
            if level == self.split_depth and start < self.split_depth:
                for i in range(len(prefixes)):  # each unit alone
                    self._walk(level, states[i : i + 1], prefixes[i : i + 1])
            elif level == len(self.layers):
                self._leaves(states, prefixes)
            else:
                self._expand(queues, sizes, level, states, prefixes)

    @staticmethod
    def _push(queues, sizes, level: int, states: torch.Tensor, prefixes: torch.Tensor) -> None:
        queues.setdefault(level, []).append((states, prefixes))
        sizes[level] += len(prefixes)

    def _pop(self, queues, sizes, level: int) -> tuple[torch.Tensor, torch.Tensor]:
        queue, wanted = queues[level], self.max_nodes
        states, prefixes = [], []
        while queue and wanted:
            s, p = queue[0]
            if len(p) <= wanted:
                queue.pop(0)
            else:
                queue[0] = (s[wanted:], p[wanted:])
                s, p = s[:wanted], p[:wanted]
            states.append(s)
            prefixes.append(p)
            wanted -= len(p)
        sizes[level] -= self.max_nodes - wanted
        if len(states) == 1:
            return states[0], prefixes[0]
        return torch.cat(states), torch.cat(prefixes)

    def _batched(self, value, copies: int):
        """Layer keyword arguments for ``copies`` nodes stacked along the batch: per-sequence tensors repeat."""
        if isinstance(value, torch.Tensor):
            n = self.num_sequences
            if value.dim() and n > 1 and value.shape[0] == n:
                return value.repeat(copies, *([1] * (value.dim() - 1)))
            return value
        if isinstance(value, tuple):
            return tuple(self._batched(v, copies) for v in value)
        return value

    def _expand(self, queues, sizes, level: int, states: torch.Tensor, prefixes: torch.Tensor) -> None:
        """Run layer ``level``'s attention once for the chunk, then each feasible choice's FFN: the children."""
        layer = self.layers[level]
        m, n, s, h = states.shape
        kwargs = {k: self._batched(v, m) for k, v in self.layer_kwargs.items()}
        residual, ffn_input = layer.attend(states.reshape(m * n, s, h), cache=self.past, **kwargs)
        residual, ffn_input = residual.view(m, n, s, h), ffn_input.view(m, n, s, h)
        for code in self.choices:
            children = torch.cat([prefixes, torch.full((m, 1), code, dtype=torch.long)], dim=1)
            keep = self.feasible(children)
            if not keep.any():
                continue
            res, inp = residual, ffn_input
            if not keep.all():
                rows = keep.nonzero().squeeze(1).to(states.device)
                res, inp, children = res[rows], inp[rows], children[keep]
            self._push(queues, sizes, level + 1, layer.merge(res, layer.mlp.run_choice(inp, code)), children)

    def _leaves(self, states: torch.Tensor, prefixes: torch.Tensor) -> None:
        """Final norm, LM head and per-token losses of complete patterns; hand them on in index order."""
        indices = pattern_index(prefixes, self.choices)
        order = torch.argsort(indices)
        if not bool((order == torch.arange(len(order))).all()):
            indices, states = indices[order], states[order.to(states.device)]
        m, n, s, _ = states.shape
        targets = self.targets.expand(m, n, s)
        if self.with_logits:
            logits = self.model.lm_head(self.model.model.finalize(states))
            self.on_leaves(indices, target_losses(logits, targets), logits)
        else:
            self.on_leaves(indices, leaf_losses(self.model, states, targets), None)
        if self.on_progress is not None:
            self.on_progress(m * n * s)


def leaf_losses(model, states: torch.Tensor, targets: torch.Tensor, head_rows: int | None = None) -> torch.Tensor:
    """Per-token losses (shaped like ``targets``) of the last layer's outputs ``states`` (``[..., hidden]``): final
    norm, LM head and cross-entropy in blocks of ``head_rows`` tokens (default `CPU_HEAD_ROWS` on a CPU, else
    `ACCELERATOR_HEAD_ROWS`), only where there is a target (0 elsewhere)."""
    if head_rows is None:
        head_rows = CPU_HEAD_ROWS if states.device.type == "cpu" else ACCELERATOR_HEAD_ROWS
    hidden = states.reshape(-1, states.shape[-1])
    flat = targets.reshape(-1).to(states.device)
    losses = torch.zeros(flat.shape, dtype=torch.float32, device=states.device)
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    for start in range(0, len(rows), head_rows):
        block = rows[start : start + head_rows]
        logits = model.lm_head(model.model.finalize(hidden[block]))
        losses[block] = target_losses(logits, flat[block])
    return losses.view(targets.shape)


def under_roots(prefixes: torch.Tensor, roots: torch.Tensor | None, choices: Sequence[int]) -> torch.Tensor:
    """Which prefixes lie on a path to (or below) one of ``roots`` (``[R, depth]``); all when ``roots`` is None."""
    if roots is None:
        return torch.ones(len(prefixes), dtype=torch.bool)
    depth = min(prefixes.shape[1], roots.shape[1])
    if depth == 0:
        return torch.full((len(prefixes),), len(roots) > 0, dtype=torch.bool)
    return torch.isin(pattern_index(prefixes[:, :depth], choices), pattern_index(roots[:, :depth], choices))


def _check_batch(model, input_ids: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("oracle: input_ids must be a LongTensor of token ids, shape [num_sequences, seq_len].")
    if labels is None:
        return input_ids
    if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
        raise ValueError(
            f"oracle: labels must be a LongTensor shaped like input_ids {list(input_ids.shape)}; use -100 for "
            "positions without a target."
        )
    return labels


@torch.no_grad()
def walk_prefix_tree(
    model,
    input_ids: torch.LongTensor,
    space: RouteSpace,
    on_leaves: LeafFn,
    *,
    labels: torch.LongTensor | None = None,
    chunk_tokens: int | None = None,
    roots: torch.Tensor | None = None,
    on_progress: Callable[[int], None] | None = None,
    with_logits: bool = False,
) -> None:
    """Evaluate every pattern of ``space`` on a batch, streaming the leaves' losses to ``on_leaves``.

    ``model``: a Duo causal LM (``model.model.embed/layers/finalize``, ``model.lm_head``). ``input_ids``:
    ``[N, T]``; ``labels`` default to ``input_ids`` (position ``t`` scores ``labels[t + 1]``, -100 ignored).
    ``on_leaves(indices, losses, logits)`` receives chunks of patterns in ascending index order within a chunk
    (``losses[m, N, T]``; ``logits[m, N, T, vocab]`` with ``with_logits``, else None: the LM head then runs in
    small blocks, `leaf_losses`); every pattern of the space (under ``roots``, prefixes
    ``[R, depth]`` that restrict the walk to part of the tree) is delivered exactly once.
    """
    labels = _check_batch(model, input_ids, labels)
    targets = next_token_targets(labels).to(input_ids.device)
    hidden, layer_kwargs = model.model.embed(input_ids)
    tree = _PrefixTree(
        model,
        space.choices,
        space.feasible,
        on_leaves,
        chunk_tokens,
        input_ids.shape[1],
        split_depth=space.split_depth,
        owned=_owned(space, roots),
        on_progress=on_progress,
        with_logits=with_logits,
    )
    tree.run(hidden, layer_kwargs, targets)


def _owned(space: RouteSpace, roots: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Which units (prefixes at ``space.split_depth``) lie under ``roots``; None: all of them."""
    if roots is None:
        return None
    if roots.shape[1] > space.split_depth:
        raise ValueError(
            f"roots of depth {roots.shape[1]} are below the space's split depth {space.split_depth}; "
            "take them from RouteSpace.partition."
        )
    return lambda prefixes: under_roots(prefixes, roots, space.choices)


def pattern_losses(
    model,
    input_ids: torch.LongTensor,
    space: RouteSpace,
    *,
    labels: torch.LongTensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole table for a small space: ``(patterns [P, layers], losses [P, N, T])`` in pattern-index order.

    Meant for small spaces, checks and analyses; the oracle itself never builds this table.
    """
    table = torch.zeros(space.size, *input_ids.shape, device=input_ids.device)

    def keep(indices: torch.Tensor, losses: torch.Tensor, logits: torch.Tensor | None) -> None:
        table[space.ranks(indices).to(table.device)] = losses

    walk_prefix_tree(model, input_ids, space, keep, labels=labels, chunk_tokens=chunk_tokens)
    return space.patterns, table


@torch.no_grad()
def causal_oracle(
    model,
    input_ids: torch.LongTensor,
    space: RouteSpace,
    budget: int = 0,
    *,
    labels: torch.LongTensor | None = None,
    chunk_tokens: int | None = None,
    roots: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The causally consistent oracle for budget number ``budget`` of ``space``: ``(loss, index)``, each ``[N, T]``.

    Tokens are decided left to right: token ``t`` tries every pattern allowed at ``t`` on the KV cache of the
    routes chosen for tokens ``< t``, keeps the argmin (ties to the lowest index; tokens without a target take the
    lowest allowed index), and its keys and values under that pattern join the cache. ``reduce(loss, index)``
    combines the per-token minima of processes that split the tree (``roots``) before the choice is fixed.
    """
    labels = _check_batch(model, input_ids, labels)
    targets = next_token_targets(labels).to(input_ids.device)
    num_sequences, seq_len = input_ids.shape
    choices, num_layers = space.choices, space.num_layers
    spec = space.budgets[budget]
    classes = torch.unique(space.counts[space.members[budget]], dim=0)
    big = spec.big_at(seq_len)
    owned = _owned(space, roots)
    cache = DynamicCache(config=model.config)
    losses = torch.zeros(num_sequences, seq_len, device=input_ids.device)
    indices = torch.zeros(num_sequences, seq_len, dtype=torch.long, device=input_ids.device)
    for t in range(seq_len):
        allowed = classes if big is None else classes[classes[:, BIG] == big[t]]

        def feasible(prefixes: torch.Tensor, allowed=allowed) -> torch.Tensor:
            return space.feasible(prefixes, allowed)

        running = RunningMin((1, num_sequences, 1), input_ids.device)

        def keep(idx: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor | None, running=running) -> None:
            running.update(0, loss, idx)

        step = input_ids[:, t : t + 1]
        hidden, layer_kwargs = model.model.embed(step, cache=cache)
        past = _SharedPrefixCache(cache, num_sequences) if t else None
        tree = _PrefixTree(
            model,
            choices,
            feasible,
            keep,
            chunk_tokens,
            t + 1,
            split_depth=space.split_depth,
            owned=owned,
            past=past,
            on_progress=on_progress,
        )
        tree.run(hidden, layer_kwargs, targets[:, t : t + 1])
        loss, index = running.loss[0, :, 0], running.index[0, :, 0]
        if reduce is not None:
            loss, index = reduce(loss, index)
        losses[:, t], indices[:, t] = loss, index
        routes = index_to_pattern(index, choices, num_layers).to(input_ids.device)
        model.model(input_ids=step, cache=cache, use_cache=True, routes=routes[:, None, :])
    return losses, indices


@torch.no_grad()
def oracle_search(
    model,
    input_ids: torch.LongTensor,
    space: RouteSpace,
    *,
    labels: torch.LongTensor | None = None,
    best_of_k: int = 0,
    seed: int = 0,
    uniform: Sequence[str] = (),
    causal: bool = False,
    chunk_tokens: int | None = None,
    roots: torch.Tensor | None = None,
    reduce: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> BatchReduction:
    """Run the oracle on one batch ``[N, T]`` and return its reductions for every budget of ``space``.

    One enumeration of the space feeds the oracle, best-of-K (``best_of_k`` patterns per budget drawn with
    ``seed``), the per-pattern loss sums (fixed strategy) and the ``uniform`` patterns' losses (``"small"``,
    ``"big"``; build the space with ``extra_classes`` so that they are enumerated). With ``causal`` the causally
    consistent oracle is computed too, once per budget. ``roots`` restricts the walk to one process's part of the
    tree (`RouteSpace.partition`); combine the parts with `BatchReduction.combine` (``reduce`` does it for the
    causal oracle, which needs the combined choice at every token).
    """
    labels = _check_batch(model, input_ids, labels)
    mask = next_token_targets(labels) != IGNORE_INDEX
    reducer = OracleReducer(space, mask.to(input_ids.device), best_of_k=best_of_k, seed=seed, uniform=uniform)
    walk_prefix_tree(
        model,
        input_ids,
        space,
        reducer.update,
        labels=labels,
        chunk_tokens=chunk_tokens,
        roots=roots,
        on_progress=on_progress,
    )
    result = reducer.reduction()
    if causal:
        found = [
            causal_oracle(
                model,
                input_ids,
                space,
                g,
                labels=labels,
                chunk_tokens=chunk_tokens,
                roots=roots,
                reduce=reduce,
                on_progress=on_progress,
            )
            for g in range(len(space.budgets))
        ]
        result.causal_loss = torch.stack([loss for loss, _ in found])
        result.causal_index = torch.stack([index for _, index in found])
    return result


@dataclass
class OracleRouting:
    """The oracle as a routing mode: per-token routes ``[N, T, layers]``, their losses ``[N, T]`` (0 where there
    is no target), the mean ``loss``, and per-token ``logits`` ``[N, T, vocab]`` under each token's oracle route."""

    loss: torch.Tensor
    token_losses: torch.Tensor
    routes: torch.LongTensor
    logits: torch.Tensor


@torch.no_grad()
def oracle_routing(
    model,
    input_ids: torch.LongTensor,
    labels: torch.LongTensor | None,
    budget=None,
    *,
    causal: bool = False,
    chunk_tokens: int | None = None,
    attention_mask: torch.Tensor | None = None,
    route_options: Sequence[int | str] | None = None,
) -> OracleRouting:
    """Route a batch as the oracle would: each token takes its best pattern under ``budget`` given the labels.

    ``budget``: one budget (`oracle.spaces.parse_layer_budget`: None for every pattern over the model's
    ``route_options``, a BIG count, counts per choice, a position schedule like ``"6:2"``). ``causal``: the
    causally consistent oracle instead of the paper's independent one (see the module docstring). Tokens
    without a target take the lowest-index allowed pattern.
    """
    if input_ids is None:
        raise ValueError("routing='oracle' needs input_ids (not inputs_embeds).")
    if labels is None:
        raise ValueError("routing='oracle' needs labels: the oracle picks each token's route by its loss.")
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        raise ValueError(
            "routing='oracle' does not take padded batches; give unpadded blocks and mark positions without a "
            "target with labels=-100."
        )
    if isinstance(budget, (list, tuple)) and not all(isinstance(b, int) for b in budget) or budget == "classes":
        raise ValueError(f"routing='oracle' takes one budget, got {budget!r}; run oracle_search for several.")
    labels = _check_batch(model, input_ids, labels)
    space = RouteSpace.from_config(model.config, [budget], route_options=route_options)
    mask = next_token_targets(labels) != IGNORE_INDEX
    if causal:
        losses, index = causal_oracle(model, input_ids, space, 0, labels=labels, chunk_tokens=chunk_tokens)
        routes = index_to_pattern(index, space.choices, space.num_layers)
        logits = model(input_ids=input_ids, routes=routes, use_cache=False).logits
    else:
        reducer = OracleReducer(space, mask.to(input_ids.device), keep_logits=True)
        walk_prefix_tree(
            model, input_ids, space, reducer.update, labels=labels, chunk_tokens=chunk_tokens, with_logits=True
        )
        losses, index, logits = reducer.oracle.loss[0], reducer.oracle.index[0], reducer.logits
        routes = index_to_pattern(index, space.choices, space.num_layers)
    mask = mask.to(losses.device)
    losses = losses * mask
    return OracleRouting(loss=mean_loss(losses, mask), token_losses=losses, routes=routes, logits=logits)


def tree_flops(config, space: RouteSpace, seq_len: int) -> dict[str, dict[str, float]]:
    """Forward FLOPs per token of evaluating every pattern of ``space``: naively (one full forward per pattern)
    and by the prefix tree (attention once per tree node, each choice's FFN once per child, LM head per leaf).

    Returns ``{"naive": {...}, "tree": {...}}`` with ``attention``, ``ffn``, ``lm_head`` and ``total``, plus
    ``predicted_speedup`` (naive total / tree total). Elementwise work and the cross-entropy are not counted.
    """
    num_layers, patterns = space.num_layers, space.patterns
    attention = attention_flops(config, seq_len)
    head = 2.0 * config.hidden_size * config.vocab_size
    ffn = {code: ffn_flops(config, CHOICE_NAMES[code]) for code in space.choices}
    naive = {
        "attention": space.size * num_layers * attention,
        "ffn": sum(float(space.counts[:, code].sum()) * cost for code, cost in ffn.items()),
        "lm_head": space.size * head,
    }
    tree_ffn = 0.0
    for depth in range(1, num_layers + 1):
        ids = pattern_index(patterns[:, :depth], space.choices)
        first = torch.ones_like(ids, dtype=torch.bool)
        first[1:] = ids[1:] != ids[:-1]
        last = patterns[first, depth - 1]
        tree_ffn += sum(float((last == code).sum()) * cost for code, cost in ffn.items())
    tree = {
        "attention": sum(space.prefix_counts[:num_layers]) * attention,
        "ffn": tree_ffn,
        "lm_head": space.size * head,
    }
    for part in (naive, tree):
        part["total"] = part["attention"] + part["ffn"] + part["lm_head"]
    return {"naive": naive, "tree": tree, "predicted_speedup": naive["total"] / tree["total"]}
