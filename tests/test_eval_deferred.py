"""`--tasks deferred` on the real SmolLM2: the key's steps are the key's tokens; the full cache reads the key as the
uncompressed model does; one wrong key token loses the example; examples fed together equal each alone; one run."""

import json

import pytest
import torch
from typer.testing import CliRunner

from modalkv import cli, get_press
from modalkv.eval.deferred import ASK, DeferredTask

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(smollm2):
    _, tokenizer = smollm2
    task = DeferredTask(tokens=400, samples=3)
    examples, failures = task.load(tokenizer)
    assert failures == []
    return task, examples


def test_the_key_is_in_the_prompt_and_its_steps_are_its_tokens(smollm2, loaded):
    _, tokenizer = smollm2
    task, examples = loaded
    assert len({e.reference for e in examples}) == 3 and len({e.info["depth"] for e in examples}) == 3
    for example in examples:
        tokens = task._tokens[example.id]
        assert example.reference in example.prompt and example.prompt.endswith(ASK)
        assert abs(tokens.prompt_tokens - 400) < 30
        continuation = tokens.ids[tokens.prompt_tokens :]
        assert tokenizer.decode(continuation[slice(*example.info["key_steps"])]).strip() == example.reference
    again, _ = DeferredTask(tokens=400, samples=3).load(tokenizer)
    other, _ = DeferredTask(tokens=400, samples=3, seed=5).load(tokenizer)
    assert again == examples and other != examples
    more, _ = DeferredTask(tokens=400, samples=4).load(tokenizer)  # a larger count only adds examples
    assert more[:3] == examples and len(more) == 4


def test_the_full_cache_reads_as_the_uncompressed_model(smollm2, loaded):
    model, tokenizer = smollm2
    task, examples = loaded
    for example in examples:
        outcome = task.evaluate(model, tokenizer, get_press("full"), example)
        assert outcome.metrics["kl"] < 1e-5 and outcome.metrics["kl_key"] < 1e-5
        assert outcome.score == 1.0, example.id  # SmolLM2 writes a 400-token prompt's key back
        assert outcome.cache_bytes == outcome.full_cache_bytes and outcome.shared_prefill


def test_one_wrong_key_token_loses_the_example(loaded):
    task, examples = loaded
    example = examples[0]
    tokens = task._tokens[example.id]
    target = torch.tensor(tokens.ids[tokens.prompt_tokens :])
    right = torch.full((len(target), 50_000), -20.0)
    right[torch.arange(len(target)), target] = 0.0
    assert task.measure(right, right, example) == (1.0, {"kl_key": 0.0, "kl": 0.0})
    wrong = right.clone()
    step = example.info["key_steps"][1] - 1  # the key's last digit
    wrong[step, target[step]], wrong[step, (target[step] + 1) % 50_000] = -20.0, 0.0
    score, metrics = task.measure(right, wrong, example)
    assert score == 0.0 and metrics["kl_key"] > metrics["kl"] > 0


@pytest.mark.parametrize("method", ["h2o", "retentivekv"])  # both evict while decoding
def test_examples_fed_together_equal_each_alone(smollm2, loaded, method):
    model, tokenizer = smollm2
    task, examples = loaded
    press = get_press(method, 0.2)
    batched = task.evaluate_batch(model, tokenizer, press, examples[:2])
    assert batched is not None and all(outcome.batch == 2 for outcome in batched)
    for outcome, example in zip(batched, examples[:2], strict=True):
        alone = task.evaluate(model, tokenizer, press, example)
        assert (outcome.score, outcome.prediction, outcome.cache_bytes) == (
            alone.score,
            alone.prediction,
            alone.cache_bytes,
        )
        assert outcome.metrics == pytest.approx(alone.metrics, abs=1e-4)


def test_one_run_records_every_example(tmp_path):
    out = tmp_path / "run"
    args = ["eval", "--tasks", "deferred", "-t", "deferred.tokens=300", "-t", "deferred.samples=2"]
    args += ["--methods", "full,snapkv", "--budgets", "0.3", "--batch-size", "2", "--out", str(out)]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["task"] for r in records} == {"deferred"}
    assert all(r["in_average"] and {"kl", "kl_key"} <= set(r["metrics"]) for r in records)
    assert "deferred kl_key" in result.stdout
