"""The data of a training run: corpora, the tokenizer, the training batches in their seeded order, the holdout
loaders.

Stage 1 and the router training read their data the same way: `load_corpora` (the training corpus and the
holdouts), `pack_corpus` into blocks, `make_train_loader` (a seeded order per epoch), `training_batches` (epoch
after epoch, from where a resumed run left off) and `make_eval_loaders`. Stage 1 trains its tokenizer when none is
given (`prepare_tokenizer`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from ..data.corpus import HOLDOUTS, EpochSampler, iter_texts, load_corpus, pack_corpus
from ..data.tokenization import has_tokenizer, load_tokenizer, train_bpe_tokenizer
from ..utils.errors import MissingFileError, UsageError
from .arguments import TrainArguments
from .building import is_hub_id
from .checkpointing import TrainState

logger = logging.getLogger(__name__)


def load_corpora(args) -> tuple[datasets.Dataset | datasets.IterableDataset, dict]:
    """The training corpus and the holdout corpora (``{"english": ..., "code": ...}``, without ``none`` ones).

    ``args`` needs the corpus fields of `DataArguments` (``dataset``, ``holdout_english``, ``holdout_code``,
    ``text_column``, ``sample_by``, ``builtin_max_chars``, ``cache_dir``, ``streaming``); each holdout is read from
    its own column (``holdout_<name>_column``, default ``text_column``).
    """
    corpus_kwargs = {
        "sample_by": args.sample_by,
        "builtin_max_chars": args.builtin_max_chars,
        "cache_dir": args.cache_dir,
    }
    train_texts = load_corpus(
        args.dataset, "train", text_column=args.text_column, streaming=args.streaming, **corpus_kwargs
    )
    holdout_texts = {}
    for name in HOLDOUTS:
        spec = getattr(args, f"holdout_{name}")
        column = getattr(args, f"holdout_{name}_column", None) or args.text_column
        # With --streaming the holdouts stream too: only their first --eval-blocks blocks are read.
        texts = load_corpus(spec, f"holdout_{name}", text_column=column, streaming=args.streaming, **corpus_kwargs)
        if texts is not None:
            holdout_texts[name] = texts
    return train_texts, holdout_texts


def prepare_tokenizer(args: TrainArguments, accelerator: Accelerator, train_texts):
    """The tokenizer of a stage 1 run: ``--tokenizer``, the one of ``--init-from`` (frozen-big), or a byte-level BPE
    trained on the training corpus by the main process and saved in ``<output_dir>/tokenizer`` (reused on resume)."""
    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    if args.mode == "frozen-big" and is_hub_id(args.init_from):
        with accelerator.main_process_first():  # one download, then the Hub cache
            return AutoTokenizer.from_pretrained(args.init_from)
    if args.mode == "frozen-big":
        if not has_tokenizer(args.init_from):
            raise MissingFileError(
                f"init_from {args.init_from!r} holds no tokenizer; pass --tokenizer with the tokenizer that "
                "model was trained with (a new one would not match its embeddings)."
            )
        return load_tokenizer(args.init_from)
    folder = Path(args.output_dir) / "tokenizer"
    # The main process trains and saves the tokenizer first; the others (and a resumed run) load it.
    with accelerator.main_process_first():
        if has_tokenizer(folder):
            tokenizer = load_tokenizer(folder)
            if len(tokenizer) > args.vocab_size:
                raise UsageError(
                    f"{folder} holds a tokenizer of {len(tokenizer)} tokens from an earlier run, more than "
                    f"--vocab-size {args.vocab_size}; use a new --output-dir or pass --tokenizer {folder}."
                )
            logger.info("Using the tokenizer in %s", folder)
        else:
            logger.info(
                "Training a byte-level BPE tokenizer (vocab_size %d) on %s", args.vocab_size, args.dataset
            )
            tokenizer = train_bpe_tokenizer(
                iter_texts(train_texts, args.tokenizer_train_chars), args.vocab_size
            )
            if accelerator.is_main_process:
                tokenizer.save_pretrained(folder)
    return tokenizer


def make_train_loader(blocks, args) -> DataLoader:
    """The training loader: a seeded order per epoch (`EpochSampler`), or a shuffle buffer when streamed.

    ``args`` needs ``batch_size``, ``seed`` and ``shuffle_buffer``.
    """
    # Each new iterator of a DataLoader draws a seed from its generator; with the global one, a resumed run
    # would draw it after restoring the RNG state and so shift the dropout masks (OPT has dropout) that the
    # uninterrupted run saw. A generator of its own keeps resumed runs exact.
    generator = torch.Generator().manual_seed(args.seed)
    if hasattr(blocks, "__len__"):
        sampler = EpochSampler(len(blocks), seed=args.seed)
        return DataLoader(blocks, batch_size=args.batch_size, sampler=sampler, drop_last=True, generator=generator)
    shuffled = blocks.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer)
    return DataLoader(shuffled, batch_size=args.batch_size, drop_last=True, generator=generator)


def make_eval_loaders(holdout_texts: dict, tokenizer, args) -> dict[str, DataLoader]:
    """One loader per holdout corpus: its first ``args.eval_blocks`` blocks of ``args.block_size`` tokens."""
    loaders = {}
    for name, texts in holdout_texts.items():
        blocks = pack_corpus(texts, tokenizer, args.block_size, f"holdout_{name}", max_blocks=args.eval_blocks)
        if isinstance(blocks, datasets.IterableDataset):  # held in memory, the same blocks at every evaluation
            ids = [row["input_ids"].tolist() for row in blocks]
            blocks = datasets.Dataset.from_dict({"input_ids": ids}).with_format("torch")
        loaders[name] = DataLoader(blocks, batch_size=args.eval_batch_size or args.batch_size)
    return loaders


def total_training_steps(args, train_loader: DataLoader, num_processes: int = 1) -> int:
    """Optimizer steps of a run: ``args.max_steps``, else ``args.num_epochs`` epochs of the (unprepared) loader.

    Raises when a map-style corpus gives fewer batches than there are processes.
    """
    if not args.streaming and len(train_loader) < num_processes:
        raise UsageError(
            f"dataset {args.dataset!r} has {len(train_loader.dataset)} blocks, fewer than one batch of "
            f"{args.batch_size} x {num_processes} processes; lower --batch-size or add data."
        )
    if args.max_steps is not None:
        return args.max_steps
    batches = len(train_loader) // num_processes
    return args.num_epochs * math.ceil(batches / args.gradient_accumulation_steps)


def training_batches(
    train_loader, accelerator: Accelerator, state: TrainState, total_steps: int, args
) -> Iterator[dict]:
    """The micro-batches of a run, epoch after epoch, from where ``state`` says the run is.

    ``state.epoch`` and ``state.batches_in_epoch`` advance as batches are taken (a batch counts as used once
    it is yielded), so a checkpoint of ``state`` resumes with the next batch. Nothing is yielded when
    ``state.global_step`` (counted by the caller) has reached ``total_steps``; the caller stops the loop after
    its last step. An epoch that gives no batch at all raises (``args.dataset`` and ``args.batch_size`` name it).
    """
    while state.global_step < total_steps:
        train_loader.set_epoch(state.epoch)
        fresh_epoch = state.batches_in_epoch == 0
        batches = (
            accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            if state.batches_in_epoch
            else train_loader
        )
        for batch in batches:
            state.batches_in_epoch += 1
            yield batch
        if fresh_epoch and state.batches_in_epoch == 0:
            raise UsageError(f"dataset {args.dataset!r} gave no batch of {args.batch_size} blocks.")
        state.epoch += 1
        state.batches_in_epoch = 0



__all__ = [
    "load_corpora",
    "make_eval_loaders",
    "make_train_loader",
    "prepare_tokenizer",
    "total_training_steps",
    "training_batches",
]
