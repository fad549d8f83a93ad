"""CAM: the leaving token's value is merged into the next `merge_count` kept tokens, with the authors' probability."""

import pytest
import torch

from modalkv import CompressedCache
from modalkv.presses import get_press


def stored(layer) -> list[dict[int, torch.Tensor]]:
    """Per row (batch row, KV head) of a layer: its stored values by sequence column."""
    padded, lengths = layer.rows.padded(), layer.rows.lengths.tolist()
    return [
        dict(zip(padded["columns"][r, :n].tolist(), padded["values"][r, :n], strict=True))
        for r, n in enumerate(lengths)
    ]


def forward(model, press, ids, mask, steps: int, after_prefill=None):
    """The prefill of `ids`, then `steps` decoding steps of fixed tokens (the same for every press);
    `after_prefill(cache)` runs in between."""
    cache = CompressedCache(press)
    follow = torch.full((ids.shape[0], 1), 5)
    with press.attach(model), torch.no_grad():
        logits = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]]
        if after_prefill is not None:
            after_prefill(cache)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(follow)], dim=1)
            logits.append(model(follow, attention_mask=mask, past_key_values=cache).logits[:, -1])
    return cache, logits


def set_leaving_attention(cache, value: float) -> None:
    """Sets every row's accumulated attention of its oldest window token (the next to leave) to `value`."""
    for layer in cache.layers:
        rows = layer.rows
        padded = rows.padded()
        window = torch.where(padded["scores"].isinf(), torch.iinfo(torch.int32).max, padded["columns"])
        oldest = window.argmin(-1)  # position within each row, as padded() lays it out
        rows.slots["scores"][rows.layout.row_start + oldest] = value


@pytest.mark.parametrize("lengths", [(40,), (40, 33)], ids=["one-row", "left-padded"])
@pytest.mark.parametrize("likely", [True, False], ids=["merging", "dropping"])
def test_a_decoding_step_merges_the_leaving_value_into_the_next_tokens_or_drops_it(model, lengths, likely):
    """After one step CAM holds StreamingLLM's columns; a row's values are StreamingLLM's, plus, where its draw merged,
    the leaving token's value / merge_count on each of the next merge_count columns (the new token's included). The
    leaving token's accumulated attention is set so that its probability is 1 (far above its window's) or 0."""
    gen = torch.Generator().manual_seed(3)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :], mask[i, width - n :] = torch.randint(3, 128, (n,), generator=gen), 1
    merge_count = 8
    streaming, streaming_logits = forward(model, get_press("streaming_llm", budget=0.5), ids, mask, steps=1)
    before, _ = forward(model, get_press("streaming_llm", budget=0.5), ids, mask, steps=0)
    cam_press = get_press("cam", budget=0.5, merge_count=merge_count)

    def set_attention(cache):
        set_leaving_attention(cache, 1e3 if likely else -1.0)

    cam, cam_logits = forward(model, cam_press, ids, mask, steps=1, after_prefill=set_attention)
    for ours, theirs in zip(cam_logits, streaming_logits, strict=True):  # the merge follows the step's attention
        torch.testing.assert_close(ours, theirs)  # (CAM asks the kernel for weights: other rounding)
    merges = 0
    for layer_idx, (cam_layer, plain_layer) in enumerate(zip(cam.layers, streaming.layers, strict=True)):
        prefill_rows = stored(before.layers[layer_idx])
        for row, (merged_row, plain_row) in enumerate(zip(stored(cam_layer), stored(plain_layer), strict=True)):
            assert merged_row.keys() == plain_row.keys(), f"layer {layer_idx} row {row}: different columns kept"
            (leaving,) = prefill_rows[row].keys() - plain_row.keys()
            share = prefill_rows[row][leaving] / merge_count
            targets = {c for c in plain_row if leaving < c <= leaving + merge_count}
            assert len(targets) == merge_count
            changed = {c for c in plain_row if not torch.allclose(merged_row[c], plain_row[c], atol=1e-6)}
            if changed:
                merges += 1
                assert changed == targets
                for column in targets:
                    torch.testing.assert_close(merged_row[column], plain_row[column] + share)
    assert merges == (sum(layer.rows.num_rows for layer in cam.layers) if likely else 0)


def test_a_run_repeats_and_keeps_the_sinks_and_the_budget(model, prompt):
    mask = torch.ones_like(prompt)
    first, _ = forward(model, get_press("cam", budget=0.5), prompt, mask, steps=6)
    again, _ = forward(model, get_press("cam", budget=0.5), prompt, mask, steps=6)
    values = [torch.cat([layer.rows.padded()["values"].flatten() for layer in c.layers]) for c in (first, again)]
    assert torch.equal(values[0], values[1])  # the draws come from the seed
    # the sinks never leave, and the rows stay at their budget
    for layer in first.layers:
        columns = [sorted(head) for row in layer.kept_columns() for head in row]
        assert all(c[:4] == [0, 1, 2, 3] and len(c) == 24 and c[4:] == list(range(34, 54)) for c in columns)


def test_the_seed_decides_the_draws_when_merging_is_uncertain(model, prompt):
    """A tiny random model attends almost uniformly (probabilities near 1): the leaving tokens' attention is lowered
    to about half their windows' so that the draws decide."""

    def halve(cache):
        set_leaving_attention(cache, -1 / 48)

    mask = torch.ones_like(prompt)
    runs = [forward(model, get_press("cam", budget=0.5, seed=s), prompt, mask, 1, halve)[0] for s in (0, 1, 0)]
    values = [torch.cat([layer.rows.padded()["values"].flatten() for layer in c.layers]) for c in runs]
    assert not torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="evict_every"):
        get_press("cam", budget=0.5, evict_every=0)
    with pytest.raises(ValueError, match="merge_count"):
        get_press("cam", budget=0.5, merge_count=0)
