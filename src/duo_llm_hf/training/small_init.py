"""Where the small FFNs of a finetuned pretrained model start: a slice of the big FFN, then local distillation.

A pretrained model made Duo (`from_dense`) gets freshly initialised small FFNs, whose output is noise next to the
big FFN's; routed to them, the residual stream of a deep model is wrecked before training starts. Two remedies:

- *slicing* (as MatFormer and Flextron do): each small FFN becomes the big FFN restricted to its ``k`` most
  important inner neurons (``k`` = the small inner size). A neuron is a row of the input projections (Llama:
  ``gate_proj`` and ``up_proj``; OPT: ``fc1`` with its bias) and a column of the output projection (``down_proj``;
  ``fc2``, whose bias the small FFN copies whole). `neuron_scores` ranks them by weight norms (``slice-weight``)
  or by their mean absolute activation on calibration blocks in an all-BIG forward times the norm of their output
  column (``slice-activation``); `slice_small_ffns` copies the top ``k`` in the big FFN's order.
- *local distillation* (`distill_small_ffns`): each small FFN learns, by MSE, its big FFN's output on the inputs
  that FFN sees in an all-BIG forward. The inputs are captured without gradients, so each layer's loss trains
  its own small FFN only and a step costs one forward plus the small FFNs' backward.

`start_small_ffns` runs what a finetuning run's arguments ask (`FinetuneArguments.small_init`, ``distill_steps``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Training blocks that calibrate ``slice-activation`` (fewer if the corpus has fewer).
CALIBRATION_BLOCKS = 64
SLICE_METHODS = ("slice-weight", "slice-activation")


def ffn_projections(ffn: nn.Module) -> tuple[list[nn.Linear], nn.Linear]:
    """An FFN's input projections (one row per inner neuron) and its output projection (one column per neuron):
    Llama's ``[gate_proj, up_proj], down_proj``, OPT's ``[fc1], fc2``."""
    if all(hasattr(ffn, name) for name in ("gate_proj", "up_proj", "down_proj")):
        return [ffn.gate_proj, ffn.up_proj], ffn.down_proj
    if all(hasattr(ffn, name) for name in ("fc1", "fc2")):
        return [ffn.fc1], ffn.fc2
    raise ValueError(f"{type(ffn).__name__} is not a Llama (gate/up/down_proj) or OPT (fc1/fc2) FFN.")


def duo_ffns(model: nn.Module) -> list[nn.Module]:
    """The routed FFN (`DuoFFN`, with ``.big`` and ``.small``) of each decoder layer of a Duo model."""
    return [layer.mlp for layer in model.model.layers]


def _weight_score(big: nn.Module) -> torch.Tensor:
    inputs, output = ffn_projections(big)
    score = output.weight.detach().float().norm(dim=0)
    for projection in inputs:
        score = score * projection.weight.detach().float().norm(dim=1)
    return score


@contextmanager
def _captured(modules: list[nn.Module], capture: Callable[[int, tuple, torch.Tensor], None]) -> Iterator[None]:
    """Forward hooks calling ``capture(index, inputs, output)`` for each module of ``modules`` while inside."""
    handles = [
        module.register_forward_hook(lambda _m, inputs, output, i=i: capture(i, inputs, output))
        for i, module in enumerate(modules)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _all_big(model: nn.Module, input_ids: torch.Tensor) -> None:
    """An all-BIG forward of ``input_ids`` (no loss, no cache) for the hooks to see."""
    # One logit kept: the hooks need the layers only, and the LM head is a large share of a small model's forward.
    model(input_ids=input_ids.to(model.device), routing="all-big", use_cache=False, logits_to_keep=1)


def _activation_score(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    ffns = duo_ffns(model)
    outputs = [ffn_projections(ffn.big)[1] for ffn in ffns]
    sums = [torch.zeros(out.in_features, dtype=torch.float64, device=out.weight.device) for out in outputs]
    count = 0

    def add(i: int, inputs: tuple, _output: torch.Tensor) -> None:
        # the output projection's input is the neurons' activation
        sums[i] += inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).sum(0, dtype=torch.float64)

    with torch.no_grad(), _captured(outputs, add):
        for batch in blocks.split(batch_size):
            _all_big(model, batch)
            count += batch.numel()
    return [(total / count).float() * out.weight.detach().float().norm(dim=0) for total, out in zip(sums, outputs)]


def neuron_scores(
    model: nn.Module, method: str, blocks: torch.Tensor | None = None, batch_size: int = 8
) -> list[torch.Tensor]:
    """The importance of each inner neuron of each layer's big FFN (one ``[intermediate_size]`` tensor a layer).

    ``slice-weight``: the product of the neuron's row norms in the input projections and its column norm in the
    output projection (Llama: ``||gate_i|| * ||up_i|| * ||down_:,i||``; OPT: ``||fc1_i|| * ||fc2_:,i||``).
    ``slice-activation``: the mean absolute activation of the neuron (the output projection's input) over the
    tokens of ``blocks`` (``[n, block_size]`` token ids) in all-BIG forwards of ``batch_size`` blocks, times
    ``||down_:,i||`` (``||fc2_:,i||``).
    """
    if method == "slice-weight":
        return [_weight_score(ffn.big) for ffn in duo_ffns(model)]
    if method == "slice-activation":
        if blocks is None or len(blocks) == 0:
            raise ValueError("neuron_scores: slice-activation needs calibration blocks.")
        return _activation_score(model, blocks, batch_size)
    raise ValueError(f"neuron_scores: {method!r} is not one of {list(SLICE_METHODS)}.")


def top_neurons(score: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` highest scores, in increasing order (the big FFN's order, so a slice is the same
    whatever the sort did with ties)."""
    return score.topk(k).indices.sort().values


def slice_small_ffns(model: nn.Module, scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make each layer's small FFN its big FFN restricted to the top neurons of ``scores`` (`neuron_scores`).

    Copies the neurons' rows (and biases) of the input projections and columns of the output projection; the
    output projection's bias is copied whole. With the other neurons of the big FFN zeroed, the big FFN's output
    is the small FFN's. Returns the kept neuron indices of each layer.
    """
    kept = []
    with torch.no_grad():
        for ffn, score in zip(duo_ffns(model), scores, strict=True):
            big_inputs, big_output = ffn_projections(ffn.big)
            small_inputs, small_output = ffn_projections(ffn.small)
            index = top_neurons(score.to(big_output.weight.device), small_output.in_features)
            for big, small in zip(big_inputs, small_inputs):
                small.weight.copy_(big.weight[index])
                if small.bias is not None:
                    small.bias.copy_(big.bias[index])
            small_output.weight.copy_(big_output.weight[:, index])
            if small_output.bias is not None:
                small_output.bias.copy_(big_output.bias)
            kept.append(index)
    return kept


def sample_blocks(blocks, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` training blocks as one ``[count, block_size]`` tensor: drawn at random (``generator``) from a
    corpus of known length holding more, else its first ``count`` (all of a shorter one; a stream's first)."""
    if hasattr(blocks, "__len__") and len(blocks) > count:
        indices = torch.randperm(len(blocks), generator=generator)[:count].tolist()
        rows = (blocks[i]["input_ids"] for i in indices)
    else:
        rows = (row["input_ids"] for row in itertools.islice(blocks, count))
    return torch.stack([torch.as_tensor(row, dtype=torch.long) for row in rows])


def _relative_errors(pairs: list[tuple[torch.Tensor, torch.Tensor]], ffns: list[nn.Module]) -> list[torch.Tensor]:
    """Per layer ``||small(x) - big(x)|| / ||big(x)||`` on the captured ``(x, big(x))`` pairs."""
    return [(ffn.small(x) - y).norm() / y.norm().clamp_min(1e-12) for (x, y), ffn in zip(pairs, ffns)]


def _big_pairs(model: nn.Module, batch: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's big FFN input and output in an all-BIG forward of ``batch`` (no gradients)."""
    ffns = duo_ffns(model)
    pairs: list = [None] * len(ffns)

    def keep(i: int, inputs: tuple, output: torch.Tensor) -> None:
        pairs[i] = (inputs[0].detach(), output.detach())

    with torch.no_grad(), _captured([ffn.big for ffn in ffns], keep):
        _all_big(model, batch)
    return pairs


def distill_small_ffns(
    model: nn.Module,
    blocks: torch.Tensor,
    steps: int,
    batch_size: int,
    learning_rate: float,
    generator: torch.Generator,
    log: Callable[[str], None] | None = None,
    log_every: int = 10,
) -> dict[str, float]:
    """Train each layer's small FFN toward its big FFN's output on the inputs of an all-BIG forward (local MSE).

    Each of ``steps`` AdamW steps draws ``batch_size`` blocks of ``blocks`` (``[n, block_size]``) with
    ``generator``. Returns the mean over layers of ``||small - big|| / ||big||`` on the first step's batch before
    the first step (``distill/relative_error_start``) and after the last (``distill/relative_error_end``).
    ``log`` gets one line every ``log_every`` steps. The model is in eval mode meanwhile (no dropout).
    """
    ffns = duo_ffns(model)
    params = [p for ffn in ffns for p in ffn.small.parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    was_training = model.training
    model.eval()

    def draw() -> torch.Tensor:
        return blocks[torch.randint(len(blocks), (batch_size,), generator=generator)]

    pairs = probe = _big_pairs(model, draw())
    with torch.no_grad():
        start = torch.stack(_relative_errors(probe, ffns)).mean().item()
    for step in range(1, steps + 1):
        if step > 1:
            pairs = _big_pairs(model, draw())
        # One loss per layer on detached inputs: a layer's gradient reaches its own small FFN only.
        loss = sum(nn.functional.mse_loss(ffn.small(x), y) for (x, y), ffn in zip(pairs, ffns))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log is not None and (step % log_every == 0 or step == steps):
            log(f"distill step {step}/{steps}: summed MSE {loss.item():.4g}")
    with torch.no_grad():
        end = torch.stack(_relative_errors(probe, ffns)).mean().item()
    model.train(was_training)
    optimizer.zero_grad(set_to_none=True)
    return {"distill/relative_error_start": start, "distill/relative_error_end": end}


def start_small_ffns(args, model: nn.Module, train_blocks, accelerator=None) -> dict[str, float]:
    """Initialise and distil a fresh finetuning run's small FFNs as ``args`` (`FinetuneArguments`) say.

    ``train_blocks`` are the run's packed training blocks; calibration and distillation draw from them with a
    generator seeded by ``args.seed``, so the result is reproducible. The work runs on ``accelerator.device``
    (the model is moved there; None: where the model is); the main process prints one line per thing done, and
    with ``args.progress`` the distillation's progress. Returns what goes into the run's train results (the
    distillation's relative errors).
    """
    if args.small_init == "random" and args.distill_steps == 0:
        return {}
    if accelerator is not None:
        model.to(accelerator.device)
    main = accelerator is None or accelerator.is_main_process

    def log(line: str) -> None:
        if main:
            print(line, flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    pool = max(CALIBRATION_BLOCKS, args.distill_steps * args.batch_size)
    blocks = sample_blocks(train_blocks, pool, generator)
    if args.small_init != "random":
        calibration = blocks[:CALIBRATION_BLOCKS]
        scores = neuron_scores(model, args.small_init, calibration, args.batch_size)
        kept = slice_small_ffns(model, scores)
        how = "weight norms" if args.small_init == "slice-weight" else f"activations on {len(calibration)} blocks"
        log(f"small FFNs: sliced the top {len(kept[0])} neurons of each big FFN by {how}")
    if args.distill_steps == 0:
        return {}
    every = max(1, args.distill_steps // 10)
    results = distill_small_ffns(
        model,
        blocks,
        args.distill_steps,
        args.batch_size,
        args.distill_learning_rate,
        generator,
        log if args.progress else None,
        every,
    )
    log(
        f"small FFNs: distilled {args.distill_steps} steps, relative error "
        f"{results['distill/relative_error_start']:.4f} -> {results['distill/relative_error_end']:.4f}"
    )
    return results


__all__ = [
    "CALIBRATION_BLOCKS",
    "SLICE_METHODS",
    "distill_small_ffns",
    "duo_ffns",
    "ffn_projections",
    "neuron_scores",
    "sample_blocks",
    "slice_small_ffns",
    "start_small_ffns",
    "top_neurons",
]
