from __future__ import annotations

import random

import numpy as np
import pytest

from macft.data.batching import BatchPlan, collate, eval_batches, padding_share
from macft.data.dataset import Example
from macft.errors import Location


def make_examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        L = rng.randint(5, 120)
        ids = np.arange(1, L + 1, dtype=np.int32) + 1000 * i
        mask = np.zeros(L, np.uint8)
        mask[L // 2:] = 1
        out.append(Example(ids, mask, Location("f", i + 1)))
    return out


def test_every_example_once_per_epoch_and_deterministic():
    ex = make_examples(203)
    a = BatchPlan(ex, 4, seed=1, pad_id=0)
    b = BatchPlan(ex, 4, seed=1, pad_id=0)
    for epoch in (0, 1):
        rows = a.rows_for_epoch(epoch)
        flat = sorted(i for batch in rows for row in batch for i in row)
        assert flat == list(range(203))
        assert rows == b.rows_for_epoch(epoch)
    assert a.rows_for_epoch(0) != a.rows_for_epoch(1)  # reshuffled per epoch
    assert BatchPlan(ex, 4, seed=2, pad_id=0).rows_for_epoch(0) != a.rows_for_epoch(0)


def test_length_grouping_removes_most_padding():
    ex = make_examples(400)
    grouped = BatchPlan(ex, 8, seed=0, pad_id=0)
    g = [grouped.batch(0, i) for i in range(grouped.batches_per_epoch())]
    rng = random.Random(0)
    order = list(range(len(ex)))
    rng.shuffle(order)
    naive = [collate([[ex[j]] for j in order[k:k + 8]], 0, False) for k in range(0, len(ex), 8)]
    assert padding_share(g) < padding_share(naive) / 3  # measured 14% vs 46%


def test_collate_conventions():
    ex = make_examples(3)
    b = collate([[e] for e in ex], pad_id=7, packed=False)
    assert b.input_ids.shape[1] % 8 == 0
    for i, e in enumerate(ex):
        L = len(e)
        assert (b.input_ids[i, :L] == e.ids).all() and (b.input_ids[i, L:] == 7).all()
        assert (b.segment_ids[i, :L] == 1).all() and (b.segment_ids[i, L:] == 0).all()
        assert b.loss_mask[i, L:].sum() == 0 and b.loss_mask[i, 0] == 0
        assert (b.position_ids[i, :L] == np.arange(L)).all()
    assert b.n_trained == sum(int(e.mask[1:].sum()) for e in ex)


def test_packing_lays_out_the_same_batches_without_padding():
    ex = make_examples(101)
    plan = BatchPlan(ex, 4, seed=0, pad_id=0, packing=True, max_seq_len=256)
    batches = plan.rows_for_epoch(0)
    assert [sum(len(r) for r in b) for b in batches] == [4] * 25 + [1]  # batch_size examples each
    assert sorted(i for b in batches for r in b for i in r) == list(range(101))
    assert all(sum(len(ex[i]) for i in r) <= 256 for b in batches for r in b)
    assert sum(len(b) for b in batches) < 101  # several examples share a row
    b = plan.batch(0, 0)
    assert b.packed and b.n_examples == 4
    row = b.segment_ids[0]
    for s in range(1, row.max() + 1):
        pos = np.nonzero(row == s)[0]
        assert (b.position_ids[0, pos] == np.arange(len(pos))).all()  # positions restart
        assert b.loss_mask[0, pos[0]] == 0  # no target predicted across examples
    packed = [plan.batch(0, i) for i in range(plan.batches_per_epoch())]
    grouped = BatchPlan(ex, 4, seed=0, pad_id=0)
    assert padding_share(packed) < 0.1
    # packing keeps random (not length-sorted) batches: lengths inside a batch vary
    spread = [max(len(ex[i]) for r in bb for i in r) - min(len(ex[i]) for r in bb for i in r)
              for bb in batches[:-1]]
    spread_g = [max(len(ex[r[0]]) for r in bb) - min(len(ex[r[0]]) for r in bb)
                for bb in grouped.rows_for_epoch(0)[:-1]]
    assert np.mean(spread) > 3 * np.mean(spread_g)


def test_iterate_resumes_at_a_position():
    ex = make_examples(30)
    plan = BatchPlan(ex, 4, seed=0, pad_id=0)
    stream = plan.iterate()
    seen = [next(stream)[:2] for _ in range(12)]
    assert seen[:8] == [(0, i) for i in range(8)] and seen[8:] == [(1, i) for i in range(4)]
    again = plan.iterate(1, 2)
    e, i, b = next(again)
    assert (e, i) == (1, 2)
    assert (b.input_ids == plan.batch(1, 2).input_ids).all()


def test_eval_batches_are_fixed():
    ex = make_examples(21)
    a = eval_batches(ex, 4, 0)
    b = eval_batches(ex, 4, 0)
    assert len(a) == 6 and all((x.input_ids == y.input_ids).all() for x, y in zip(a, b))


@pytest.mark.slow
def test_mlx_packed_batch_gives_the_same_losses_as_unpacked(tiny_gemma, nya_dir):
    """No attention across packed examples: same summed loss as the padded batch."""
    import mlx.core as mx

    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer
    from macft.mlx_backend.engine import token_losses
    from macft.mlx_backend.model import load

    tok = load_tokenizer(str(tiny_gemma))
    data = build_data(str(nya_dir / "valid.jsonl"), None, Renderer(tok), max_seq_len=256, valid_fraction=0)
    exs = data.train[:6]
    lm = load(tiny_gemma, mx.float32)
    padded = collate([[e] for e in exs], 0, False)
    packed = collate([exs[:3], exs[3:]], 0, True)
    l1, n1 = token_losses(lm, mx.array(padded.input_ids), mx.array(padded.loss_mask))
    l2, n2 = token_losses(lm, mx.array(packed.input_ids), mx.array(packed.loss_mask), mx.array(packed.segment_ids))
    l3, _ = token_losses(lm, mx.array(packed.input_ids), mx.array(packed.loss_mask))
    assert int(n1.item()) == int(n2.item())
    assert abs(l1.item() - l2.item()) < 1e-3 * abs(l1.item())
    assert abs(l1.item() - l3.item()) > 1e-2 * abs(l1.item())  # without the mask they would differ


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_rehearsal_hits_the_requested_ratio_over_an_epoch(ratio):
    task, pool = make_examples(240, seed=1), make_examples(50, seed=2)
    plan = BatchPlan(task, 4, seed=0, pad_id=0, rehearsal=pool, rehearsal_ratio=ratio)
    for epoch in range(3):
        idx = [i for b in plan.rows_for_epoch(epoch) for r in b for i in r]
        n_reh = sum(i >= 240 for i in idx)
        assert sorted(i for i in idx if i < 240) == list(range(240))  # every task example once
        assert abs(n_reh / len(idx) - ratio) <= 1 / len(idx), (epoch, n_reh, len(idx))
        if ratio == 0.2:  # 60 picks from a pool of 50: all used, 10 twice
            assert len(set(i for i in idx if i >= 240)) == 50
    assert plan.rehearsal_picks(0) != plan.rehearsal_picks(1)


def test_random_order_batches_mix_lengths_and_keep_every_example():
    """group_by_length off (the training default): batches are consecutive slices of the shuffled
    order, so a batch's lengths are as mixed as the data's; still every example once per epoch
    and deterministic for a seed."""
    ex = make_examples(400)
    rand = BatchPlan(ex, 8, seed=0, pad_id=0, group_by_length=False)
    grouped = BatchPlan(ex, 8, seed=0, pad_id=0)
    rows = rand.rows_for_epoch(0)
    assert sorted(i for b in rows for r in b for i in r) == list(range(400))
    assert rows == BatchPlan(ex, 8, seed=0, pad_id=0, group_by_length=False).rows_for_epoch(0)

    def spread(plan: BatchPlan) -> float:  # mean (longest - shortest) inside a batch
        out = []
        for b in plan.rows_for_epoch(0):
            lens = [len(ex[r[0]]) for r in b]
            out.append(max(lens) - min(lens))
        return float(np.mean(out))

    assert spread(rand) > 3 * spread(grouped)
    pad_r = padding_share([rand.batch(0, i) for i in range(rand.batches_per_epoch())])
    pad_g = padding_share([grouped.batch(0, i) for i in range(grouped.batches_per_epoch())])
    assert pad_r > pad_g
