"""Corpora for training and held-out evaluation: the built-in corpus, local files and Hub datasets.

Every corpus is read through `datasets` into a single ``text`` column, tokenized, and packed into
fixed-length blocks (documents joined with the tokenizer's EOS token, as in transformers' ``run_clm``).
Training blocks are visited in a seeded order that is a pure function of ``(seed, epoch)``, so a resumed run
sees the same batches.

A corpus is named by a *spec* string:

- ``builtin`` (or ``builtin:train``, ``builtin:holdout_english``, ``builtin:holdout_code``): the offline
  corpus built from the Python installation itself (see :func:`builtin_corpus`);
- a local file or folder: ``.txt``/``.text``/``.md``/``.py`` (plain text), ``.json``/``.jsonl``, ``.csv``,
  ``.parquet``;
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face Hub dataset, e.g. ``hf:allenai/c4:en@validation`` (needs a
  network; read with ``streaming=True`` for large corpora);
- ``none``: no corpus (for an evaluation set you do not want).

Run ``python -m duo_llm_hf.data.corpus`` to print the documents and sizes of the built-in corpus on this machine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Sampler

from ..utils.arguments import check_text_file
from ..utils.errors import MissingFileError, UsageError
from ..utils.hub import check_hub_name
from . import BUILTIN, HUB_PREFIX, NONE

if TYPE_CHECKING:  # imported where used: the model and benchmark code paths run where `datasets` is not installed
    import datasets

# The held-out sets every run evaluates separately, as the paper holds out C4 (English) and Python code; the
# built-in corpus has one holdout split per source, named ``holdout_<name>``.
HOLDOUTS = ("english", "code")
BUILTIN_SPLITS = ("train", *(f"holdout_{name}" for name in HOLDOUTS))
# Share of each source's characters that goes to its holdout split.
BUILTIN_HOLDOUT_FRACTION = 0.1
TEXT_COLUMN = "text"
PARQUET_MAGIC = b"PAR1"

# `datasets` builder for each file suffix of a local corpus.
_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".py": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


# ----------------------------------------------------------------------------------------------------
# The built-in corpus


@functools.lru_cache(maxsize=1)
def builtin_documents() -> tuple[dict, ...]:
    """Every document of the built-in corpus, in a fixed order: ``{"name", "source", "text"}``.

    English prose: the topics of the Python language reference that ``pydoc`` ships in ``pydoc_data.topics``.
    Python code: the top-level modules (``*.py``) of the standard library of the running interpreter.
    The list is read once per process (a few MB, well under a second) and cached.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions split pydoc_data into a separate package
        raise RuntimeError(
            "The built-in corpus needs the standard library's pydoc_data module, which this Python "
            "installation lacks (on Debian/Ubuntu: apt install libpython3-stdlib); or pass your own corpus."
        ) from err
    docs = [{"name": f"pydoc_data/{key}", "source": "english", "text": topics[key]} for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.append({"name": f"stdlib/{path.name}", "source": "code", "text": text})
    if not any(d["source"] == "code" for d in docs):
        raise RuntimeError(f"The built-in corpus found no Python modules in the stdlib folder {stdlib}.")
    return tuple(d for d in docs if d["text"].strip())


def _stable_key(doc: dict) -> str:
    # A hash of the name, not Python's hash(): the same document lands in the same split on every machine.
    return hashlib.sha256(doc["name"].encode()).hexdigest()


def builtin_split_documents(
    holdout_fraction: float = BUILTIN_HOLDOUT_FRACTION,
) -> dict[str, list[dict]]:
    """Split the built-in documents into train / holdout_english / holdout_code, deterministically.

    Documents of each source are ordered by a hash of their name; the first ones, up to ``holdout_fraction``
    of that source's characters, form its holdout (whole documents, so no document is split between train
    and holdout). Everything else is train, in hash order.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction: {holdout_fraction!r} must be between 0 and 1.")
    splits: dict[str, list[dict]] = {name: [] for name in BUILTIN_SPLITS}
    for source in HOLDOUTS:
        docs = sorted((d for d in builtin_documents() if d["source"] == source), key=_stable_key)
        budget = holdout_fraction * sum(len(d["text"]) for d in docs)
        taken = 0
        for doc in docs:
            if taken < budget:
                splits[f"holdout_{source}"].append(doc)
                taken += len(doc["text"])
            else:
                splits["train"].append(doc)
    splits["train"].sort(key=_stable_key)
    return splits


def builtin_corpus(
    split: str = "train", max_chars: int | None = None, holdout_fraction: float = BUILTIN_HOLDOUT_FRACTION
) -> datasets.Dataset:
    """One split of the built-in corpus as a `datasets.Dataset` with columns ``text``, ``name``, ``source``.

    ``max_chars`` caps the split's size (documents in split order; the last one is cut): a small, fast slice
    for tests and quick runs. The split itself does not depend on ``max_chars``.
    """
    import datasets

    if split not in BUILTIN_SPLITS:
        raise ValueError(f"builtin corpus: split {split!r} does not exist; use one of {list(BUILTIN_SPLITS)}")
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars: {max_chars!r} must be a positive number of characters, or None for all")
    docs = builtin_split_documents(holdout_fraction)[split]
    if max_chars is not None:
        cut, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            text = doc["text"][: max_chars - total]
            cut.append({**doc, "text": text})
            total += len(text)
        docs = cut
    columns = (TEXT_COLUMN, "name", "source")
    return datasets.Dataset.from_dict({key: [d[key] for d in docs] for key in columns})


def describe_builtin_corpus() -> str:
    """A Markdown table of the built-in corpus: documents and characters per split and source."""
    import platform

    rows = ["| split | documents | characters | sources |", "|---|---:|---:|---|"]
    for split, docs in builtin_split_documents().items():
        sources = sorted({d["name"].split("/")[0] for d in docs})
        chars = sum(len(d["text"]) for d in docs)
        rows.append(f"| {split} | {len(docs)} | {chars:,} | {', '.join(sources)} |")
    where = sysconfig.get_paths()["stdlib"]
    return f"Python {platform.python_version()} ({where}):\n\n" + "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# Corpus specs: builtin, local files, Hub names


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus spec (see the module docstring for the syntax)."""

    kind: str  # "builtin", "local", "hub" or "none"
    location: str = ""  # builtin split, local path or Hub name
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        if self.kind == "hub":
            return (
                HUB_PREFIX
                + self.location
                + (f":{self.config}" if self.config else "")
                + (f"@{self.split}" if self.split else "")
            )
        if self.kind == BUILTIN:
            return f"{BUILTIN}:{self.location}"
        return self.location or self.kind


def parse_corpus_spec(spec: str, default_split: str = "train", field: str = "dataset") -> CorpusSpec:
    """Parse a corpus spec; local paths must be readable corpora (checked here, before any work is done: the
    files exist, have a known type, and start as text, or as Parquet for ``.parquet``).

    ``default_split`` is the built-in split that plain ``builtin`` means, and the Hub split used when the spec
    names none.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"{field}: {spec!r} is not a corpus; use builtin, a file or folder, or hf:NAME.")
    spec = spec.strip()
    if spec.lower() == NONE:
        return CorpusSpec(NONE)
    if spec == BUILTIN or spec.startswith(BUILTIN + ":"):
        split = spec[len(BUILTIN) + 1 :] or default_split
        if split not in BUILTIN_SPLITS:
            raise UsageError(f"{field}: {spec!r} names no built-in split; use one of {list(BUILTIN_SPLITS)}.")
        return CorpusSpec(BUILTIN, split)
    if spec.startswith(HUB_PREFIX):
        rest, _, split = spec[len(HUB_PREFIX) :].partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise UsageError(f"{field}: {spec!r} has no dataset name; write hf:NAME[:CONFIG][@SPLIT].")
        hub_split = split or ("train" if default_split == "train" else "validation")
        check_hub_name(name, field, repo_type="dataset")  # an unreachable Hub: one line now, not after retries
        return CorpusSpec("hub", name, config or None, hub_split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"{field}: {spec!r} is not an existing file or folder. Give a local corpus (.txt, .jsonl, .json, "
            ".csv, .parquet or a folder of them), 'builtin', or a Hub dataset as hf:NAME[:CONFIG][@SPLIT]."
        )
    builder, files = local_data_files(path)
    for file in files:
        if builder == "parquet":
            with open(file, "rb") as handle:
                if handle.read(4) != PARQUET_MAGIC:
                    raise UsageError(f"{field}: {file!r} is not a Parquet file (it lacks the PAR1 header).")
        else:
            check_text_file(field, file)
    return CorpusSpec("local", str(path))


def local_data_files(path: str | Path) -> tuple[str, list[str]]:
    """The `datasets` builder and the files of a local corpus (a file, or a folder searched recursively)."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in _BUILDERS and not p.name.startswith(".")
        )
        if not files:
            raise MissingFileError(
                f"corpus folder {str(path)!r} holds no data files; expected {sorted(_BUILDERS)} files."
            )
    builders = {_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise UsageError(
            f"corpus file {str(files[0])!r} has an unknown type; use one of {sorted(_BUILDERS)}."
        )
    if len(builders) > 1:
        raise UsageError(f"corpus folder {str(path)!r} mixes file types {sorted(builders)}; use one type.")
    return builders.pop(), [str(p) for p in files]


def corpus_content_hash(spec: str, default_split: str = "train", field: str = "dataset") -> str:
    """What a corpus spec holds, as a string that changes when its text does (for a run's fingerprint).

    A local file or folder: the SHA-256 of its data files' names and bytes (not its path, so a moved corpus still
    matches). ``builtin``: the split and the SHA-256 of the built-in documents (they come from the interpreter's
    standard library). A Hub dataset: its spec (name, config, split), since nothing is downloaded to hash it.
    """
    from ..utils.run_files import files_hash

    parsed = parse_corpus_spec(spec, default_split, field)
    if parsed.kind == "local":
        path = Path(parsed.location)
        _, files = local_data_files(path)
        return f"sha256:{files_hash(files, root=path if path.is_dir() else None)}"
    if parsed.kind == BUILTIN:
        digest = hashlib.sha256()
        for doc in builtin_documents():
            digest.update(json.dumps([doc["name"], doc["text"]]).encode())
        return f"{parsed}:sha256:{digest.hexdigest()}"
    return str(parsed)


def load_corpus(
    spec: str | CorpusSpec,
    default_split: str = "train",
    text_column: str = TEXT_COLUMN,
    streaming: bool = False,
    sample_by: str = "document",
    builtin_max_chars: int | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset | None:
    """Load a corpus as a dataset with one ``text`` column (``None`` for the spec ``none``).

    ``sample_by`` is how plain-text files become documents (``document``: one per file, ``paragraph``,
    ``line``).
    Empty documents are dropped; a map-style corpus with no text left raises a `ValueError` naming it.
    """
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if not isinstance(spec, CorpusSpec):
        spec = parse_corpus_spec(spec, default_split)
    if spec.kind == NONE:
        return None
    if spec.kind == BUILTIN:
        dataset = builtin_corpus(spec.location, max_chars=builtin_max_chars)
        if streaming:
            dataset = dataset.to_iterable_dataset()
    elif spec.kind == "local":
        builder, files = local_data_files(spec.location)
        kwargs = {"sample_by": sample_by} if builder == "text" else {}
        try:
            dataset = datasets.load_dataset(
                builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir, **kwargs
            )
        except (DatasetGenerationError, UnicodeDecodeError) as err:
            # The user's file does not parse as its type says: name it and say what failed.
            cause = err.__cause__ or err
            raise UsageError(
                f"corpus {str(spec)!r} cannot be read as {builder} data ({type(cause).__name__}: {cause}); "
                f"check the file's format, or give it the suffix of its real type ({sorted(_BUILDERS)})."
            ) from err
    else:
        dataset = datasets.load_dataset(
            spec.location, spec.config, split=spec.split, streaming=streaming, cache_dir=cache_dir
        )
    return _text_only(dataset, text_column, str(spec))


def _text_only(dataset, text_column: str, name: str):
    import datasets

    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise UsageError(
            f"corpus {name!r} has no column {text_column!r}; its columns are {columns}. Pass --text-column."
        )
    dataset = dataset.select_columns([text_column])
    if text_column != TEXT_COLUMN:
        dataset = dataset.rename_column(text_column, TEXT_COLUMN)
    dataset = dataset.filter(_has_text, input_columns=TEXT_COLUMN)
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise UsageError(f"corpus {name!r} is empty: it has no non-empty text in column {text_column!r}.")
    return dataset


def _has_text(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def iter_texts(dataset, max_chars: int | None = None) -> Iterator[str]:
    """The texts of a corpus, stopping after ``max_chars`` characters (for tokenizer training)."""
    total = 0
    for text in (row[TEXT_COLUMN] for row in dataset):
        yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


# ----------------------------------------------------------------------------------------------------
# Packing and ordering


def pack_corpus(dataset, tokenizer, block_size: int, name: str = "corpus", max_blocks: int | None = None):
    """Tokenize a text corpus and pack it into blocks of ``block_size`` token ids (column ``input_ids``).

    Each document is followed by the tokenizer's EOS token; the token stream is cut into consecutive blocks
    and the incomplete tail of each batch of 1000 documents is dropped. A map-style corpus that gives no
    complete block raises a `ValueError`; a streamed one is checked by reading its first block.
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size: {block_size!r} must be at least 2 tokens (one input and one target).")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("The tokenizer has no EOS token, which packing puts between documents; set one.")

    def tokenize_and_pack(batch: dict) -> dict:
        stream: list[int] = []
        for ids in tokenizer(batch[TEXT_COLUMN], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
        usable = len(stream) - len(stream) % block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    kwargs = {} if isinstance(dataset, datasets.IterableDataset) else {"desc": f"Packing {name}"}
    blocks = dataset.map(
        tokenize_and_pack, batched=True, batch_size=1000, remove_columns=[TEXT_COLUMN], **kwargs
    )
    if isinstance(blocks, datasets.IterableDataset):
        if max_blocks is not None:
            blocks = blocks.take(max_blocks)
        if next(iter(blocks), None) is None:
            raise UsageError(
                f"corpus {name!r} gives no complete block of {block_size} tokens; use a smaller --block-size."
            )
        return blocks.with_format("torch")
    if len(blocks) == 0:
        raise UsageError(
            f"corpus {name!r} gives no complete block of {block_size} tokens (it has too little text); use a "
            "smaller --block-size or a larger corpus."
        )
    if max_blocks is not None:
        blocks = blocks.select(range(min(max_blocks, len(blocks))))
    return blocks.with_format("torch")


class EpochSampler(Sampler[int]):
    """A seeded shuffle of ``range(num_samples)``: epoch ``e`` visits ``randperm(seed + e)``.

    The order depends only on ``(seed, epoch)``; Accelerate's prepared data loaders pass ``set_epoch`` on.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()


def main() -> None:
    """Print the built-in corpus table (``python -m duo_llm_hf.data.corpus``)."""
    print(describe_builtin_corpus())


if __name__ == "__main__":
    main()
