"""Tokenizers: train a byte-level BPE with `tokenizers`, or load an existing one; check it fits a model.

A trained tokenizer is a `PreTrainedTokenizerFast` saved with ``save_pretrained``, so
``AutoTokenizer.from_pretrained(folder)`` loads it anywhere. Its one special token, ``<|endoftext|>``, is the
BOS, EOS and padding token (as in GPT-2): packing puts it between documents.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..utils.errors import MissingFileError, UsageError

END_OF_TEXT = "<|endoftext|>"
# Byte-level BPE starts from the 256 byte symbols; the special token takes one more id.
MIN_VOCAB_SIZE = 256 + 1


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` with at most ``vocab_size`` tokens.

    The result can be smaller than ``vocab_size`` when the texts allow fewer merges; use ``len(tokenizer)``.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size: {vocab_size!r} is too small for a byte-level BPE tokenizer; it needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {END_OF_TEXT})."
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (what ``AutoTokenizer.from_pretrained`` reads), with clear errors."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MissingFileError(
            f"tokenizer: {str(path)!r} is not a folder; give a folder written by tokenizer.save_pretrained, "
            "or leave --tokenizer out to train a byte-level BPE tokenizer on the training corpus."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise UsageError(f"tokenizer: {str(path)!r} holds no loadable tokenizer ({err}).") from err
    if tokenizer.eos_token_id is None:
        raise UsageError(
            f"tokenizer: {str(path)!r} has no EOS token; packing documents into blocks needs one."
        )
    return tokenizer


def has_tokenizer(path: str | Path) -> bool:
    """Whether a folder holds tokenizer files."""
    folder = Path(path)
    return any(
        (folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def check_tokenizer_fits(
    tokenizer: PreTrainedTokenizerBase, vocab_size: int, model_name: str = "the model"
) -> None:
    """Raise if the tokenizer makes ids the model's embedding lacks (``len(tokenizer) > vocab_size``)."""
    if len(tokenizer) > vocab_size:
        raise UsageError(
            f"The tokenizer has {len(tokenizer)} tokens but {model_name} has vocab_size {vocab_size}: its "
            "ids would index past the embedding. Use the tokenizer the model was trained with (or a smaller "
            "--vocab-size)."
        )
