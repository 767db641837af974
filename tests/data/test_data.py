"""Corpora, packing, ordering and tokenizers (duo_llm_hf.data.corpus, duo_llm_hf.data.tokenization)."""

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from duo_llm_hf.data.corpus import (
    BUILTIN_SPLITS,
    EpochSampler,
    builtin_corpus,
    builtin_split_documents,
    load_corpus,
    pack_corpus,
    parse_corpus_spec,
)
from duo_llm_hf.data.tokenization import check_tokenizer_fits, load_tokenizer, train_bpe_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n" * 3,
    "Routing sends each token to a small or a big module in every layer. " * 3,
]



@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS * 5, vocab_size=300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_builtin_split_is_deterministic_disjoint_and_by_source():
    splits = builtin_split_documents()
    again = builtin_split_documents()
    assert list(splits) == list(BUILTIN_SPLITS)
    names = {split: [d["name"] for d in docs] for split, docs in splits.items()}
    assert names == {split: [d["name"] for d in docs] for split, docs in again.items()}
    assert all(names.values())
    assert not set(names["train"]) & (set(names["holdout_english"]) | set(names["holdout_code"]))
    assert {d["source"] for d in splits["holdout_english"]} == {"english"}
    assert {d["source"] for d in splits["holdout_code"]} == {"code"}
    assert {d["source"] for d in splits["train"]} == {"english", "code"}


def test_builtin_corpus_slice_is_a_prefix_of_the_split():
    small = builtin_corpus("holdout_english", max_chars=5000)
    full = builtin_corpus("holdout_english")
    assert sum(len(t) for t in small["text"]) == 5000
    joined = "".join(full["text"])
    assert joined.startswith("".join(small["text"][:-1]))
    assert small.column_names == ["text", "name", "source"]
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        builtin_corpus("dev")


def test_parse_corpus_spec(tmp_path):
    assert parse_corpus_spec("builtin").location == "train"
    assert parse_corpus_spec("builtin", "holdout_code").location == "holdout_code"
    assert parse_corpus_spec("builtin:holdout_english").location == "holdout_english"
    hub = parse_corpus_spec("hf:allenai/c4:en@validation")
    assert (hub.kind, hub.location, hub.config, hub.split) == ("hub", "allenai/c4", "en", "validation")
    assert parse_corpus_spec("hf:wikitext", "holdout_english").split == "validation"
    assert parse_corpus_spec("none").kind == "none"
    (tmp_path / "a.txt").write_text("some text\n")
    assert parse_corpus_spec(str(tmp_path)).kind == "local"
    with pytest.raises(FileNotFoundError, match="missing.jsonl.*not an existing file"):
        parse_corpus_spec(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="names no built-in split"):
        parse_corpus_spec("builtin:nope")


def test_local_corpora(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl",
        [{"content": t, "id": i} for i, t in enumerate(TEXTS)] + [{"content": " ", "id": 9}],
    )
    data = load_corpus(str(tmp_path / "a.jsonl"), text_column="content", cache_dir=str(tmp_path / "cache"))
    assert data.column_names == ["text"] and data["text"] == TEXTS  # the blank document is dropped
    with pytest.raises(ValueError, match="no column 'text'.*content"):
        load_corpus(str(tmp_path / "a.jsonl"), cache_dir=str(tmp_path / "cache"))

    folder = tmp_path / "txt"
    folder.mkdir()
    for i, text in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(text)
    data = load_corpus(str(folder), cache_dir=str(tmp_path / "cache"))
    assert sorted(data["text"]) == sorted(TEXTS)  # one document per file

    (folder / "extra.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="mixes file types"):
        load_corpus(str(folder), cache_dir=str(tmp_path / "cache"))


def test_empty_corpus_is_an_error(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  \n"}])
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no data files"):
        load_corpus(str(tmp_path / "nothing"))


def test_pack_corpus_concatenates_documents_with_eos(tokenizer):
    data = datasets.Dataset.from_dict({"text": TEXTS})
    blocks = pack_corpus(data, tokenizer, block_size=8)
    stream = []
    for text in TEXTS:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = torch.tensor(stream[: len(stream) // 8 * 8]).view(-1, 8)
    assert torch.equal(blocks[:]["input_ids"], expected)
    assert len(pack_corpus(data, tokenizer, block_size=8, max_blocks=3)) == 3
    with pytest.raises(ValueError, match="no complete block of 100000 tokens"):
        pack_corpus(data, tokenizer, block_size=100_000)


def test_streamed_corpus_packs_like_the_map_style_one(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in TEXTS])
    cache = str(tmp_path / "cache")
    mapped = pack_corpus(load_corpus(str(path), cache_dir=cache), tokenizer, 8)
    streamed = pack_corpus(load_corpus(str(path), streaming=True, cache_dir=cache), tokenizer, 8)
    assert isinstance(streamed, datasets.IterableDataset)
    assert torch.equal(torch.stack([row["input_ids"] for row in streamed]), mapped[:]["input_ids"])


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    sampler = EpochSampler(50, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and list(EpochSampler(50, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(50))
    assert list(EpochSampler(50, seed=4)) != first


def test_tokenizer_round_trip_through_auto_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "def f(x):\n    return x  # the fox"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.eos_token == "<|endoftext|>" and len(loaded) <= 300
    assert len(load_tokenizer(tmp_path / "tok")) == len(tokenizer)


def test_tokenizer_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="too small for a byte-level BPE"):
        train_bpe_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(ValueError, match=f"{len(tokenizer)} tokens but the model has vocab_size 64"):
        check_tokenizer_fits(tokenizer, 64)
