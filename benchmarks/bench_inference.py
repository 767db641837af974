"""Inference benchmark: does routing save wall-clock time in proportion to the FLOPs it saves?

Times prefill (one forward over ``batch x prompt_len`` tokens filling the KV cache, logits of the last
position only, as `generate` does) and greedy decoding (``new_tokens`` steps with the KV cache, batch of
``batch``) of a randomly initialised mid-size DuoLlama under several routes, all in one run: all-big (the
baseline), all-small, random routing (per token and layer) at 50% and 25% BIG, fixed patterns at 50% and 25%
BIG, and a learned router at 50% and 25% BIG where the package has learned routing (its untrained routers are
calibrated on the prompt so that the budget's fraction of tokens takes BIG in every layer: the routing cost
and the token mix of a trained router, without training one here).

Cases are timed side by side: every repeat runs each case once, in turn, and a case's time fraction is the
median over repeats of its time divided by all-big's time in the same repeat, so that load from other
processes on a shared machine hits numerator and denominator alike. The predicted fraction is the FLOP
model's (`flops.py`) for the routes actually taken: on the whole forward (attention + FFN + LM head) and for
the FFN alone.

    PYTHONPATH=src python benchmarks/bench_inference.py                 # the figures in BENCHMARKS.md
    PYTHONPATH=src python benchmarks/bench_inference.py --quick         # a small smoke run (seconds)
    PYTHONPATH=src python benchmarks/bench_inference.py --dispatch fast,reference --skip-decode
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from duo_llm_hf import BIG, DuoLlamaConfig, DuoLlamaForCausalLM, flops_per_token, route_fractions
from duo_llm_hf.models.routed_ffn import compile_ffns, set_ffn_dispatch
from duo_llm_hf.models.routes import CHOICE_NAMES
from duo_llm_hf.utils.files import atomic_write_json

PHASES = ("prefill", "decode")


@dataclass
class Case:
    """One routing setting to time: how to set the model up for it, its timings and the routes it took."""

    name: str
    dispatch: str
    setup: Callable[[DuoLlamaForCausalLM], None]
    wall_s: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    cpu_s: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    routes: dict[str, torch.Tensor] = field(default_factory=dict)


class Timer:
    """Wall-clock and process CPU time of a block (CPU time is far less sensitive to other processes)."""

    def __enter__(self):
        _synchronize()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _synchronize()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> str:
    """CPU model, cores, threads and versions, for the benchmark's header."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}{gpu}"
    )


def evenly_spaced_pattern(n_layers: int, n_big: int) -> str:
    """A fixed pattern with ``n_big`` BIG layers spread over the depth, e.g. 3 of 12 -> ``BsssBsssBsss``."""
    big_layers = {round(i * n_layers / n_big) for i in range(n_big)} if n_big else set()
    return "".join("B" if layer in big_layers else "s" for layer in range(n_layers))


def learned_routing_available(model: DuoLlamaForCausalLM) -> str | None:
    """None when the package's model supports learned routing with routers; otherwise why not."""
    try:
        model.set_routing("learned")
    except ValueError as err:
        return f"set_routing('learned') fails: {err}"
    finally:
        model.set_routing("random", route_probs={"small": 0.5, "big": 0.5})
    if getattr(model.model.layers[0].mlp, "router", None) is None:
        return "the DuoFFN modules have no `router` after set_routing('learned')"
    return None


def calibrate_big_fraction(model: DuoLlamaForCausalLM, input_ids: torch.Tensor, budget: float) -> None:
    """Shift each layer's BIG router bias so that a ``budget`` fraction of the prompt's tokens takes BIG.

    Layers are calibrated in order during one forward (a pre-hook on each router), so each sees the input
    that the calibrated layers below it produce.
    """

    def hook(router, args):
        (hidden,) = args
        with torch.no_grad():
            logits = torch.nn.functional.linear(hidden, router.weight, router.bias).float()
            logits = logits.reshape(-1, len(router.choices))
            big = router.choices.index(BIG)
            others = [i for i, code in enumerate(router.choices) if code != BIG]
            margin = logits[:, big] - logits[:, others].amax(dim=1)
            router.bias[big] -= torch.quantile(margin, 1.0 - budget).to(router.bias.dtype)

    handles = [layer.mlp.router.register_forward_pre_hook(hook) for layer in model.model.layers]
    try:
        with torch.inference_mode(False), torch.no_grad():
            model(input_ids, routing="learned", use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()


def build_cases(
    model: DuoLlamaForCausalLM, dispatch_modes: list[str], prompt: torch.Tensor
) -> tuple[list[Case], str]:
    """The cases to time, for each dispatch mode; and a note on the learned-router rows."""
    n_layers = model.config.num_hidden_layers

    def fixed(n_big: int):
        return lambda m: m.set_routing("fixed", pattern=evenly_spaced_pattern(n_layers, n_big))

    def random(p_big: float):
        return lambda m: m.set_routing("random", route_probs={"small": 1 - p_big, "big": p_big}, route_seed=0)

    settings = [
        ("all-big", fixed(n_layers)),
        ("all-small", fixed(0)),
        ("random 50% BIG", random(0.5)),
        ("random 25% BIG", random(0.25)),
        (f"fixed {evenly_spaced_pattern(n_layers, n_layers // 2)}", fixed(n_layers // 2)),
        (f"fixed {evenly_spaced_pattern(n_layers, n_layers // 4)}", fixed(n_layers // 4)),
    ]
    why_not = learned_routing_available(model)
    if why_not is None:
        for budget in (0.5, 0.25):
            settings.append((f"learned {budget:.0%} BIG", _learned(budget, prompt)))
        note = "learned rows: untrained routers calibrated on the prompt to the budget (calibrate_big_fraction)"
    else:
        note = f"learned-router rows left out: {why_not}"
    cases = [Case(name, dispatch, setup) for dispatch in dispatch_modes for name, setup in settings]
    return cases, note


def _learned(budget: float, prompt: torch.Tensor):
    calibrated: list[torch.Tensor] = []

    def setup(model):
        model.set_routing("learned")
        biases = [layer.mlp.router.bias for layer in model.model.layers]
        with torch.no_grad():
            if calibrated:  # the biases found the first time, restored: no calibration forward per repeat
                for bias, value in zip(biases, calibrated):
                    bias.copy_(value)
                return
            for bias in biases:
                bias.zero_()
        calibrate_big_fraction(model, prompt, budget)
        calibrated.extend(bias.detach().clone() for bias in biases)

    return setup


@torch.inference_mode()
def timed_prefill(model, prompt) -> tuple[Timer, torch.Tensor]:
    """One prefill as `generate` runs it: the KV cache filled, logits of the last position only."""
    with Timer() as timer:
        out = model(prompt, use_cache=True, logits_to_keep=1)
    return timer, out.routes


@torch.inference_mode()
def timed_decode(model, prompt, new_tokens: int) -> tuple[Timer, torch.Tensor]:
    """Prefill (not timed), then ``new_tokens`` greedy steps with the KV cache (timed); return the routes."""
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
    routes = []
    with Timer() as timer:
        for _ in range(new_tokens):
            out = model(token, cache=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            routes.append(out.routes)
    return timer, torch.cat(routes, dim=1)


def progress(label: str, cases: list[Case], phase: str) -> None:
    times = ", ".join(f"{c.name} [{c.dispatch}] {c.wall_s[phase][-1]:.2f}s" for c in cases)
    print(f"{label}: {times}", file=sys.stderr, flush=True)


def predicted_flops(
    config, routes: torch.Tensor, prompt_len: int, new_tokens: int, phase: str
) -> tuple[float, float]:
    """(whole-forward FLOPs, FFN FLOPs) per run for the routes taken, from the FLOP model."""
    fractions = {k: v for k, v in route_fractions(routes.cpu()).items() if k in CHOICE_NAMES}
    batch = routes.shape[0]
    if phase == "prefill":
        # Every prompt token runs attention (causal over the prompt) and its FFN; the LM head only the last.
        per_token = flops_per_token(config, fractions, seq_len=prompt_len)
        tokens = batch * prompt_len
        total = tokens * (per_token.attention + per_token.ffn) + batch * per_token.lm_head
        return total, tokens * per_token.ffn
    # A decoding token at position p attends to p + 1 keys; over the run that averages
    # prompt_len + (new_tokens + 1) / 2, which the model's causal average (seq_len + 1) / 2 gives for:
    per_token = flops_per_token(config, fractions, seq_len=2 * prompt_len + new_tokens)
    tokens = batch * new_tokens
    return tokens * per_token.total, tokens * per_token.ffn


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = DuoLlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.prompt_len + args.new_tokens,
        route_options=["small", "big"],
    )
    model = DuoLlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    if args.compile:
        compile_ffns(model)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt_len), device=device)
    cases, learned_note = build_cases(model, args.dispatch, prompt)

    def prepare(case):
        set_ffn_dispatch(model, case.dispatch)
        case.setup(model)

    # Warm-up: first calls allocate memory and pick kernels (and compile, with --compile).
    for case in cases:
        prepare(case)
        for _ in range(args.warmup):
            timed_prefill(model, prompt)
            if not args.skip_decode:
                timed_decode(model, prompt, min(8, args.new_tokens))

    phases = [("prefill", args.repeats, lambda: timed_prefill(model, prompt))]
    if not args.skip_decode:
        phases.append(("decode", args.decode_repeats, lambda: timed_decode(model, prompt, args.new_tokens)))
    for phase, repeats, timed in phases:
        for repeat in range(repeats):
            for case in cases:  # side by side: each repeat runs every case once
                prepare(case)
                timer, case.routes[phase] = timed()
                case.wall_s[phase].append(timer.wall)
                case.cpu_s[phase].append(timer.cpu)
            progress(f"{phase} repeat {repeat + 1}/{repeats}", cases, phase)

    rows = []
    for case in cases:
        base = next(c for c in cases if c.name == "all-big" and c.dispatch == case.dispatch)
        row = {"case": case.name, "dispatch": case.dispatch}
        for phase in case.routes:
            lengths = (args.prompt_len, args.new_tokens, phase)
            flops, ffn = predicted_flops(config, case.routes[phase], *lengths)
            base_flops, base_ffn = predicted_flops(config, base.routes[phase], *lengths)
            predicted_saving = 1 - flops / base_flops
            row[phase] = {
                "big_fraction": route_fractions(case.routes[phase].cpu())["big"],
                "wall_s": case.wall_s[phase],
                "cpu_s": case.cpu_s[phase],
                "median_wall_s": statistics.median(case.wall_s[phase]),
                "median_cpu_s": statistics.median(case.cpu_s[phase]),
                "ffn_flop_fraction": ffn / base_ffn,
                "flop_fraction": flops / base_flops,
                "predicted_saving": predicted_saving,
            }
            for clock in ("wall", "cpu"):
                # Each repeat's ratio to all-big in the same repeat, then the median over repeats.
                pairs = zip(getattr(case, f"{clock}_s")[phase], getattr(base, f"{clock}_s")[phase])
                fraction = statistics.median(t / b for t, b in pairs)
                row[phase][f"{clock}_fraction"] = fraction
                row[phase][f"{clock}_saving"] = 1 - fraction
                row[phase][f"{clock}_saving_ratio"] = (
                    (1 - fraction) / predicted_saving if predicted_saving > 1e-9 else None
                )
        rows.append(row)
    return {
        "fast_vs_reference": fast_vs_reference(cases),
        "machine": machine(),
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "config": {k: getattr(args, k) for k in vars(args) if k != "json"},
        "learned_note": learned_note,
        "rows": rows,
    }


def fast_vs_reference(cases: list[Case]) -> list[dict]:
    """Time of the fast dispatch over the reference one, per case and phase (median of per-repeat ratios)."""
    out = []
    for fast in (c for c in cases if c.dispatch == "fast"):
        reference = next((c for c in cases if c.dispatch == "reference" and c.name == fast.name), None)
        if reference is None:
            continue
        row = {"case": fast.name}
        for phase in fast.routes:
            for clock in ("wall", "cpu"):
                pairs = zip(getattr(fast, f"{clock}_s")[phase], getattr(reference, f"{clock}_s")[phase])
                row[f"{phase}_{clock}"] = statistics.median(f / r for f, r in pairs)
        out.append(row)
    return out


def markdown(result: dict) -> str:
    """The results as Markdown tables (one per phase), the form BENCHMARKS.md keeps."""
    lines = [f"Machine: {result['machine']}", f"Command: `{result['command']}`"]
    lines += [f"Note: {result['learned_note']}", ""]
    for phase in PHASES:
        rows = [r for r in result["rows"] if phase in r]
        if not rows:
            continue
        lines += [
            f"**{phase}** (fractions and savings against all-big; saving = 1 - fraction)",
            "",
            "| case | dispatch | BIG share | median wall s | median CPU s | FFN FLOP fraction | FLOP fraction "
            "| wall fraction | CPU fraction | predicted saving | measured saving (wall) "
            "| measured / predicted (wall) | measured / predicted (CPU) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            p = r[phase]
            ratios = [_ratio(p["wall_saving_ratio"]), _ratio(p["cpu_saving_ratio"])]
            lines.append(
                f"| {r['case']} | {r['dispatch']} | {p['big_fraction']:.2f} | {p['median_wall_s']:.3f} "
                f"| {p['median_cpu_s']:.3f} "
                f"| {p['ffn_flop_fraction']:.3f} | {p['flop_fraction']:.3f} | {p['wall_fraction']:.3f} "
                f"| {p['cpu_fraction']:.3f} | {p['predicted_saving']:.3f} | {p['wall_saving']:.3f} "
                f"| {ratios[0]} | {ratios[1]} |"
            )
        lines.append("")
    if result["fast_vs_reference"]:
        keys = [k for k in result["fast_vs_reference"][0] if k != "case"]
        lines += [
            "**fast / reference** (time of the fast dispatch over the reference dispatch, same routes)",
            "",
            "| case | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for row in result["fast_vs_reference"]:
            lines.append(f"| {row['case']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048, help="big FFN inner size (small = 1/16)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved prefill repeats")
    parser.add_argument("--decode-repeats", type=int, default=3, help="interleaved decoding repeats")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument(
        "--dispatch",
        type=lambda s: s.split(","),
        default=["fast"],
        help="comma-separated DuoFFN dispatch modes to time: fast, reference",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile each FFN (dynamic shapes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run")
    args = parser.parse_args(argv)
    bad = [d for d in args.dispatch if d not in ("fast", "reference")]
    if bad:
        parser.error(f"--dispatch: {bad} are not dispatch modes; use fast and/or reference, comma-separated.")
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab = 128, 512, 4, 4, 1024
        args.batch, args.prompt_len, args.new_tokens, args.repeats, args.decode_repeats = 2, 32, 8, 3, 2
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        atomic_write_json(args.json, result, newline=False)
    return result


if __name__ == "__main__":
    main()
