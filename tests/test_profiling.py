"""DispatchCounter: every aten call counted (views included), and each way of making the host wait counted as a sync."""

import numpy as np
import pytest
import torch

from modalkv.profiling import DispatchCounter

t = torch.arange(6.0).reshape(2, 3)
mask = t > 2


def counted(fn, **options) -> DispatchCounter:
    with DispatchCounter(**options) as counter:
        fn()
    return counter


def test_counts_every_aten_call_views_included():
    counter = counted(lambda: (t.view(3, 2).t() * 2 + 1).softmax(-1)[0].sum())
    assert counter.ops == {
        "aten.view": 1,
        "aten.t": 1,
        "aten.mul": 1,
        "aten.add": 1,
        "aten._softmax": 1,
        "aten.select": 1,
        "aten.sum": 1,
    }
    assert counter.total_ops == 7 and counter.total_syncs == 0 and not counter.sync_sites
    assert counter.top_ops(1) == [("aten.view", 1)]  # ties keep first-seen order


def test_composite_ops_count_as_what_they_decompose_into():
    assert counted(lambda: t @ t.T).ops == {"aten.permute": 1, "aten.mm": 1}
    assert counted(lambda: t.repeat_interleave(2, dim=0)).total_syncs == 0  # an int repeat: shape known on the host


@pytest.mark.parametrize(
    ("name", "fn", "kind"),
    [
        ("item", lambda: t.sum().item(), "aten._local_scalar_dense"),
        ("bool", lambda: bool(t[0, 0]), "aten._local_scalar_dense"),
        ("int", lambda: int(t[0, 0]), "aten._local_scalar_dense"),
        ("float", lambda: float(t[0, 0]), "aten._local_scalar_dense"),
        ("index", lambda: [1, 2, 3][torch.tensor(1)], "aten._local_scalar_dense"),
        ("tolist", lambda: t.tolist(), "Tensor.tolist"),
        ("cpu", lambda: t.cpu(), "Tensor.cpu"),
        ("to cpu", lambda: t.to("cpu"), "Tensor.to(cpu)"),
        ("numpy", lambda: np.asarray(t), "Tensor.__array__"),
        ("mask", lambda: t[mask], "aten.index(mask)"),
        ("masked write", lambda: t.clone().__setitem__(mask, 0.0), "aten.index_put_(mask)"),
        ("where", lambda: torch.where(mask), "aten.nonzero"),
        ("masked_select", lambda: t.masked_select(mask), "aten.masked_select"),
        ("unique", lambda: torch.unique(t), "aten._unique2"),
        ("repeat_interleave", lambda: t.repeat_interleave(torch.tensor([1, 2]), dim=0), "aten.repeat_interleave"),
    ],
)
def test_each_host_wait_is_one_sync(name, fn, kind):
    counter = counted(fn)
    assert counter.syncs == {kind: 1}, name
    [(site_kind, site)] = counter.sync_sites
    assert site_kind == kind and "test_profiling.py" in site  # the caller, not torch's internals
    assert "test_profiling.py" in counter.first_sync_stack[kind][0]


def test_what_the_dispatcher_never_sees_needs_the_function_mode():
    assert counted(lambda: t.tolist()).total_ops == 0  # a CPU tensor's tolist() dispatches nothing
    assert counted(lambda: t.tolist(), python_syncs=False).total_syncs == 0
    # item() reaches the dispatcher: counted once, the site naming the Python call
    counter = counted(lambda: t.sum().item(), python_syncs=False)
    assert counter.syncs == {"aten._local_scalar_dense": 1}
    [(_, site)] = counted(lambda: t.sum().item()).sync_sites
    assert site.endswith("[Tensor.item]")


def test_known_output_sizes_are_no_syncs():
    counter = counted(lambda: t.repeat_interleave(torch.tensor([1, 2]), dim=0, output_size=3))
    assert counter.total_syncs == 0 and counter.ops["aten.repeat_interleave"] == 1
    assert counted(lambda: t[torch.tensor([1, 0])]).total_syncs == 0  # an integer index: no mask to expand
    assert counted(lambda: t.masked_fill(mask, 0.0).argmax(-1)).total_syncs == 0
    assert counted(lambda: t.to(t.device)).total_syncs == 0  # device-agnostic: on a GPU run no move to the host


def test_counts_accumulate_over_blocks_until_reset():
    counter = DispatchCounter()
    with counter:
        t.sum().item()
    with counter:
        t.tolist()
    assert counter.total_ops == 2 and counter.syncs == {"aten._local_scalar_dense": 1, "Tensor.tolist": 1}
    report = counter.report()
    assert "2 ops, 2 syncs" in report and "sync Tensor.tolist: 1" in report and "test_profiling.py" in report
    counter.reset()
    assert counter.total_ops == 0 and counter.total_syncs == 0 and not counter.first_sync_stack
