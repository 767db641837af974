"""lm-evaluation-harness integration: the `duo` model, routing arguments, local-data tasks, `--model hf`.

Every evaluation runs the harness's real `simple_evaluate` / command-line path on the hand-written ARC-Easy and
HellaSwag fixtures (local jsonl: ARC-Easy in the Hub schema, HellaSwag in the offline copy's format) with a tiny
Duo model and a byte-level BPE tokenizer built here.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from duo_llm_hf import BIG, SMALL, DuoLlamaConfig, DuoLlamaForCausalLM  # noqa: E402
from duo_llm_hf.integrations.lm_eval import (  # noqa: E402
    FIXTURE_DATA_DIR,
    LOCAL_TASKS,
    TASKS_DIR,
    DuoLM,
    local_task_manager,
    routing_settings,
)
from tests.helpers import decided, save_model_folder  # noqa: E402

TASKS = ["arc_easy_local", "hellaswag_local"]
logging.getLogger("lm_eval").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token byte-level BPE tokenizer trained on the fixture texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [line for path in sorted(FIXTURE_DATA_DIR.rglob("*.jsonl")) for line in path.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def duo_model(tokenizer):
    """A tiny random Duo model whose big FFNs are scaled up, so all-small and all-big score differently."""
    torch.manual_seed(3)
    config = DuoLlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = DuoLlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.big.down_proj.weight.mul_(30)
    return model


@pytest.fixture(scope="module")
def task_manager():
    return local_task_manager(FIXTURE_DATA_DIR, include_defaults=False)  # no index of the harness's 10k tasks


def evaluate(lm, task_manager) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager, bootstrap_iters=0)


def scores(results: dict) -> dict:
    metrics = ("acc", "acc_norm")
    return {(task, metric): results["results"][task][f"{metric},none"] for task in TASKS for metric in metrics}


def loglikelihoods(results: dict) -> dict:
    """(task, doc_id) -> the loglikelihood of every choice."""
    return {
        (task, sample["doc_id"]): [float(resp[0][0]) for resp in sample["resps"]]
        for task in TASKS
        for sample in results["samples"][task]
    }


# Loglikelihoods of the same continuations in other batch shapes or processes (the harness sorts and pads its
# batches; Duo dispatch against dense FFNs): float32 sums over a few tokens of log-softmaxes of order 1 to 10, so
# rounding of 1e-5 at most; 1e-4 leaves a margin of 10.
LL_TOL = 1e-4


def assert_same_scores(results: dict, reference: dict) -> None:
    """Accuracies are decisions: per document, the argmax over its choices of the loglikelihood (acc) or of the
    loglikelihood per character of the choice (acc_norm). Where the reference decides them (best beats second by
    more than LL_TOL) the two runs pick the same choice; the scores differ by at most the share of undecided ones."""
    got, expected = loglikelihoods(results), loglikelihoods(reference)
    assert got.keys() == expected.keys()
    for task in TASKS:
        samples = reference["samples"][task]
        undecided = {"acc": 0, "acc_norm": 0}
        for sample in samples:
            key = (task, sample["doc_id"])
            lengths = torch.tensor([float(len(args[1])) for args in sample["arguments"]])
            for metric, scale in (("acc", torch.ones_like(lengths)), ("acc_norm", lengths)):
                ref, other = torch.tensor(expected[key]) / scale, torch.tensor(got[key]) / scale
                if bool(decided(-ref, LL_TOL / float(scale.min()))):
                    assert int(other.argmax()) == int(ref.argmax()), (key, metric)
                else:
                    undecided[metric] += 1
        for metric, count in undecided.items():
            difference = abs(scores(results)[task, metric] - scores(reference)[task, metric])
            assert difference <= count / len(samples) + 1e-12, (task, metric)


def max_difference(a: dict, b: dict) -> float:
    """Largest loglikelihood difference between two runs over the same documents."""
    assert a.keys() == b.keys()
    return max(abs(x - y) for key in a for x, y in zip(a[key], b[key], strict=True))


def dense_path(duo: DuoLlamaForCausalLM, choice: int):
    """The dense `LlamaForCausalLM` that every token on `choice` (SMALL or BIG) computes."""
    if choice == BIG:
        return duo.to_dense()
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {k: v for k, v in duo.config.to_dict().items() if k in LlamaConfig().to_dict() and k != "model_type"}
    fields["intermediate_size"] = duo.config.small_intermediate_size
    dense = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    state = {k.replace(".mlp.small.", ".mlp."): v for k, v in duo.state_dict().items() if ".mlp.big." not in k}
    dense.load_state_dict(state, strict=True)
    return dense


@pytest.fixture(scope="module")
def fixed_runs(duo_model, tokenizer, task_manager) -> dict:
    """Harness results of the Duo model with every token on small, and on big."""
    return {
        routing: evaluate(DuoLM(pretrained=duo_model, tokenizer=tokenizer, routing=routing, batch_size=8), task_manager)
        for routing in ("all-small", "all-big")
    }


@pytest.mark.numerics
def test_routing_modes_change_scores_and_match_their_dense_paths(duo_model, tokenizer, task_manager, fixed_runs):
    """All-small and all-big through `duo` score differently, and each equals `hf` on its own dense path."""
    ids = tokenizer("Question: Which animal is a mammal?\nAnswer: a whale", return_tensors="pt").input_ids
    n = ids.shape[1]
    with torch.no_grad():
        small_logits = duo_model(ids, routes=torch.full((1, n, 2), SMALL)).logits
        big_logits = duo_model(ids, routes=torch.full((1, n, 2), BIG)).logits
    assert (small_logits - big_logits).abs().max() > 1e-2

    for routing, choice, letters in (("all-small", SMALL, "ss"), ("all-big", BIG, "BB")):
        assert fixed_runs[routing]["config"]["duo_routing"]["pattern"] == letters
        dense = get_model("hf")(pretrained=dense_path(duo_model, choice), tokenizer=tokenizer, batch_size=8)
        reference = evaluate(dense, task_manager)
        assert_same_scores(fixed_runs[routing], reference)
        assert len(loglikelihoods(reference)) == 12
        assert max_difference(loglikelihoods(fixed_runs[routing]), loglikelihoods(reference)) < LL_TOL

    small, big = loglikelihoods(fixed_runs["all-small"]), loglikelihoods(fixed_runs["all-big"])
    differing = [key for key in small if max(abs(a - b) for a, b in zip(small[key], big[key])) > 1e-3]
    assert len(differing) == len(small)
    # ... and the two paths rank the choices differently (on 12 documents of short and long choices, their best
    # choice and so their accuracies may coincide).
    ranks = {name: {key: sorted(range(len(ll)), key=ll.__getitem__) for key, ll in lls.items()} for name, lls in
             (("small", small), ("big", big))}  # fmt: skip
    assert ranks["small"] != ranks["big"]


def test_random_routing_with_p_big(duo_model, tokenizer, task_manager, fixed_runs):
    """routing=random,p_big=... sets the sampler; p_big=0 scores like all-small, p_big=0.25 like neither."""
    by_p = {}
    for p_big in (0, 0.25):
        lm = DuoLM(pretrained=duo_model, tokenizer=tokenizer, routing="random", p_big=p_big, route_seed=5, batch_size=8)
        assert duo_model.config.route_probs == {"small": 1 - p_big, "big": p_big}
        by_p[p_big] = loglikelihoods(results := evaluate(lm, task_manager))
        assert results["config"]["duo_routing"] == {
            "routing": "random",
            "route_options": ["small", "big"],
            "route_probs": {"small": 1 - p_big, "big": p_big},
            "route_seed": 5,
        }
    assert max_difference(by_p[0], loglikelihoods(fixed_runs["all-small"])) < 1e-5
    assert max_difference(by_p[0.25], loglikelihoods(fixed_runs["all-small"])) > 1e-2
    assert max_difference(by_p[0.25], loglikelihoods(fixed_runs["all-big"])) > 1e-2


def test_learned_routing(duo_model, tokenizer, task_manager, fixed_runs):
    """routing=learned scores with the model's routers: a router that always picks BIG (SMALL) scores like
    all-big (all-small)."""
    import copy

    model = copy.deepcopy(duo_model)
    model.set_routing("learned")  # adds the routers; a trained model has them already
    for choice, routing in ((BIG, "all-big"), (SMALL, "all-small")):
        with torch.no_grad():
            for layer in model.model.layers:
                router = layer.mlp.router
                router.weight.zero_()
                router.bias.copy_(torch.tensor([10.0 if c == choice else -10.0 for c in router.choices]))
        results = evaluate(DuoLM(pretrained=model, tokenizer=tokenizer, routing="learned", batch_size=8), task_manager)
        assert results["config"]["duo_routing"]["routing"] == "learned"
        assert max_difference(loglikelihoods(results), loglikelihoods(fixed_runs[routing])) < 1e-5


def test_routing_arguments():
    config = DuoLlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        route_options=["small", "big", "skip"],
    )
    assert routing_settings(config) is None
    assert routing_settings(config, "all-big") == {"routing": "fixed", "pattern": [BIG] * 4}
    assert routing_settings(config, pattern="sB-B") == {"routing": "fixed", "pattern": "sB-B"}
    assert routing_settings(config, p_big=0.5, p_skip=0.25, route_seed=3) == {
        "routing": "random",
        "route_seed": 3,
        "route_probs": {"big": 0.5, "skip": 0.25, "small": 0.25},
    }
    with pytest.raises(ValueError, match="no routers"):
        routing_settings(config, "learned")
    config.use_router = True
    assert routing_settings(config, "learned") == {"routing": "learned"}
    with pytest.raises(ValueError, match="set the probabilities of"):
        routing_settings(config, p_big=0.5)
    with pytest.raises(ValueError, match="not a routing"):
        routing_settings(config, "medium")
    with pytest.raises(ValueError, match="needs pattern"):
        routing_settings(config, "fixed")
    with pytest.raises(ValueError, match="not a routing of the duo model"):
        routing_settings(config, "small")  # the uniform patterns are all-small, all-big, all-skip
    with pytest.raises(ValueError, match="only apply to routing=random"):
        routing_settings(config, "all-big", p_big=0.5)
    with pytest.raises(ValueError, match="not a probability"):
        routing_settings(config, p_big=1.5, p_small=0, p_skip=0)
    two = DuoLlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    with pytest.raises(ValueError, match="do not allow 'skip'"):
        routing_settings(two, p_skip=0.5)


def test_duo_is_registered_lazily_and_refuses_dense_models(tokenizer):
    from lm_eval.api.registry import model_registry

    assert "duo" in model_registry and "hf" in model_registry
    assert get_model("duo") is DuoLM
    dense = DuoLlamaForCausalLM(
        DuoLlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
    ).to_dense()
    with pytest.raises(TypeError, match="Use --model hf"):
        DuoLM(pretrained=dense, tokenizer=tokenizer)


def test_local_tasks_reuse_the_official_definitions():
    official_dir = Path(lm_eval.__file__).parent / "tasks"
    official = {
        "arc_easy": load_yaml(official_dir / "arc" / "arc_easy.yaml", resolve_func=False),
        "hellaswag": load_yaml(official_dir / "hellaswag" / "hellaswag.yaml", resolve_func=False),
    }
    # Where the data comes from, and HellaSwag's training split (the local copy has none).
    data_fields = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "process_docs"}
    for name, local_name in LOCAL_TASKS.items():
        local = load_yaml(TASKS_DIR / f"{local_name}.yaml", resolve_func=False)
        assert local["task"] == local_name and local["dataset_path"] == "json"
        skipped = data_fields | ({"training_split"} if name == "hellaswag" else set())
        assert {k: v for k, v in local.items() if k not in skipped} == {
            k: v for k, v in official[name].items() if k not in skipped
        }
    # HellaSwag documents go through the harness's own preprocessing function (see the next test).
    resolved = load_yaml(TASKS_DIR / "hellaswag_local.yaml", resolve_func=True)
    assert resolved["process_docs"].__name__ == "process_hellaswag_docs"


# HellaSwag items in the Hub schema (Rowan/hellaswag): two real ActivityNet items, one with capitals in ctx_b (the
# harness's capitalize() lowers them), a WikiHow item with the bracketed markers and an empty ctx_b, one whose
# lowercase words follow an abbreviation, and an ActivityNet phrase that starts with a digit. The last one has
# markers at the ends of its texts: the harness strips a text before it removes them, so its official query ends
# with a space and its choice starts with one; the offline copy has no such spaces (the remaining difference).
HUB_ITEMS = [
    ("Roof shingle removal", "A man is sitting on a roof.", "he", ["is using wrap.", "is ripping tiles off."], 1),
    ("Clean and jerk", "A lady walks to a barbell. She bends down.", "the lady", ["swings.", "lifts it."], 1),
    ("Disc dog", "We see the title. Jesse the dog runs.", "the dog and Jesse", ["play.", "sleep."], 0),
    (
        "Home and Garden",
        "[header] How to water a plant [title] Fill a can. [step] Walk to it.",
        "",
        ["Pour it.", "Eat."],
        0,
    ),
    (
        "Finance and Business",
        "[header] Apply for aid [title] Everyone must be u.s. citizens or u.s. nationals.",
        "",
        ["A.", "B."],
        1,
    ),
    ("Getting a piercing", "4 the guy cleans up the lip.", "5 the guy", ["smiles.", "leaves."], 0),
    ("Health", "[header] How to rest [title] Lie down.", "[step]", ["[substeps] Sleep.", "Run."], 0),
]


def hub_item(label, ctx_a, ctx_b, endings, gold) -> dict:
    ctx = f"{ctx_a} {ctx_b}" if ctx_b else ctx_a
    return {"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "ctx": ctx, "endings": endings, "label": str(gold)}


def offline_item(hub: dict) -> dict:
    """The item as the offline copy gives it (docs/evaluation.md): ctx whole, the four markers removed, label an int."""

    def clean(text: str) -> str:
        text = text.replace(" [title]", ". ")
        for marker in ("[header]", "[step]", "[substeps]", "[title]"):
            text = text.replace(marker, "")
        return " ".join(text.split())

    return {
        "activity_label": clean(hub["activity_label"]),
        "ctx": clean(hub["ctx"]),
        "endings": [clean(e) for e in hub["endings"]],
        "label": int(hub["label"]),
    }


def test_hellaswag_local_docs_match_the_official_ones(tmp_path):
    """hellaswag_local on the offline format gives the official task's query, choices and gold: its documents come
    from the harness's process_docs, after ctx is split back into ctx_a and ctx_b."""
    import datasets
    from lm_eval.tasks.hellaswag.utils import process_docs

    hub = [hub_item(*item) for item in HUB_ITEMS]
    official = process_docs(datasets.Dataset.from_list(hub))
    assert official[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert official[2]["query"].endswith("The dog and jesse")
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(offline_item(h)) + "\n" for h in hub))
    task = local_task_manager(tmp_path, include_defaults=False).load(["hellaswag_local"])["tasks"]["hellaswag_local"]
    docs = list(task.validation_docs())
    assert len(docs) == len(hub)
    for doc, expected in zip(docs[:-1], official, strict=False):
        assert task.doc_to_text(doc) == expected["query"]
        assert task.doc_to_choice(doc) == expected["choices"]
        assert task.doc_to_target(doc) == expected["gold"]
    edges, expected = docs[-1], official[-1]
    assert (expected["query"], expected["choices"][0]) == ("Health: How to rest. Lie down. ", " Sleep.")
    assert (task.doc_to_text(edges), task.doc_to_choice(edges)[0]) == ("Health: How to rest. Lie down.", "Sleep.")
    # The check docs/evaluation.md quotes on the offline copy: the official function on the items as given differs only
    # by the capitalised ctx_b.
    from duo_llm_hf.integrations.lm_eval import hellaswag_agreement

    counts = hellaswag_agreement(tmp_path / "hellaswag_val.jsonl")
    assert counts == {"same": 4, "ctx_b capitalised": 3, "other": 0}
    # Items in the Hub schema go through the official function unchanged.
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hub))
    task = local_task_manager(tmp_path, include_defaults=False).load(["hellaswag_local"])["tasks"]["hellaswag_local"]
    assert [task.doc_to_text(d) for d in task.validation_docs()] == official["query"]


def test_hellaswag_context_split():
    from duo_llm_hf.integrations.tasks.local_data import split_hellaswag_context

    assert split_hellaswag_context("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_context("A boy runs. The boy jumps. the boy") == ("A boy runs. The boy jumps.", "the boy")
    for whole in (
        "How to water a plant. Fill a can.",
        "Be u.s. citizens or u.s. nationals.",
        "2 a guy. 3 the guy",
        "he",
    ):
        assert split_hellaswag_context(whole) == (whole, "")


def test_local_tasks_need_a_data_dir(monkeypatch, tmp_path):
    from lm_eval.tasks import TaskManager

    monkeypatch.delenv("DUO_LM_EVAL_DATA", raising=False)
    with pytest.raises(ValueError, match="data_dir"):
        TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(["arc_easy_local"])
    with pytest.raises(FileNotFoundError, match="missing"):
        local_task_manager(tmp_path, include_defaults=False).load(["hellaswag_local"])


# The command line indexes the harness's ~10k built-in task YAMLs (~5 s) before every run; the local tasks need
# none of them, so both command-line runs below build their TaskManager with include_defaults=False.
SKIP_BUILTIN_TASKS = (
    "import functools, lm_eval.tasks; "
    "lm_eval.tasks.TaskManager = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)"
)


def cli_args(model: str, model_args: str, out: Path) -> list[str]:
    return [
        "lm_eval",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(TASKS_DIR),
        "--metadata",
        json.dumps({"data_dir": str(FIXTURE_DATA_DIR)}),
        "--output_path",
        str(out),
        "--batch_size",
        "8",
        "--device",
        "cpu",
        "--log_samples",
    ]


def read_outputs(out: Path) -> dict:
    """The results file of a command-line run, with its per-sample files under "samples"."""
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(path).read_text())
    results["samples"] = {}
    for task in TASKS:
        (path,) = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        results["samples"][task] = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return results


def hf_model_args(folder: Path, **overrides) -> str:
    """`--model hf` arguments of a saved Duo folder: remote code, the routing as config overrides. A JSON object
    when an override is a dict (`route_probs`), as the harness accepts; `key=value,...` otherwise."""
    args = {"pretrained": str(folder), "trust_remote_code": True, **overrides}
    if any(isinstance(value, dict) for value in args.values()):
        return json.dumps(args)
    return ",".join(f"{key}={value}" for key, value in args.items())


CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run_cli_without_the_package(runs: dict[str, str], tmp_path: Path) -> dict[str, dict]:
    """Run the harness's command line (`cli_evaluate`, what `lm_eval` runs) as `--model hf` once per model
    arguments, all in one fresh process where duo_llm_hf cannot be imported; run name -> its outputs."""
    argvs = [cli_args("hf", model_args, tmp_path / "out" / name) for name, model_args in runs.items()]
    script = textwrap.dedent(f"""
        import sys
        sys.modules["duo_llm_hf"] = None  # the package must not be importable
        {SKIP_BUILTIN_TASKS}
        from lm_eval.__main__ import cli_evaluate
        for argv in {argvs!r}:
            sys.argv = argv
            cli_evaluate()
        print("REMOTE_CODE", any(name.startswith("transformers_modules") for name in sys.modules))
    """)
    env = {**os.environ, **CLI_ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REMOTE_CODE True" in done.stdout
    return {name: read_outputs(tmp_path / "out" / name) for name in runs}


@pytest.mark.slow
@pytest.mark.numerics
def test_lm_eval_cli_model_hf_reaches_every_routing(duo_model, tokenizer, task_manager, tmp_path):
    """`--model hf` with `trust_remote_code=True` and the routing as config overrides in `--model_args`, in a
    process where duo_llm_hf cannot be imported, scores like `duo` in this process under every routing: the
    config's, fixed, all-small, random (probabilities and seed) and learned."""
    import copy

    folder = save_model_folder(tmp_path / "tiny-duo", copy.deepcopy(duo_model).set_routing("fixed", "sB"), tokenizer)
    with_routers = copy.deepcopy(duo_model).set_routing("learned")  # fresh routers: every token its own route
    with torch.no_grad():
        for layer in with_routers.model.layers:
            layer.mlp.router.weight.mul_(100)  # decisive router logits
    with_routers.set_routing("random")  # a saved model keeps its routers in every mode
    routers_folder = save_model_folder(tmp_path / "tiny-duo-routers", with_routers, tokenizer)

    probs = {"small": 0.75, "big": 0.25}
    runs = {  # name -> (--model hf overrides, the same routing as duo arguments)
        "config": (folder, {}, {}),
        "fixed": (folder, {"routing": "fixed", "pattern": "Bs"}, {"routing": "fixed", "pattern": "Bs"}),
        "all-small": (folder, {"routing": "fixed", "pattern": "ss"}, {"routing": "all-small"}),
        "random": (
            folder,
            {"routing": "random", "route_probs": probs, "route_seed": 5},
            {"routing": "random", "p_big": 0.25, "route_seed": 5},
        ),
        "learned": (routers_folder, {"routing": "learned"}, {"routing": "learned"}),
    }
    hf = run_cli_without_the_package(
        {name: hf_model_args(f, **hf_args) for name, (f, hf_args, _) in runs.items()}, tmp_path
    )
    duo = {
        name: evaluate(DuoLM(pretrained=f, device="cpu", batch_size=8, **duo_args), task_manager)
        for name, (f, _, duo_args) in runs.items()
    }
    assert duo["random"]["config"]["duo_routing"]["route_probs"] == probs
    for name in runs:
        assert_same_scores(hf[name], duo[name])
        assert max_difference(loglikelihoods(hf[name]), loglikelihoods(duo[name])) < LL_TOL, name
    # the overrides took effect: each routing scores unlike the saved one (both folders hold the same FFNs)
    for name in ("fixed", "all-small", "random", "learned"):
        assert max_difference(loglikelihoods(hf[name]), loglikelihoods(hf["config"])) > 1e-2, name
    assert max_difference(loglikelihoods(hf["learned"]), loglikelihoods(hf["all-small"])) > 1e-2


@pytest.mark.slow
@pytest.mark.numerics
def test_lm_eval_command_model_hf(duo_model, tokenizer, task_manager, tmp_path):
    """The harness's own `lm_eval` executable, in a fresh process that imports nothing of ours (no start-up hook):
    `--model hf --model_args pretrained=DIR,trust_remote_code=True,routing=fixed,pattern=Bs` scores
    like `duo` with `routing=fixed,pattern=Bs` in this process."""
    lm_eval_command = Path(sys.executable).with_name("lm_eval")
    assert lm_eval_command.is_file(), f"{lm_eval_command} missing: install lm-eval in this environment"
    folder = tmp_path / "tiny-duo"
    duo_model.set_routing("fixed", pattern="sB")  # the saved default, which the override replaces
    save_model_folder(folder, duo_model, tokenizer)
    lm = DuoLM(pretrained=str(folder), routing="fixed", pattern="Bs", device="cpu", batch_size=8)
    expected = evaluate(lm, task_manager)

    model_args = hf_model_args(folder, routing="fixed", pattern="Bs")
    argv = cli_args("hf", model_args, tmp_path / "out")
    env = {**os.environ, **CLI_ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([str(lm_eval_command), *argv[1:]], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_outputs(tmp_path / "out")
    assert results["config"]["model_args"]["pattern"] == "Bs"
    assert_same_scores(results, expected)
    assert max_difference(loglikelihoods(results), loglikelihoods(expected)) < LL_TOL


def test_duo_llm_eval_command(duo_model, tokenizer, tmp_path, monkeypatch, capsys):
    """`duo-llm eval --model duo --model_args pretrained=DIR,routing=random,p_big=0.25` (the harness's CLI). The
    harness's progress bars, held back until the model has checked its requests, are all written out."""
    import functools
    import sys

    import lm_eval.tasks

    from duo_llm_hf.cli import main

    folder = tmp_path / "tiny-duo"
    save_model_folder(folder, duo_model, tokenizer)
    local_only = functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", local_only)
    model_args = f"pretrained={folder},routing=random,p_big=0.25"
    stderr = sys.stderr
    assert main(["eval", *cli_args("duo", model_args, tmp_path / "out")[1:]]) == 0
    assert sys.stderr is stderr
    err = capsys.readouterr().err
    assert "Tokenizing inputs: 100%" in err and "Running loglikelihood requests" in err, err
    results = read_outputs(tmp_path / "out")
    assert results["config"]["duo_routing"]["route_probs"] == {"small": 0.75, "big": 0.25}
    assert len(loglikelihoods(results)) == 12
