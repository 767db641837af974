"""Long oracle runs: batches of sequences, a progress bar, resumable checkpoints, many processes.

`run_oracle_study` evaluates a route space on ``[N, T]`` token blocks, ``batch_size`` sequences at a time.

- **Resumable**: after each batch the combined reductions go to ``<output_dir>/batches/batch_XXXXX.safetensors``
  and the finished batches, with each file's sha256, to ``oracle_state.json``, both written atomically (temp
  file, then ``os.replace``). Restarted with the same settings, a run first checks every finished batch file
  against its hash (a damaged or missing one is named in a warning and computed again), then does the remaining
  batches and gives the identical result. The run's *fingerprint* holds every setting that changes its results
  (the weights' and the token blocks' content hashes, dtype, architecture, route space, best-of-K, seed, causal,
  batch size); a run with another fingerprint is refused, naming what differs. Settings that change only speed or
  memory (``chunk_tokens``, the number of processes, the device) may change between sessions.
- **Many processes**: under ``accelerate launch`` every process takes a share of the prefix tree
  (`RouteSpace.partition`: top-of-tree prefixes, balanced by leaf count) for every batch, and the reductions are
  combined exactly (`BatchReduction.combine`) before they are written, so N processes give the result of one.
- **Progress**: a tqdm bar counts pattern-tokens (one pattern's loss at one token) with rate and time left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..models.modeling_duo import dense_config_fields
from ..models.routes import BIG
from ..utils.arguments import (
    parse_arguments,
    user_values,
)
from ..utils.errors import UsageError, unpickler_reason
from ..utils.files import atomic_save_tensors, atomic_write_json
from ..utils.loading import allow_route_options, inspect_duo_source, load_duo_model
from ..utils.processes import process_state
from ..utils.run_files import (
    ORACLE_RESULTS_FILE,
    ORACLE_STATE_FILE,
    ORACLE_SUMMARY_FILE,
    OVERWRITE_FLAG,
    check_fingerprint,
    file_hash,
    refuse_overwrite,
)
from ..utils.run_folder import remove_path, run_lock
from ..utils.schema import ORACLE_STATE_SCHEMA, check_state
from .arguments import TENSOR_SUFFIXES, OracleArguments, check_data_files
from .engine import oracle_search, under_roots
from .reducers import BatchReduction, RunningMin
from .results import OracleResult, space_spec
from .spaces import RouteSpace, uniform_classes

logger = logging.getLogger(__name__)

BATCH_DIR = "batches"
# Version of oracle_state.json: 2 added the weights' hash, dtype and architecture to the fingerprint, and a hash
# per batch file. Older run folders are refused (their fingerprint cannot prove they match).
STATE_FORMAT = 2
# Config fields that do not change a model's outputs (the routing fields are not in dense_config_fields).
_NEUTRAL_CONFIG_KEYS = ("dtype", "use_cache", "output_hidden_states", "output_attentions", "return_dict")


def study_space(config, budgets: Sequence | None = None, route_options: Sequence | None = None) -> RouteSpace:
    """The route space of a study: the model's layers and ``route_options`` (or a subset), the given budgets, and
    the all-small / all-big patterns (for token difficulty) even when no budget contains them."""
    space = RouteSpace.from_config(config, budgets, route_options=route_options)
    extra = uniform_classes(space.num_layers, space.choices).values()
    return RouteSpace(space.num_layers, space.choices, space.budgets, extra_classes=list(extra))


def load_token_blocks(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer=None,
    block_size: int | None = None,
    num_blocks: int | None = None,
) -> tuple[torch.LongTensor, str]:
    """Token blocks ``[N, T]`` for the oracle and an identifier of them (paths, shape, sha256 of the tokens).

    ``paths``: one ``.safetensors`` file (tensor ``input_ids``) or ``.pt`` file (a tensor, or a dict with
    ``input_ids``) holding pre-tokenized blocks; or text files, tokenized with ``tokenizer`` (an EOS token after
    each file when the tokenizer has one), concatenated and cut into ``block_size`` blocks (the rest dropped).
    ``num_blocks`` keeps the first blocks.
    """
    paths = check_data_files(paths)
    if Path(paths[0]).suffix in TENSOR_SUFFIXES:
        blocks = _load_tensor_file(Path(paths[0]))
        if block_size is not None and block_size != blocks.shape[1]:
            raise UsageError(
                f"{paths[0]} holds blocks of {blocks.shape[1]} tokens, but block_size={block_size} was asked; "
                "drop --block-size or re-tokenize."
            )
    else:
        blocks = _tokenize_files(paths, tokenizer, block_size, num_blocks)
    if num_blocks is not None:
        if num_blocks > len(blocks):
            raise UsageError(f"asked for {num_blocks} blocks, but the data holds only {len(blocks)}.")
        blocks = blocks[:num_blocks]
    digest = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()[:16]
    names = ",".join(str(p) for p in paths)
    return blocks, f"{names} ({len(blocks)}x{blocks.shape[1]} tokens, sha256 {digest})"


def check_token_ids(blocks: torch.Tensor, vocab_size: int, source: str) -> None:
    """Raise a `UsageError` when a token id of ``blocks`` (from ``source``) lies outside ``0 .. vocab_size - 1``."""
    if blocks.numel() and (blocks.min() < 0 or blocks.max() >= vocab_size):
        bad = blocks[(blocks < 0) | (blocks >= vocab_size)][0].item()
        raise UsageError(
            f"data: {source} holds token id {bad}, outside the model's vocabulary 0 .. {vocab_size - 1}; "
            "tokenize the data with the model's tokenizer."
        )


def _load_tensor_file(path: Path) -> torch.LongTensor:
    # Nothing is unpickled: safetensors, or torch.load with weights_only (plain tensors and containers only).
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(path)
            if "input_ids" not in tensors:
                raise UsageError(f"{path} has no tensor 'input_ids' (it has {sorted(tensors)}).")
            blocks = tensors["input_ids"]
        else:
            blocks = torch.load(path, weights_only=True, map_location="cpu")
            if isinstance(blocks, dict):
                if "input_ids" not in blocks:
                    raise UsageError(f"{path} holds a dict without 'input_ids' (keys {sorted(blocks)}).")
                blocks = blocks["input_ids"]
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        kind = "safetensors" if path.suffix == ".safetensors" else "weights-only torch.save"
        # torch's unpickling error advises weights_only=False: never pass that on.
        reason = unpickler_reason(err) if isinstance(err, pickle.UnpicklingError) else str(err).splitlines()[0][:200]
        raise UsageError(
            f"data: {str(path)!r} is not a readable {kind} file of token ids ({type(err).__name__}: {reason}); "
            "objects other than tensors are refused, nothing is unpickled."
        ) from err
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype.is_floating_point:
        raise UsageError(f"{path}: expected an integer tensor of token ids shaped [num_blocks, block_size].")
    return blocks.long()


def _tokenize_files(paths, tokenizer, block_size, num_blocks) -> torch.LongTensor:
    if tokenizer is None:
        raise UsageError("text data needs a tokenizer (the model folder's, or --tokenizer).")
    if not block_size or block_size < 2:
        raise UsageError(f"block_size={block_size!r}: text data is cut into blocks of at least 2 tokens.")
    wanted = None if num_blocks is None else num_blocks * block_size
    ids: list[int] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            # Tokenize whole lines in pieces, and stop reading once there are enough tokens.
            piece: list[str] = []
            size = 0
            for line in f:
                piece.append(line)
                size += len(line)
                if size >= 1 << 20:
                    ids += tokenizer("".join(piece), add_special_tokens=False)["input_ids"]
                    piece, size = [], 0
                    if wanted is not None and len(ids) >= wanted:
                        break
            if piece:
                ids += tokenizer("".join(piece), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if wanted is not None and len(ids) >= wanted:
            break
    count = len(ids) // block_size
    if count == 0:
        raise UsageError(f"the text gives {len(ids)} tokens, fewer than one block of {block_size}.")
    return torch.tensor(ids[: count * block_size], dtype=torch.long).view(count, block_size)


def _distributed():
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def _all_gather(tensor: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    if tensor.numel() == 0:  # nothing to exchange (e.g. no position-scheduled budget)
        return [tensor] * world_size
    dist = _distributed()
    flag = tensor.dtype == torch.bool
    send = (tensor.to(torch.uint8) if flag else tensor).contiguous()
    parts = [torch.empty_like(send) for _ in range(world_size)]
    dist.all_gather(parts, send)
    return [p.bool() for p in parts] if flag else parts


def _gather_reduction(reduction: BatchReduction, world_size: int) -> BatchReduction:
    tensors = {k: v for k, v in vars(reduction).items() if v is not None}
    gathered = {k: _all_gather(v, world_size) for k, v in tensors.items()}
    return BatchReduction.combine([BatchReduction(**{k: v[r] for k, v in gathered.items()}) for r in range(world_size)])


def _gather_min(world_size: int):
    def reduce(loss: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        running = RunningMin(loss.shape, loss.device)
        for part_loss, part_index in zip(_all_gather(loss, world_size), _all_gather(index, world_size)):
            running.merge(part_loss, part_index)
        return running.loss, running.index

    return reduce


def _work_per_sequence(space: RouteSpace, roots: torch.Tensor | None, seq_len: int, causal: bool) -> int:
    """Pattern-tokens this process computes per sequence (for the progress bar)."""
    mine = under_roots(space.patterns, roots, space.choices)
    work = int(mine.sum()) * seq_len
    if causal:
        for g, budget in enumerate(space.budgets):
            members = space.members[g] & mine
            big = budget.big_at(seq_len)
            if big is None:
                work += int(members.sum()) * seq_len
            else:
                per_k = {k: int((members & (space.counts[:, BIG] == k)).sum()) for k in set(big.tolist())}
                work += sum(per_k[k] for k in big.tolist())
    return work


def run_oracle_study(
    model,
    input_ids: torch.LongTensor,
    space: RouteSpace,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    best_of_k: int = 0,
    seed: int = 0,
    causal: bool = False,
    chunk_tokens: int | None = None,
    model_id: str = "",
    data_id: str = "",
    stop_after_batches: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    search: dict | None = None,
) -> OracleResult | None:
    """Run the oracle over ``input_ids`` (``[N, T]`` blocks) for every budget of ``space``; save and return the result.

    Writes ``oracle_results.safetensors`` and ``oracle_summary.json`` to ``output_dir`` (see `OracleResult`).
    A run already in ``output_dir`` with the same fingerprint (`oracle_fingerprint`) is resumed, or, when it has
    finished, its result is assembled again from its batch files; one with another fingerprint is refused
    (`UsageError` naming what differs). ``overwrite``: delete the run's files in ``output_dir`` first and start
    over. ``stop_after_batches``: stop after that many batches in this call (the run continues when called
    again), e.g. to fit a job into a time slot. ``model_id``, ``data_id`` and ``search`` (how the patterns of
``space`` were chosen, `oracle.search`; default ``{"method": "exact"}``) are recorded in the summary only.
    Returns the result on the main process once every batch is done, else None. Under ``accelerate launch``
    every process must call it with the same arguments.
    """
    state = process_state()
    world, rank, main = state.num_processes, state.process_index, state.is_main_process
    if world > 1 and _distributed() is None:
        raise RuntimeError("run_oracle_study: several processes but no torch.distributed group; use accelerate launch.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: it must be at least one sequence.")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be token blocks [num_sequences, seq_len], got shape {list(input_ids.shape)}.")
    output_dir = Path(output_dir)
    uniform = [
        name for name, vector in uniform_classes(space.num_layers, space.choices).items() if _has_class(space, vector)
    ]
    fingerprint = oracle_fingerprint(
        model, input_ids, space, best_of_k=best_of_k, seed=seed, causal=causal, batch_size=batch_size, uniform=uniform
    )
    num_batches = -(-input_ids.shape[0] // batch_size)
    with run_lock(output_dir, "oracle run"):  # one writer per run folder (re-entrant: `main` holds it already)
        if overwrite and main:
            _delete_run(output_dir)
        state.wait_for_everyone()
        hashes = _finished_batches(output_dir, fingerprint, num_batches, warn=main)
        # Every process has read the batch files before the main process rewrites a damaged one.
        state.wait_for_everyone()
        todo = [b for b in range(num_batches) if b not in hashes]
        if main:
            (output_dir / BATCH_DIR).mkdir(parents=True, exist_ok=True)
        roots = space.partition(world)[rank] if world > 1 else None
        reduce = _gather_min(world) if world > 1 else None
        per_sequence = _work_per_sequence(space, roots, input_ids.shape[1], causal)
        sequences_done = sum(min(batch_size, input_ids.shape[0] - b * batch_size) for b in hashes)
        bar = tqdm(
            total=per_sequence * input_ids.shape[0],
            initial=per_sequence * sequences_done,
            unit="pattern-token",
            unit_scale=True,
            desc=f"oracle ({space.size:,} patterns)",
            disable=not (progress and main),
            dynamic_ncols=True,
            postfix=f"sequences {sequences_done}/{input_ids.shape[0]}",
        )
        device = next(model.parameters()).device
        for ran, b in enumerate(todo):
            if stop_after_batches is not None and ran >= stop_after_batches:
                bar.close()
                return None
            batch = input_ids[b * batch_size : (b + 1) * batch_size].to(device)
            reduction = oracle_search(
                model, batch, space, best_of_k=best_of_k, seed=seed, uniform=uniform, causal=causal,
                chunk_tokens=chunk_tokens, roots=roots, reduce=reduce, on_progress=bar.update,
            )
            if world > 1:
                reduction = _gather_reduction(reduction, world)
            if main:
                hashes[b] = _save_batch(output_dir, b, reduction)
                _save_state(output_dir, fingerprint, num_batches, hashes)
            state.wait_for_everyone()
            # Sequences finished (and saved): the bar's postfix counts them, so a full bar reads N/N.
            sequences_done += batch.shape[0]
            bar.set_postfix_str(f"sequences {sequences_done}/{input_ids.shape[0]}")
        bar.close()
        if not main:
            return None
        batches = [BatchReduction.from_tensors(load_file(_batch_path(output_dir, b))) for b in range(num_batches)]
        meta = {
            "model": model_id,
            "data": data_id,
            "best_of_k": best_of_k,
            "seed": seed,
            "causal": causal,
            "uniform": uniform,
            "batch_size": batch_size,
            "mode": "independent" + (" + causal" if causal else ""),
            "search": dict(search or {"method": "exact"}),
            "pattern_tokens": space.size * int(input_ids.shape[0]) * int(input_ids.shape[1]),
        }
        result = OracleResult.from_batches(space, batches, input_ids, meta)
        result.save(output_dir)
        return result


def oracle_fingerprint(model, input_ids: torch.Tensor, space: RouteSpace, **settings) -> dict:
    """Every setting that changes an oracle run's results: the content hashes of the model's weights (as loaded,
    so in their dtype) and of the token blocks, the dtype, the architecture, the blocks' shape, the route space,
    and ``settings`` (best-of-K, seed, causal, batch size, uniform classes). Paths are left out: a moved model or
    data file with the same content resumes. Settings that change only speed or memory (chunk size, processes,
    device) are left out too."""
    config = {k: v for k, v in dense_config_fields(model.config).items() if k not in _NEUTRAL_CONFIG_KEYS}
    return {
        "weights_sha256": weights_sha256(model),
        "dtype": str(model.dtype).removeprefix("torch."),
        "architecture_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "input_sha256": hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest(),
        "sequences": int(input_ids.shape[0]),
        "seq_len": int(input_ids.shape[1]),
        "space": space_spec(space),
        **settings,
    }


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a model's state dict (sorted by name).

    Hashes the weights as they are in memory, so a model loaded in another dtype, or changed after loading,
    hashes differently; a model saved and loaded back in the same dtype hashes the same.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())  # bytes: numpy has no bfloat16
    return digest.hexdigest()


def _has_class(space: RouteSpace, vector) -> bool:
    return bool((space.counts == torch.tensor(vector)).all(-1).any())


def _batch_path(output_dir: Path, b: int) -> Path:
    return output_dir / BATCH_DIR / f"batch_{b:05d}.safetensors"


def _delete_run(output_dir: Path) -> None:
    """Delete an oracle run's own files in ``output_dir`` (the state first: a kill midway leaves nothing to resume);
    a link is removed, never followed."""
    for name in (ORACLE_STATE_FILE, BATCH_DIR, ORACLE_RESULTS_FILE, ORACLE_SUMMARY_FILE):
        remove_path(output_dir / name)


def _finished_batches(output_dir: Path, fingerprint: dict, num_batches: int, warn: bool) -> dict[int, str]:
    """The batches an earlier run with the same fingerprint finished, ``{batch: sha256}``, with intact files only.

    A fresh folder has none. A run with another fingerprint, or from an older version (no hashes to check), is a
    `UsageError`. A batch file that is missing or whose content does not match its recorded hash is left out,
    so it is computed again, and named in a warning (``warn``: on this process).
    """
    path = output_dir / ORACLE_STATE_FILE
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(
            f"{path} is not a readable oracle state ({err}); start over with {OVERWRITE_FLAG} or use another "
            "--output-dir."
        ) from err
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        raise UsageError(
            f"{output_dir} holds an oracle run written by an older version of duo-llm-hf ({ORACLE_STATE_FILE} without "
            f"format {STATE_FORMAT}), whose settings and batch files cannot be checked; start over with "
            f"{OVERWRITE_FLAG} or use another --output-dir."
        )
    check_state(saved, ORACLE_STATE_SCHEMA, path)
    check_fingerprint(saved["fingerprint"], fingerprint, output_dir, "oracle run")
    finished = {}
    for key, digest in saved["batch_sha256"].items():
        b, file = int(key), _batch_path(output_dir, int(key))
        if b >= num_batches:
            continue
        if file.is_file() and file_hash(file) == digest:
            finished[b] = digest
        elif warn:
            problem = "is missing" if not file.is_file() else "is damaged (its sha256 differs from the one recorded)"
            logger.warning("oracle run %s: batch file %s %s; computing batch %d again.", output_dir, file, problem, b)
    return finished


def _save_batch(output_dir: Path, b: int, reduction: BatchReduction) -> str:
    """Write batch ``b``'s reductions (atomically); return the file's sha256."""
    path = _batch_path(output_dir, b)
    atomic_save_tensors(reduction.tensors(), path)
    return file_hash(path)


def _save_state(output_dir: Path, fingerprint: dict, num_batches: int, hashes: dict[int, str]) -> None:
    state = {
        "format": STATE_FORMAT,
        "fingerprint": fingerprint,
        "num_batches": num_batches,
        "batches_done": len(hashes),
        "batch_sha256": {str(b): hashes[b] for b in sorted(hashes)},
    }
    atomic_write_json(output_dir / ORACLE_STATE_FILE, state)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the oracle study from the command line (``eval/oracle_study.py``, ``duo-llm oracle``)."""
    args = parse_arguments(OracleArguments, argv)
    args.validate()
    with run_lock(args.output_dir, "oracle run"):  # one writer per run folder, from the checks to the results
        return _main(args)


def _main(args: OracleArguments) -> int:
    from transformers import AutoTokenizer

    refuse_overwrite(args.output_dir, [ORACLE_RESULTS_FILE], args.overwrite_output_dir, "oracle run")
    state = process_state()
    route_options = [name.strip() for name in args.route_options.split(",")] if args.route_options else None
    # Everything is checked against the model's config and the data before the weights are loaded.
    config = inspect_duo_source(args.model, "--model")
    added = allow_route_options(config, route_options) if route_options else []
    positions = config.max_position_embeddings
    if args.block_size is not None and args.block_size > positions:
        raise UsageError(
            f"--block-size {args.block_size} is longer than the max_position_embeddings {positions} of model "
            f"{args.model!r}; use --block-size <= {positions}."
        )
    from .search import SearchSettings, gap_table, route_space_for, run_search

    with user_values():  # --budget, --route-options and the search against the model's layers and options
        search = SearchSettings(args.search, args.beam_width)
        space = route_space_for(config, args.budget or ["all", "classes"], route_options, search)
    is_text = Path(args.data[0]).suffix not in TENSOR_SUFFIXES
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model) if is_text else None
    blocks, data_id = load_token_blocks(args.data, tokenizer, args.block_size, args.num_blocks)
    if blocks.shape[1] > positions:
        raise UsageError(
            f"--data {args.data[0]!r} holds blocks of {blocks.shape[1]} tokens, longer than the "
            f"max_position_embeddings {positions} of model {args.model!r}; re-tokenize into shorter blocks."
        )
    check_token_ids(blocks, config.vocab_size, repr(args.data[0]))
    model = load_duo_model(args.model, dtype=getattr(torch, args.dtype), what="--model")
    if route_options:
        allow_route_options(model.config, route_options)  # SKIP needs no weights: searched on a small/big model too
    if added and state.is_main_process:
        print(f"route options: searching {added} too, which the model was not trained with (no weights needed).")
    model.to(state.device).eval()
    result = run_search(
        model, blocks, space, args.output_dir, search, args.gap_from,
        batch_size=args.batch_size, best_of_k=args.best_of_k, seed=args.seed, causal=args.causal,
        chunk_tokens=args.chunk_tokens, model_id=args.model, data_id=data_id,
        stop_after_batches=args.stop_after_batches, progress=args.progress,
        overwrite=args.overwrite_output_dir,
    )
    if result is not None:
        print(result.table())
        if "search_gap" in result.meta:
            print(f"gap of the {args.search} search to the exact run {args.gap_from}:")
            print(gap_table(result.meta["search_gap"]))
        summary = result.summary()
        print(json.dumps({k: summary[k] for k in ("tokens_evaluated", "space")}, indent=2))
        print(f"searched by {state.num_processes} process(es)")
        print(f"results: {args.output_dir}/oracle_results.safetensors, oracle_summary.json")
    elif state.is_main_process:
        print(f"stopped after {args.stop_after_batches} batches; rerun the same command to continue.")
    return 0

