"""The GPU check: correctness on CUDA, training throughput and MFU at the paper's width, the oracle at paper width,
the oracle and a training step at SmolLM2-135M's depth, inference savings, and FSDP in one process; one run of at
most 270 s on one GPU (docs/gpu.md).

First, before the heavy imports, the versions it runs with are checked against the pins (`device_versions`): the
device image's transformers is older than ours, which travels as a wheel (``make device-wheels``); a miss stops the
run within seconds with one line naming the wheel. Every part writes its figures into one JSON file as soon as it
ends (``device_check.json``, with a Markdown summary ``device_check.md`` beside it), so a crash or a cut keeps the
finished parts. Each part has a time cap (``BUDGETS``, scaled so that all fit in ``--max-seconds``): a part that runs
past its cap is stopped by an alarm and recorded as cut, and the next part starts. The parts reuse the benchmarks
(``bench_train.measure``, ``bench_oracle.measure``, ``bench_inference.run``) and the library; nothing here imports
``datasets`` or ``lm_eval``, which the device image lacks. On the device machine (its own python, no venv), from the
repository root, after installing the carry (docs/gpu.md gives the whole call):

    PYTHONPATH=/tmp/site:src python3 benchmarks/device_check.py --output-dir $OUT      # what `make device-check` runs
    PYTHONPATH=src python3 benchmarks/device_check.py --dry-run --output-dir /tmp/check  # every part, tiny, on CPU

``--dry-run`` runs every part at tiny sizes on the CPU (the test suite runs it), so the script is known to work
before a device is ever lent. ``--parts`` picks parts (comma-separated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, when run as a script

import device_versions  # noqa: E402

# First, before the imports below (our models refuse an older transformers at import): the versions, and one line
# naming the missing wheel when they miss the pins.
ENVIRONMENT = device_versions.check_or_exit()

import bench_inference  # noqa: E402
import bench_oracle  # noqa: E402
import bench_train  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from duo_llm_hf import BIG, DuoLlamaConfig, DuoLlamaForCausalLM, flops_per_token  # noqa: E402
from duo_llm_hf.models.routed_ffn import set_ffn_dispatch  # noqa: E402
from duo_llm_hf.oracle.engine import default_chunk_tokens, oracle_search, pattern_losses  # noqa: E402
from duo_llm_hf.oracle.run import study_space  # noqa: E402
from duo_llm_hf.oracle.spaces import RouteSpace  # noqa: E402
from duo_llm_hf.utils.files import atomic_write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The paper's model (experiments/presets/paper.json): hidden 2560, FFNs 10240 / 640, 12 layers, 20 heads, vocab 32000.
PAPER_PRESET = REPO / "src" / "duo_llm_hf" / "experiments" / "presets" / "paper.json"
# Seconds each part may take; their sum is the default --max-seconds (each is scaled to the --max-seconds given).
# 270 s leaves one rerun in a device session's 15 minutes (docs/gpu.md: two cold starts and two calls of 320 s).
BUDGETS = {
    "environment": 5,
    "matmul": 10,
    "correctness": 25,
    "training": 65,
    "oracle": 40,
    "real_depth": 60,
    "inference": 40,
    "fsdp": 25,
}
# A dry run's default time is this many times the device's (a subprocess's imports take longer on a shared CPU).
DRY_RUN_SLACK = 3
# SmolLM2-135M's shape (Llama: 30 layers, hidden 576, FFN 1536, 9 heads / 3 KV heads, tied embeddings), with random
# weights: the real-model study's planning figures. The real weights (98 MB) do not fit a device call's 64 MiB.
SMOLLM2_135M = {
    "num_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_heads": 9,
    "num_kv_heads": 3,
    "vocab_size": 49152,
}
TINY_DEEP = {
    "num_layers": 6,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vocab_size": 256,
}
# Layers moved off BIG (to SKIP) in the real-depth oracle: budgets big=29 .. big=26 of 30 layers.
MOVED_LAYERS = (1, 2, 3, 4)
# Largest |difference| of logits allowed, relative to the largest |logit| of the reference.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


class PartTimeout(Exception):
    """A part ran past its time cap."""


def _alarm(signum, frame):
    raise PartTimeout


def paper_model() -> dict:
    return json.loads(PAPER_PRESET.read_text())["model"]


TINY_MODEL = {"num_layers": 4, "hidden_size": 64, "intermediate_size": 256, "num_heads": 4, "vocab_size": 256}


def model_flags(model: dict, layers: bool = True) -> list[str]:
    """The model-size flags that bench_oracle and bench_inference share, from a preset's ``model`` fields."""
    names = {"hidden": "hidden_size", "intermediate": "intermediate_size", "heads": "num_heads", "vocab": "vocab_size"}
    if layers:
        names = {"layers": "num_layers", **names}
    return [item for flag, key in names.items() for item in (f"--{flag}", str(model[key]))]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------- parts


def part_environment(ctx: dict) -> dict:
    """The versions the guard found (`device_versions`), the device, and the GPU's size."""
    info = {**ENVIRONMENT, "device": ctx["device"], "dry_run": ctx["dry_run"]}
    if ctx["device"].startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=props.name, multiprocessors=props.multi_processor_count, memory_total=total, memory_free=free)
    return info


def part_matmul(ctx: dict) -> dict:
    """The chip's bf16 matrix rate: square products, mean of the timed ones after warm-ups (MFU's denominator)."""
    n, repeats = (256, 3) if ctx["dry_run"] else (8192, 20)
    device = ctx["device"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    rate = 2 * n**3 / seconds
    ctx["bf16_flops_per_second"] = rate
    return {"size": n, "repeats": repeats, "seconds_per_product": seconds, "bf16_tflops": rate / 1e12}


def _tiny_config(**overrides) -> dict:
    values = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return {**values, **overrides}


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()
    return ((value - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()


def _check(name: str, error: float, dtype: str) -> dict:
    return {
        "check": name,
        "dtype": dtype,
        "relative_error": error,
        "tolerance": TOLERANCE[dtype],
        "passed": error <= TOLERANCE[dtype],
    }


def part_correctness(ctx: dict) -> dict:
    """Duo all-BIG = dense Llama; cached decoding = full forward; oracle engine = brute force; fast = reference."""
    device, checks = ctx["device"], []
    for dtype_name in ("float32", "bfloat16"):
        dtype = getattr(torch, dtype_name)
        torch.manual_seed(0)
        dense = LlamaForCausalLM(LlamaConfig(**_tiny_config())).to(device, dtype).eval()
        duo = DuoLlamaForCausalLM.from_dense(dense).to(device, dtype).eval()
        ids = torch.randint(0, 256, (2, 32), device=device)
        all_big = torch.full((2, 32, 4), BIG, device=device)
        with torch.no_grad():
            error = _relative_error(duo(ids, routes=all_big).logits, dense(ids).logits)
        checks.append(_check("all-BIG Duo = dense Llama (logits)", error, dtype_name))

        # Cached decoding under random routing = one forward over the sequence with the routes the steps took.
        model = DuoLlamaForCausalLM(DuoLlamaConfig(**_tiny_config(), routing="random")).to(device, dtype).eval()
        with torch.no_grad():
            out = model(ids[:, :8], use_cache=True)
            cache, logits, routes, tokens = out.cache, [out.logits[:, -1]], [out.routes], [ids[:, :8]]
            for _ in range(12):
                token = logits[-1].argmax(-1, keepdim=True)
                tokens.append(token)
                out = model(token, cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
                routes.append(out.routes)
            full = model(torch.cat(tokens, 1), routes=torch.cat(routes, 1)).logits[:, 7:]
        checks.append(
            _check("cached decoding = full forward (logits)", _relative_error(torch.stack(logits, 1), full), dtype_name)
        )

        # The prefix-tree engine against one forward per pattern, over the whole small/big space.
        space = study_space(model.config, ["all"])
        with torch.no_grad():
            patterns, tree = pattern_losses(model, ids, space)
            brute = torch.stack(
                [model(ids, labels=ids, routes=p.to(device).expand(*ids.shape, -1)).token_losses for p in patterns]
            )
        checks.append(_check("oracle engine = brute force (token losses)", _relative_error(tree, brute), dtype_name))

        # Fast dispatch against the reference dispatch: logits and gradients under random routes.
        model.train()
        routes = torch.randint(0, 2, (2, 32, 4), device=device)
        results = {}
        for mode in ("fast", "reference"):
            set_ffn_dispatch(model, mode)
            model.zero_grad()
            out = model(ids, labels=ids, routes=routes)
            out.loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[mode] = (out.logits.detach(), grads)
        checks.append(
            _check("fast dispatch = reference (logits)", _relative_error(*[results[m][0] for m in results]), dtype_name)
        )
        checks.append(
            _check(
                "fast dispatch = reference (gradients)", _relative_error(*[results[m][1] for m in results]), dtype_name
            )
        )
    return {"checks": checks, "all_passed": all(c["passed"] for c in checks)}


def _train_args(ctx: dict, layers: int, compile_ffns: bool) -> argparse.Namespace:
    if ctx["dry_run"]:
        sizes = [
            "--hidden-size",
            "64",
            "--num-heads",
            "4",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--vocab-size",
            "256",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--warmup",
            "1",
        ]
    else:
        paper = paper_model()
        sizes = [
            "--hidden-size",
            str(paper["hidden_size"]),
            "--num-heads",
            str(paper["num_heads"]),
            "--seq-len",
            "1024",
            "--batch-size",
            "8",
            "--vocab-size",
            str(paper["vocab_size"]),
            "--steps",
            "3",
            "--rounds",
            "6",
            "--warmup",
            "3",
        ]
    argv = [*sizes, "--num-layers", str(layers), "--p-big", "0.5", "--mixed-precision", "bf16"]
    if compile_ffns:  # a dry run traces the compiled path without generating code (inductor takes minutes on CPU)
        argv += ["--compile", "--compile-backend", "eager" if ctx["dry_run"] else "inductor"]
    return bench_train.parse_args(argv)


def training_layers(ctx: dict, seconds: float) -> int:
    """As many of the 12 layers as fit ``seconds`` for eager dense + Duo (warm-up and rounds), by the FLOP model at
    half the measured matmul rate, and fit a third of the free memory (16 bytes a parameter, both models)."""
    if ctx["dry_run"]:
        return 2
    paper = paper_model()
    rate = 0.5 * ctx.get("bf16_flops_per_second", 4e14)
    tokens = 8 * 1024
    for layers in range(12, 0, -1):
        config = DuoLlamaConfig(
            vocab_size=paper["vocab_size"],
            hidden_size=paper["hidden_size"],
            num_hidden_layers=layers,
            intermediate_size=paper["intermediate_size"],
            num_attention_heads=paper["num_heads"],
        )
        dense = flops_per_token(config, {BIG: 1.0}, seq_len=1024).total
        steps = 2 * (3 + 3 * 6)  # both models: warm-up + rounds x steps
        seconds_needed = steps * 3 * dense * tokens / rate
        params = layers * (4 * config.hidden_size**2 + 3 * config.hidden_size * config.intermediate_size * 17 / 16)
        memory = 2 * 16 * (params + 2 * config.vocab_size * config.hidden_size)
        free = torch.cuda.mem_get_info()[0] if ctx["device"].startswith("cuda") else float("inf")
        if seconds_needed < 0.6 * seconds and memory < free / 3:
            return layers
    return 1


def part_training(ctx: dict) -> dict:
    """Dense vs Duo (p_big 0.5) training steps in bf16 at the paper's width; MFU; then with compiled FFNs."""
    start = time.perf_counter()
    layers = training_layers(ctx, ctx["budget"])
    out = {"layers": layers}
    for name, compiled in (("eager", False), ("compiled", True)):
        left = ctx["budget"] - (time.perf_counter() - start)
        if compiled and left < 0.4 * ctx["budget"]:
            out["compiled"] = {"skipped": f"{left:.0f} s left of the part's {ctx['budget']:.0f} s"}
            continue
        args = _train_args(ctx, layers, compiled)
        args.max_seconds = 0.3 * left
        result = bench_train.measure(args)
        clock = "cpu" if "cpu" in result else "wall"
        figures = result[clock]
        rate = ctx.get("bf16_flops_per_second")
        mfu = {}
        for model in ("dense", "duo"):
            # Training is about 3x the forward FLOPs (forward + backward), for both models.
            achieved = 3 * result["forward_flops_per_token"][model] * figures["tokens_per_second"][model]
            mfu[model] = achieved / rate if rate else None
        out[name] = {
            "clock": clock,
            "tokens_per_second": figures["tokens_per_second"],
            "median_seconds_per_step": figures["median_seconds_per_step"],
            "flop_ratio": result["flop_ratio"],
            "flop_efficiency": figures["flop_efficiency"],
            "mfu": mfu,
            "rounds": result["rounds"],
            "warmup_seconds": result["warmup_seconds"],
            "peak_memory_bytes": result["peak_memory_bytes"],
            "config": result["config"],
        }
        if ctx["device"].startswith("cuda"):
            torch.cuda.empty_cache()
    if "tokens_per_second" in out.get("compiled", {}):
        eager, compiled = out["eager"]["tokens_per_second"]["duo"], out["compiled"]["tokens_per_second"]["duo"]
        out["compile_speedup_duo"] = compiled / eager
        out["compile_pays"] = compiled > eager
    return out


def part_oracle(ctx: dict) -> dict:
    """The engine over all 4,096 small/big patterns against the naive loop at the paper's width (bf16), and the
    projected time of the paper's oracle study on one GPU."""
    preset = json.loads(PAPER_PRESET.read_text())
    if ctx["dry_run"]:
        argv = [*model_flags(TINY_MODEL), "--sequences", "2", "--seq-len", "16", "--naive-sample", "4"]
    else:
        argv = [*model_flags(preset["model"]), "--sequences", "1", "--seq-len", "1024", "--naive-sample", "8"]
    args = bench_oracle.parse_args([*argv, "--device", ctx["device"], "--dtype", "bfloat16"])
    figures = bench_oracle.measure(args)
    # The study's held-out tokens: oracle_blocks blocks of block_size tokens from each of the two holdouts.
    held_out = 2 * preset["study"]["oracle_blocks"] * preset["training"]["block_size"]
    tokens_per_second = figures["tree_pattern_tokens_per_second"] / figures["patterns"]
    return {
        "pattern_tokens_per_second": {
            "tree": figures["tree_pattern_tokens_per_second"],
            "naive": figures["naive_pattern_tokens_per_second"],
        },
        "measured_speedup": figures["measured_speedup"],
        "flop_predicted_speedup": figures["flop_predicted_speedup"],
        "chunk_tokens": figures["chunk_tokens"],
        "peak_memory_bytes": figures["peak_memory_bytes"],
        "paper_held_out_tokens": held_out,
        "projected_paper_oracle_hours_one_gpu": held_out / tokens_per_second / 3600,
        "projection_note": "tokens of the measured sequence length; the paper's blocks are 2048 tokens (attention "
        "grows with length, so this is a lower bound)",
        "setting": {k: v for k, v in figures["setting"].items() if k != "json"},
    }


def real_depth_config(shape: dict, seq_len: int) -> DuoLlamaConfig:
    """A Duo model of ``shape`` (`SMOLLM2_135M`'s keys) that may route small, big and skip, embeddings tied."""
    return DuoLlamaConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"],
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        route_options=["small", "big", "skip"],
    )


def real_depth_oracle(ctx: dict, shape: dict, seq_len: int, seconds: float) -> dict:
    """The exact oracle (`oracle_search`) over BIG/SKIP at 1..4 moved layers, bf16: pattern-tokens per second. A
    budget whose run the last rate projects past the time left is skipped, and says so."""
    start, device = time.perf_counter(), ctx["device"]
    config = real_depth_config(shape, seq_len)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 135M parameters initialise slowly on a CPU
        model = DuoLlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)
    layers = config.num_hidden_layers
    chunk_tokens = default_chunk_tokens(device, config)
    spaces = {m: RouteSpace(layers, ["big", "skip"], [f"big={layers - m}"]) for m in MOVED_LAYERS}
    oracle_search(model, ids, spaces[MOVED_LAYERS[0]], chunk_tokens=chunk_tokens)  # warm-up (kernels, allocator)
    out, rate = {"chunk_tokens": chunk_tokens, "tokens": seq_len}, None
    for moved, space in spaces.items():
        pattern_tokens = space.size * seq_len
        left = seconds - (time.perf_counter() - start)
        projected = 1.5 * pattern_tokens / rate if rate else 0.0
        if left <= 0 or projected > left:
            skipped = f"{left:.0f} s left" + (f", projected {projected:.0f} s at the last rate" if rate else "")
            out[space.labels[0]] = {"moved_layers": moved, "patterns": space.size, "skipped": skipped}
            continue
        synchronize(device)
        began = time.perf_counter()
        oracle_search(model, ids, space, chunk_tokens=chunk_tokens)
        synchronize(device)
        took = time.perf_counter() - began
        rate = pattern_tokens / took
        out[space.labels[0]] = {
            "moved_layers": moved,
            "patterns": space.size,
            "seconds": took,
            "pattern_tokens_per_second": rate,
        }
    if device.startswith("cuda"):
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    del model
    return out


def real_depth_training(ctx: dict, shape: dict, seconds: float) -> dict:
    """bf16 training steps at ``shape`` (bench_train: Duo at p_big 0.5 against dense, ABBA rounds): tokens/s."""
    if ctx["dry_run"]:
        sizes = ["--seq-len", "32", "--batch-size", "2", "--steps", "1", "--rounds", "2", "--warmup", "1"]
    else:
        sizes = ["--seq-len", "2048", "--batch-size", "8", "--steps", "2", "--rounds", "4", "--warmup", "2"]
    # bench_train's flags are the shape's keys with dashes: --num-layers, --hidden-size, --num-kv-heads ...
    shape_flags = [item for key, value in shape.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    args = bench_train.parse_args(
        [*sizes, *shape_flags, "--tie-embeddings", "--p-big", "0.5", "--mixed-precision", "bf16"]
    )
    args.max_seconds = 0.5 * seconds
    result = bench_train.measure(args)
    figures = result["cpu" if "cpu" in result else "wall"]
    return {
        "tokens_per_second": figures["tokens_per_second"],
        "median_seconds_per_step": figures["median_seconds_per_step"],
        "flop_efficiency": figures["flop_efficiency"],
        "rounds": result["rounds"],
        "peak_memory_bytes": result["peak_memory_bytes"],
        "config": result["config"],
    }


def part_real_depth(ctx: dict) -> dict:
    """SmolLM2-135M's shape with random weights: the oracle's pattern-tokens per second at 1, 2, 3 and 4 moved
    layers (BIG/SKIP budgets big=29..26) and a bf16 training step's tokens per second. A dry run: `TINY_DEEP`."""
    start = time.perf_counter()
    shape, seq_len = (TINY_DEEP, 16) if ctx["dry_run"] else (SMOLLM2_135M, 1024)
    out = {"shape": shape, "oracle": real_depth_oracle(ctx, shape, seq_len, 0.5 * ctx["budget"])}
    if ctx["device"].startswith("cuda"):
        torch.cuda.empty_cache()
    left = ctx["budget"] - (time.perf_counter() - start)
    out["training"] = real_depth_training(ctx, shape, left)
    return out


def part_inference(ctx: dict) -> dict:
    """Prefill and decode time against all-BIG at batch 1 and 32 in bf16 (bench_inference, the paper's width)."""
    start, out = time.perf_counter(), {}
    for batch in (1, 32):
        if ctx["dry_run"]:
            argv = ["--quick"]
        else:
            argv = [
                *model_flags(paper_model(), layers=False),
                "--prompt-len",
                "256",
                "--new-tokens",
                "64",
                "--repeats",
                "3",
                "--decode-repeats",
                "2",
            ]
        args = bench_inference.parse_args([*argv, "--dtype", "bf16", "--device", ctx["device"]])
        args.batch = batch if not ctx["dry_run"] else min(batch, 2)
        if time.perf_counter() - start > 0.6 * ctx["budget"]:
            out[f"batch_{batch}"] = {"skipped": "the part's time went to the smaller batch"}
            continue
        result = bench_inference.run(args)
        clock = "cpu" if ctx["device"] == "cpu" else "wall"
        out[f"batch_{batch}"] = {
            row["case"]: {
                phase: {
                    "predicted_saving": row[phase]["predicted_saving"],
                    "measured_saving": row[phase][f"{clock}_saving"],
                    "median_seconds": row[phase][f"median_{clock}_s"],
                }
                for phase in bench_inference.PHASES
                if phase in row
            }
            for row in result["rows"]
        }
    return out


def part_fsdp(ctx: dict) -> dict:
    """FSDP (training/configs/fsdp.yaml) in one process through `accelerate launch`: train, checkpoint, resume,
    gather (benchmarks/fsdp_check.py). Accelerate runs FSDP only on accelerators, so a dry run on CPU runs the same
    script under training/configs/cpu.yaml (no sharding) and says so."""
    config = "cpu.yaml" if ctx["device"] == "cpu" else "fsdp.yaml"
    out_dir = Path(ctx["work_dir"]) / "fsdp"
    result_file = out_dir / "fsdp_check.json"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "training/configs" / config),
        "--num_processes",
        "1",
        str(REPO / "benchmarks" / "fsdp_check.py"),
        "--output-dir",
        str(out_dir),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    if ctx["device"] == "cpu":
        env["ACCELERATE_MIXED_PRECISION"] = "no"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(ctx["budget"] - 2, 5))
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    return {
        "config": config,
        "returncode": done.returncode,
        **result,
        **({"stderr_tail": done.stderr[-3000:]} if done.returncode else {}),
    }


PARTS = {
    "environment": part_environment,
    "matmul": part_matmul,
    "correctness": part_correctness,
    "training": part_training,
    "oracle": part_oracle,
    "real_depth": part_real_depth,
    "inference": part_inference,
    "fsdp": part_fsdp,
}


# ---------------------------------------------------------------- the run


def markdown(report: dict) -> str:
    """The headline figures as Markdown (what BENCHMARKS.md quotes)."""
    lines = [f"# Device check ({'dry run, CPU' if report['dry_run'] else report['device']})", ""]
    lines += ["| part | status | seconds |", "|---|---|---:|"]
    for name, part in report["parts"].items():
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.1f} |")
    parts = report["parts"]
    correctness = parts.get("correctness", {}).get("result")
    if correctness:
        lines += ["", "| check | dtype | relative error | tolerance | passed |", "|---|---|---:|---:|---|"]
        for c in correctness["checks"]:
            lines.append(
                f"| {c['check']} | {c['dtype']} | {c['relative_error']:.2e} | {c['tolerance']:.0e} | {c['passed']} |"
            )
    training = parts.get("training", {}).get("result")
    if training:
        lines += [
            "",
            f"Training, {training['layers']} layers, bf16:",
            "",
            "| run | model | tokens/s | MFU | FLOP efficiency |",
            "|---|---|---:|---:|---:|",
        ]
        for run in ("eager", "compiled"):
            figures = training.get(run, {})
            if "tokens_per_second" not in figures:
                continue
            for model in ("dense", "duo"):
                mfu = figures["mfu"][model]
                efficiency = f"{figures['flop_efficiency']:.3f}" if model == "duo" else "1"
                lines.append(
                    f"| {run} | {model} | {figures['tokens_per_second'][model]:,.0f} "
                    f"| {'—' if mfu is None else f'{mfu:.1%}'} | {efficiency} |"
                )
    oracle = parts.get("oracle", {}).get("result")
    if oracle:
        lines += [
            "",
            f"Oracle: {oracle['pattern_tokens_per_second']['tree']:,.0f} pattern-tokens/s (tree) vs "
            f"{oracle['pattern_tokens_per_second']['naive']:,.0f} (naive), speed-up "
            f"{oracle['measured_speedup']:.2f}x (FLOP-predicted {oracle['flop_predicted_speedup']:.2f}x); "
            f"chunk {oracle['chunk_tokens']} tokens; paper's oracle study projected at "
            f"{oracle['projected_paper_oracle_hours_one_gpu']:.1f} h on one GPU.",
        ]
    real = parts.get("real_depth", {}).get("result")
    if real:
        shape = real["shape"]
        lines += [
            "",
            f"Real depth ({shape['num_layers']} layers, hidden {shape['hidden_size']}, "
            f"FFN {shape['intermediate_size']}, {shape['num_heads']} / {shape['num_kv_heads']} heads, "
            f"vocab {shape['vocab_size']}; random weights, bf16): exact oracle over BIG/SKIP on "
            f"{real['oracle']['tokens']} tokens",
            "",
            "| budget | moved layers | patterns | seconds | pattern-tokens/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, row in real["oracle"].items():
            if isinstance(row, dict):
                figures = (
                    f"{row['seconds']:.2f} | {row['pattern_tokens_per_second']:,.0f}"
                    if "seconds" in row
                    else f"— | {row['skipped']}"
                )
                lines.append(f"| {label} | {row['moved_layers']} | {row['patterns']:,} | {figures} |")
        training = real["training"]
        lines += [
            "",
            f"Training step (bf16, batch {training['config']['batch_size']} x {training['config']['seq_len']}): "
            f"{training['tokens_per_second']['duo']:,.0f} tokens/s Duo at p_big 0.5, "
            f"{training['tokens_per_second']['dense']:,.0f} dense.",
        ]
    inference = parts.get("inference", {}).get("result")
    if inference:
        lines += ["", "| batch | case | phase | predicted saving | measured saving |", "|---|---|---|---:|---:|"]
        for batch, cases in inference.items():
            for case, phases in cases.items():
                if case == "skipped":
                    continue
                for phase, figures in phases.items():
                    lines.append(
                        f"| {batch.removeprefix('batch_')} | {case} | {phase} "
                        f"| {figures['predicted_saving']:.3f} | {figures['measured_saving']:.3f} |"
                    )
    fsdp = parts.get("fsdp", {}).get("result")
    if fsdp:
        lines += [
            "",
            f"FSDP ({fsdp['config']}): "
            + json.dumps({k: v for k, v in fsdp.items() if k not in ("stderr_tail", "config")}),
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-dir", "--out", dest="out", required=True, help="folder for device_check.json and device_check.md"
    )
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny sizes on the CPU")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help=f"the whole run's time, parts scaled to it (default {sum(BUDGETS.values())}; a dry run "
        f"{DRY_RUN_SLACK}x that: a shared CPU runs the tiny parts slower than the GPU the caps are sized for)",
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run, in order")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts.split(",") if p not in PARTS]
    if unknown:
        parser.error(f"--parts: {unknown} are not parts; use some of {','.join(PARTS)}.")
    if args.max_seconds is None:
        args.max_seconds = sum(BUDGETS.values()) * (DRY_RUN_SLACK if args.dry_run else 1)
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds: {args.max_seconds} must be positive.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        print("device_check: no CUDA device; running the dry run's sizes on the CPU instead.", file=sys.stderr)
    parts = args.parts.split(",")
    scale = args.max_seconds / sum(BUDGETS.values())
    # Scratch files (the FSDP part's checkpoints and models) stay out of the output folder: the device tool brings
    # back at most 8 files from $OUT, and device_check.json and device_check.md must be among them.
    work_dir = tempfile.mkdtemp(prefix="device-check-")
    ctx = {"device": device, "dry_run": device == "cpu", "work_dir": work_dir}
    report = {"device": device, "dry_run": ctx["dry_run"], "max_seconds": args.max_seconds, "parts": {}}
    try:
        run_parts(parts, ctx, report, out, args.max_seconds, scale)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(markdown(report))
    return report


def run_parts(parts: list[str], ctx: dict, report: dict, out: Path, max_seconds: float, scale: float) -> None:
    """Run each part under its time cap, writing the report after each one."""
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    for name in parts:
        left = max_seconds - (time.perf_counter() - start)
        ctx["budget"] = min(BUDGETS[name] * scale, left)
        if ctx["budget"] < 1:
            report["parts"][name] = {"status": "skipped: no time left", "seconds": 0.0}
            continue
        part_start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, ctx["budget"])
        try:
            result = PARTS[name](ctx)
            entry = {"status": "done", "result": result}
        except PartTimeout:
            entry = {"status": f"cut after its {ctx['budget']:.0f} s"}
        except Exception as err:  # a failed part is recorded; the next part still runs
            entry = {"status": f"failed: {type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        entry["seconds"] = time.perf_counter() - part_start
        report["parts"][name] = entry
        report["seconds"] = time.perf_counter() - start
        atomic_write_json(out / "device_check.json", report, newline=False)
        (out / "device_check.md").write_text(markdown(report))
        print(f"device_check: {name}: {entry['status']} ({entry['seconds']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
