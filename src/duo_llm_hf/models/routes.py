"""The route vocabulary: choice codes, patterns, routing modes, route validation, random routes, route usage.

A *route* tensor has shape ``[batch, seq_len, num_layers]`` and holds one choice code per token and layer; one
vector of ``num_layers`` codes is a *pattern*. The routing modes (`ROUTING_MODES`) say where routes come from;
`parse_routing` reads a mode or a uniform pattern name (`all-small`, `all-big`, `all-skip`). The routed FFN that
runs the routes is in `routed_ffn.py`. This module is shared by every Duo model (Llama, OPT) and is copied next to
the modeling file when a model is saved with ``trust_remote_code`` support, so it imports only torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

SMALL = 0
BIG = 1
SKIP = 2
CHOICE_NAMES = ("small", "big", "skip")
CHOICE_CODES = {name: code for code, name in enumerate(CHOICE_NAMES)}
# One letter per choice, for patterns printed in reports: "sBB-" = small, big, big, skip.
CHOICE_LETTERS = ("s", "B", "-")
# Where the routes of a forward come from: `forward(routing=...)` takes every mode; `config.routing` and
# `set_routing` take all but `oracle`, which searches the routes of the given labels (it needs the package).
ROUTING_MODES = ("random", "fixed", "explicit", "learned", "oracle")
CONFIG_ROUTING_MODES = ("random", "fixed", "explicit", "learned")
# Names of the uniform fixed patterns: every token takes that choice in every layer.
UNIFORM_PATTERNS = {f"all-{name}": code for code, name in enumerate(CHOICE_NAMES)}

def choice_code(choice: int | str, field: str = "choice") -> int:
    """Return the code of a choice given by name (``"big"``) or code (``BIG``); raise a clear error otherwise."""
    if isinstance(choice, str) and choice.lower() in CHOICE_CODES:
        return CHOICE_CODES[choice.lower()]
    if isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < len(CHOICE_NAMES):
        return choice
    raise ValueError(
        f"{field}: {choice!r} is not a route choice; use one of {list(CHOICE_NAMES)} "
        f"or the codes SMALL={SMALL}, BIG={BIG}, SKIP={SKIP}."
    )


def choice_values(pairs: Iterable[tuple[int | str, object]], field: str, spec: object) -> dict[int, object]:
    """``{choice code: value}`` of ``(choice, value)`` pairs (choices by name or code, `choice_code`), refusing a
    choice given twice (``big`` twice, or ``big`` and ``BIG``, or ``big`` and its code): which value was meant is
    not ours to guess. ``spec`` is what the user wrote, quoted in the error."""
    values: dict[int, object] = {}
    for choice, value in pairs:
        code = choice_code(choice, field)
        if code in values:
            raise ValueError(f"{field}: {spec!r} names {CHOICE_NAMES[code]!r} twice; give each choice once.")
        values[code] = value
    return values


def parse_routing(name: str, num_layers: int) -> tuple[str, list[int] | None]:
    """Read a routing name: a routing mode (`ROUTING_MODES`) or a uniform pattern (`UNIFORM_PATTERNS`).

    Returns ``(mode, pattern)``: ``("fixed", [code] * num_layers)`` for ``all-small`` / ``all-big`` /
    ``all-skip``, ``(name, None)`` for a mode.
    """
    if name in ROUTING_MODES:
        return name, None
    if name in UNIFORM_PATTERNS:
        return "fixed", [UNIFORM_PATTERNS[name]] * num_layers
    raise ValueError(
        f"routing: {name!r} is not a routing; use a mode {list(ROUTING_MODES)} or a uniform pattern "
        f"{list(UNIFORM_PATTERNS)}."
    )


def pattern_to_str(pattern: Iterable[int]) -> str:
    """Render a pattern as letters, e.g. ``[SMALL, BIG, SKIP] -> "sB-"``."""
    return "".join(CHOICE_LETTERS[int(c)] for c in pattern)


def parse_pattern(pattern: str | Sequence[int | str], field: str = "pattern") -> list[int]:
    """Parse a pattern given as letters (``"sBB-"``), names or codes into a list of codes."""
    if isinstance(pattern, str):
        letters = {letter: code for code, letter in enumerate(CHOICE_LETTERS)}
        letters.update({"b": BIG, "S": SMALL})
        bad = [ch for ch in pattern if ch not in letters]
        if bad:
            raise ValueError(
                f"{field}: {pattern!r} has letters {bad} that are not choices; use s (small), B (big), - (skip)."
            )
        return [letters[ch] for ch in pattern]
    return [choice_code(c, field) for c in pattern]


def validate_route_fields(config) -> None:
    """Validate and normalise the Duo routing fields of a config in place.

    Every error names the field, the bad value and what is allowed. Normalised forms: ``route_options`` is a
    list of names in canonical order (small, big, skip), ``route_probs`` a dict over ``route_options``,
    ``pattern`` a list of codes.
    """
    n_layers = config.num_hidden_layers
    big_size = config.intermediate_size
    # The big inner size may be stored under another name (DuoOPT: ffn_dim, aliased by attribute_map).
    big_name = getattr(config, "attribute_map", {}).get("intermediate_size", "intermediate_size")

    if config.small_intermediate_size is None:
        config.small_intermediate_size = max(1, big_size // 16)
    small = config.small_intermediate_size
    if not isinstance(small, int) or isinstance(small, bool) or not 1 <= small <= big_size:
        raise ValueError(
            f"small_intermediate_size: {small!r} is not allowed; it must be an integer in 1..{big_size} "
            f"({big_name}), by default {big_name} // 16."
        )

    options = config.route_options
    if isinstance(options, str) or not options:
        raise ValueError(
            f"route_options: {options!r} is not allowed; give a non-empty list of choices from {list(CHOICE_NAMES)}."
        )
    codes = sorted({choice_code(c, "route_options") for c in options})
    config.route_options = [CHOICE_NAMES[c] for c in codes]

    if config.routing not in CONFIG_ROUTING_MODES:
        raise ValueError(
            f"routing: {config.routing!r} is not a routing mode; use one of {list(CONFIG_ROUTING_MODES)}."
        )

    config.route_probs = _normalised_route_probs(config.route_probs, config.route_options)

    if config.pattern is not None:
        pattern = parse_pattern(config.pattern, "pattern")
        if len(pattern) != n_layers:
            raise ValueError(
                f"pattern: {config.pattern!r} has {len(pattern)} choices but the model has "
                f"{n_layers} layers (num_hidden_layers); give one choice per layer."
            )
        outside = sorted({CHOICE_NAMES[c] for c in pattern} - set(config.route_options))
        if outside:
            raise ValueError(
                f"pattern: {config.pattern!r} uses {outside}, which route_options "
                f"{config.route_options} does not allow."
            )
        config.pattern = pattern
    elif config.routing == "fixed":
        raise ValueError(
            "pattern: None is not allowed with routing='fixed'; give one choice per layer."
        )

    seed = config.route_seed
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"route_seed: {seed!r} is not allowed; it must be a non-negative integer.")

    use_router = config.use_router
    if not isinstance(use_router, bool):
        raise ValueError(f"use_router: {use_router!r} is not allowed; it must be True or False.")
    # Learned routing needs routers; a model that has them keeps them (and their weights) in every mode.
    config.use_router = use_router or config.routing == "learned"


def _normalised_route_probs(probs: Mapping[str, float] | None, options: list[str]) -> dict[str, float]:
    if probs is None:
        # The paper's stage 1: p_big = 0.5 over small/big; otherwise uniform over the allowed choices.
        return {name: 1.0 / len(options) for name in options}
    if not isinstance(probs, Mapping):
        raise ValueError(
            f"route_probs: {probs!r} is not allowed; give a dict such as {{'small': 0.5, 'big': 0.5}}."
        )
    out = {}
    for code, value in choice_values(probs.items(), "route_probs", dict(probs)).items():
        name = CHOICE_NAMES[code]
        if name not in options:
            raise ValueError(
                f"route_probs: {dict(probs)!r} gives a probability to {name!r}, which route_options {options} does "
                f"not allow."
            )
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"route_probs: {name!r} has probability {value!r}; probabilities must be finite and >= 0."
            )
        out[name] = float(value)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"route_probs: {dict(probs)!r} sums to {total:g}; the probabilities must sum to 1.")
    return {name: out.get(name, 0.0) for name in options}


def allowed_codes(config) -> list[int]:
    """The codes of the config's ``route_options``, in canonical order."""
    return [CHOICE_CODES[name] for name in config.route_options]


def check_routes(routes: torch.Tensor, config, batch_size: int, seq_len: int) -> None:
    """Check an explicit route tensor: shape ``[batch, seq, layers]``, integer dtype, allowed codes only."""
    n_layers = config.num_hidden_layers
    if not isinstance(routes, torch.Tensor):
        raise TypeError(
            f"routes: expected a torch.LongTensor of shape [batch, seq, layers], got {type(routes).__name__}."
        )
    if routes.dtype.is_floating_point or routes.dtype.is_complex or routes.dtype == torch.bool:
        raise TypeError(
            f"routes: dtype {routes.dtype} is not allowed; use an integer tensor (torch.long) of choice codes."
        )
    expected = (batch_size, seq_len, n_layers)
    if tuple(routes.shape) != expected:
        raise ValueError(
            f"routes: shape {tuple(routes.shape)} does not match [batch, seq_len, num_layers] = {list(expected)}."
        )
    allowed = torch.tensor(allowed_codes(config), device=routes.device)
    bad = ~torch.isin(routes, allowed)
    if bad.any():
        found = sorted(set(routes[bad].tolist()))
        raise ValueError(
            f"routes: codes {found} are not allowed by route_options {config.route_options} "
            f"(codes {allowed.tolist()}; SMALL={SMALL}, BIG={BIG}, SKIP={SKIP})."
        )


def route_fractions(routes: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """Fraction of (token, layer) pairs that took each choice; ``mask`` ([batch, seq]) selects the tokens."""
    if mask is not None:
        routes = routes[mask.bool()]
    counts = torch.bincount(routes.reshape(-1).long(), minlength=len(CHOICE_NAMES)).double()
    total = counts.sum().clamp_min(1)
    return {name: (counts[code] / total).item() for code, name in enumerate(CHOICE_NAMES)}


def route_usage(routes: torch.Tensor, mask: torch.Tensor | None = None) -> torch.LongTensor:
    """Per-layer x per-position usage counts of each choice (the data of the paper's Fig. 2 and Fig. 3).

    ``routes``: ``[batch, seq, layers]`` choice codes (routes taken by any routing mode, or the oracle's
    argmin patterns); ``mask``: ``[batch, seq]``, True for the tokens to count (e.g. the attention mask).
    Returns counts of shape ``[3, layers, seq]``: ``usage[c, l, t]`` = number of sequences whose token at
    position ``t`` took choice code ``c`` (``SMALL``, ``BIG``, ``SKIP``) in layer ``l``. Positions are indices
    in the route tensor (position 0 = first token; use right padding). Counts add up over batches of the same
    length; `analysis.usage_fraction` turns them into the fraction of tokens per (layer, position).
    """
    if routes.dim() != 3:
        raise ValueError(f"routes: expected shape [batch, seq, layers], got {tuple(routes.shape)}.")
    one_hot = torch.nn.functional.one_hot(routes.long(), len(CHOICE_NAMES))  # [B, T, L, 3]
    if mask is not None:
        one_hot = one_hot * mask.to(one_hot.device).bool()[:, :, None, None]
    return one_hot.sum(0).permute(2, 1, 0).contiguous()


class RouteSampler:
    """Seeded sampler of random routes from the config's ``route_probs``.

    It owns its generator, so routes are reproducible for a given seed whatever else draws random numbers, and
    its ``state_dict`` is checkpointed (as JSON, `checkpointing.RouteSamplerState`) so a resumed run draws the
    same routes.
    """

    def __init__(self, probs: Mapping[str, float], seed: int = 0):
        self.set_probs({name: p for name, p in probs.items() if p > 0})
        self.seed = seed
        # Routes are drawn on the CPU and moved to the device: the same seed gives the same routes anywhere.
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def set_probs(self, probs: Mapping[str, float]) -> None:
        """Draw the next routes with ``probs`` (``{choice name: probability}``, summing to 1), e.g. a p_big that
        changes over a run. A choice may have probability 0: it is never drawn. Each draw takes the same random
        numbers whatever the probabilities, so the generator's state (what is checkpointed) stays the same."""
        names = list(probs)
        # Explicit CPU tensors: models are built under a meta-device context when loaded with from_pretrained.
        self.codes = torch.tensor([CHOICE_CODES[n] for n in names], dtype=torch.long, device="cpu")
        cumulative = torch.tensor([probs[n] for n in names], dtype=torch.float64, device="cpu").cumsum(0)
        if not names or not cumulative[-1] > 0:
            raise ValueError(f"route probabilities {dict(probs)!r}: at least one choice needs a probability > 0.")
        # A choice of probability 0 is an empty interval: u in [0, 1) never falls in it (bucketize, right=True).
        self.cumulative = (cumulative / cumulative[-1]).float()

    def sample(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.LongTensor:
        """Draw a route tensor of the given shape."""
        u = torch.rand(tuple(shape), generator=self.generator, device="cpu")
        index = torch.bucketize(u, self.cumulative, right=True).clamp_max(len(self.codes) - 1)
        return self.codes[index].to(device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.generator.set_state(state["rng_state"])


def realised_fractions(usage: torch.Tensor) -> dict[str, object]:
    """Realised fraction of each choice, overall and per layer, from usage counts ``[3, layers, positions]``.

    ``usage`` is `route_usage` of the routes taken (summed over batches). Returns
    ``{"overall": {name: fraction}, "per_layer": [{name: fraction}, ...]}`` over the counted (token, layer)
    pairs: plain floats, ready for a JSON report.
    """
    per_layer = usage.double().sum(-1)  # [3, L]
    overall = per_layer.sum(-1)  # [3]

    def named(counts: torch.Tensor) -> dict[str, float]:
        total = counts.sum().clamp_min(1)
        return {name: (counts[code] / total).item() for code, name in enumerate(CHOICE_NAMES)}

    return {
        "overall": named(overall),
        "per_layer": [named(per_layer[:, layer]) for layer in range(per_layer.shape[1])],
    }
