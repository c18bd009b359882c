"""The MLX loss without full-vocabulary logits (macft.mlx_backend.loss) against the plain
computation: same loss and gradients to fp32 tolerance, bounded memory, and training in
bf16 (Metal's precision; correct but slow on this CPU, so the models here are tiny)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from macft.mlx_backend.loss import (  # noqa: E402
    ROW_BUCKET,
    ce_kl_with_grad,
    ce_sum,
    ce_sum_with_grad,
    full_logits_split,
    gather_plan,
    kl_sum,
    split_agrees,
    split_model,
)
from macft.training.chunking import chunk_rows  # noqa: E402

NYA = Path(__file__).resolve().parents[1] / "examples" / "data" / "nya_chat"


def _close(a, b, rtol=1e-5):
    a, b = np.array(a), np.array(b)
    return np.abs(a - b).max() <= rtol * max(1.0, np.abs(b).max())


def _plain_ce(head, h, t, w):
    return (nn.losses.cross_entropy(head(h).astype(mx.float32), t) * w).sum()


def _plain_kl(head, h, hb, w, temp):
    lp = nn.log_softmax(head(h).astype(mx.float32) / temp, axis=-1)
    lq = nn.log_softmax(head(hb).astype(mx.float32) / temp, axis=-1)
    return ((mx.exp(lp) * (lp - lq)).sum(-1) * w).sum() * temp * temp


def _heads(vocab: int, dim: int):
    """A plain, a 4-bit quantized and a tied-embedding output layer."""
    mx.random.seed(1)
    lin = nn.Linear(dim, vocab, bias=False)
    emb = nn.Embedding(vocab, dim)
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)
    return {"linear": lin, "quantized": q, "tied": emb.as_linear}


@pytest.mark.parametrize("kind", ["linear", "quantized", "tied"])
@pytest.mark.parametrize("rows", [7, 64, 10_000])  # several chunks with a partial last one; one chunk
def test_chunked_cross_entropy_matches_the_plain_loss_and_gradient(kind, rows):
    head = _heads(1000, 64)[kind]
    mx.random.seed(0)
    h = mx.random.normal((300, 64))
    t = mx.random.randint(0, 1000, (300,))
    w = mx.random.uniform(shape=(300,)) * (mx.arange(300) % 5 != 0)  # weights, some zero
    ref, g_ref = mx.value_and_grad(lambda x: 3.0 * _plain_ce(head, x, t, w))(h)
    got, g_got = mx.value_and_grad(lambda x: 3.0 * ce_sum_with_grad(head, x, t, w, rows))(h)
    assert _close(got, ref) and _close(g_got, g_ref)
    assert _close(ce_sum(head, h, t, w, rows), ref / 3.0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_lwf_kl_matches_the_plain_loss_and_gradient(temperature):
    head = _heads(1000, 64)["linear"]
    mx.random.seed(2)
    h, hb = mx.random.normal((200, 64)), mx.random.normal((200, 64))
    t = mx.random.randint(0, 1000, (200,))
    w_ce = (mx.random.uniform(shape=(200,)) > 0.5).astype(mx.float32)
    w_kl = (mx.arange(200) < 190).astype(mx.float32)  # the last rows are padding

    def plain(x):
        ce, kl = _plain_ce(head, x, t, w_ce), _plain_kl(head, x, hb, w_kl, temperature)
        return 0.7 * ce + 1.9 * kl, (ce, kl)

    def ours(x):
        ce, kl = ce_kl_with_grad(head, x, hb, t, w_ce, w_kl, temperature, 13)
        return 0.7 * ce + 1.9 * kl, (ce, kl)

    (ref, (ce1, kl1)), g_ref = mx.value_and_grad(plain)(h)
    (got, (ce2, kl2)), g_got = mx.value_and_grad(ours)(h)
    assert _close(got, ref) and _close(ce2, ce1) and _close(kl2, kl1) and _close(g_got, g_ref)
    assert _close(kl_sum(head, h, hb, w_kl, temperature, 13), kl1)


def test_chunks_bound_the_logits_held_at_once():
    """Gemma-3's vocabulary: the plain loss and gradient hold several [N, V] fp32 tensors;
    the chunked one a few chunks' worth (MLX's own peak counter). MLX runs ahead while memory
    is plentiful, so this runs under a memory limit, as training does (macft sets it to the
    budget): the plain loss cannot keep to it, the chunked one does."""
    vocab, dim, n = 262_144, 64, 512
    assert chunk_rows(vocab) == 64 and chunk_rows(100) == (1 << 24) // 100 and chunk_rows(1 << 30) == 1
    head = nn.Linear(dim, vocab, bias=False)
    h = mx.random.normal((n, dim))
    t = mx.random.randint(0, vocab, (n,))
    w = mx.ones((n,))
    mx.eval(head.parameters(), h, t, w)
    full = n * vocab * 4

    def peak(fn):
        mx.eval(mx.zeros(1))
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        loss, g = mx.value_and_grad(fn)(h)
        mx.eval(loss, g)
        return mx.get_peak_memory() - before

    old = mx.set_memory_limit(full // 2)
    try:
        chunked = peak(lambda x: ce_sum_with_grad(head, x, t, w, chunk_rows(vocab)))
        plain = peak(lambda x: _plain_ce(head, x, t, w))
    finally:
        mx.set_memory_limit(old)
    assert plain > 2 * full  # the reference really holds the logits
    assert chunked < full / 2, (chunked / 2**20, full / 2**20)


def test_gather_plan_selects_trained_or_real_positions():
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0.5, 0, 0]], np.float32)
    seg = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 2, 2]], np.int32)
    p = gather_plan(mask, seg, every_real=False)
    assert len(p["idx"]) == ROW_BUCKET
    assert list(p["idx"][:4]) == [1, 2, 4, 5] and list(p["w_ce"][:4]) == [1, 1, 1, 0.5]
    assert p["w_ce"][4:].sum() == 0 and p["w_kl"].sum() == 4
    r = gather_plan(mask, seg, every_real=True)
    assert list(r["idx"][:7]) == [0, 1, 2, 4, 5, 6, 7]  # [B, T-1]: row 0 has a padding slot
    assert list(r["w_ce"][:7]) == [0, 1, 1, 1, 0.5, 0, 0] and r["w_kl"].sum() == 7
    big = gather_plan(np.ones((2, 40), np.float32), np.ones((2, 40), np.int32), every_real=False)
    assert len(big["idx"]) == 3 * ROW_BUCKET  # 78 rows -> 96


# --------------------------------------------------------------------------- the engine


def _micro_gemma(root: Path, dtype: str = "float32") -> Path:
    from macft.tiny import TinySize, build_tiny_gemma3, corpus_from_jsonl

    size = TinySize(hidden=64, layers=6, heads=2, kv_heads=1, head_dim=32, intermediate=128, vocab=512)
    return build_tiny_gemma3(root, corpus_from_jsonl([NYA / "train.jsonl"]), size, dtype=dtype)


@pytest.fixture(scope="module")
def micro_gemma(tmp_path_factory) -> Path:
    return _micro_gemma(tmp_path_factory.mktemp("micro-gemma3"))


def _batches(model: Path, n: int, packing: bool, size: int = 4):
    from macft.data.batching import BatchPlan
    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model))
    data = build_data(str(NYA / "train.jsonl"), None, Renderer(tok), max_seq_len=256, valid_fraction=0)
    plan = BatchPlan(data.train[:24], size, seed=0, pad_id=tok.pad_token_id, packing=packing, max_seq_len=256)
    return [plan.batch(0, i) for i in range(n)]


def _engine(model: Path, dtype, *, packing=False, distill=0.0, bits=None):
    from macft.mlx_backend.engine import MLXEngine
    from macft.mlx_backend.model import adapter_spec, add_lora, load, quantize

    lm = load(model, dtype)
    if bits:
        quantize(lm, bits)
    mx.random.seed(0)
    add_lora(lm, 4, 8.0, 0.0, ["all-linear"], -1)
    for name in lm.lora_modules:  # B != 0, so the adapter changes the logits (and the KL is not 0)
        mod = lm.model
        for part in name.split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
        mod.lora_b = mx.random.normal(mod.lora_b.shape).astype(mod.lora_b.dtype) * 0.05
    spec = adapter_spec(lm, str(model), 4, 8.0, 0.0)
    return MLXEngine(lm, spec, weight_decay=0.0, packing=packing, device="cpu", seed=0,
                     distill_weight=distill, distill_temperature=2.0)


def _plain_objective(engine, ids, mask, seg):
    """Today's computation before this change: full logits at every position."""
    from contextlib import nullcontext

    from macft.mlx_backend.packing import packed_attention

    def fn(model, ids, mask, seg):
        with packed_attention(engine._mask_modules, seg[:, :-1]) if engine.packing else nullcontext():
            logits = model(ids[:, :-1]).astype(mx.float32)
            m = mask[:, 1:]
            ce = (nn.losses.cross_entropy(logits, ids[:, 1:]) * m).sum()
            if engine.distill_weight == 0:
                return ce
            scales = [x.scale for x in engine._lora_layers]
            for x in engine._lora_layers:
                x.scale = 0.0
            base = mx.stop_gradient(model(ids[:, :-1])).astype(mx.float32)
            for x, s in zip(engine._lora_layers, scales):
                x.scale = s
        real = (seg[:, 1:] > 0).astype(mx.float32)
        t = engine.distill_temperature
        lp, lq = nn.log_softmax(logits / t, axis=-1), nn.log_softmax(base / t, axis=-1)
        kl = ((mx.exp(lp) * (lp - lq)).sum(-1) * real).sum() * t * t
        return ce + engine.distill_weight * kl * (m.sum() / real.sum())

    return nn.value_and_grad(engine.model, fn)(engine.model, ids, mask, seg)


@pytest.mark.parametrize("packing,distill", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)])
def test_engine_gradients_equal_the_full_logits_computation(micro_gemma, packing, distill):
    """One compiled training micro-batch: CE (and LwF KL) and every LoRA gradient equal the
    plain full-logits loss to fp32 tolerance, padded and packed."""
    from mlx.utils import tree_flatten

    engine = _engine(micro_gemma, mx.float32, packing=packing, distill=distill)
    assert engine.split_note is None and engine.split.head is not None
    batch = _batches(micro_gemma, 1, packing)[0]
    engine.model.train()
    ce, n, kl, grads = engine._grad_step(*engine._arrays(batch, True))
    ids, mask, seg = mx.array(batch.input_ids), mx.array(batch.loss_mask), mx.array(batch.segment_ids)
    ref, ref_grads = _plain_objective(engine, ids, mask, seg)
    assert int(n.item()) == batch.n_trained
    objective = ce + distill * kl * (n / float((batch.segment_ids[:, 1:] > 0).sum()))
    assert _close(objective, ref)
    ours, theirs = dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))
    assert ours.keys() == theirs.keys() and len(ours) > 0
    for k in ours:
        assert _close(ours[k], theirs[k], rtol=2e-5), k
    ev, en = engine.eval_batch(batch)
    assert en == batch.n_trained and abs(ev - float(ce.item())) <= 1e-5 * abs(ev)


def test_architecture_without_a_separable_head_falls_back_to_full_logits(micro_gemma):
    """A head that is not the model's own output (here: logits scaled after it, as a
    soft-capping model would) fails the start-up check; the loss then uses full logits."""
    from macft.mlx_backend.engine import loss_split, token_losses
    from macft.mlx_backend.model import load

    lm = load(micro_gemma, mx.float32)
    split = split_model(lm.model, lm.arch.backbone, lm.arch.heads)
    assert split is not None and split_agrees(lm.model, split, lm.info.vocab_size)
    wrong = split_model(lm.model, lm.arch.backbone, lm.arch.heads)
    base_head = wrong.head
    wrong.head = lambda x: 30.0 * mx.tanh(base_head(x) / 30.0)
    assert not split_agrees(lm.model, wrong, lm.info.vocab_size)
    assert split_model(lm.model, "nowhere", ("lm_head",)) is None
    batch = _batches(micro_gemma, 1, False)[0]
    ids, mask = mx.array(batch.input_ids), mx.array(batch.loss_mask)
    a, n = token_losses(lm, ids, mask)
    b, _ = token_losses(lm, ids, mask, split=full_logits_split(lm.model))
    plain = (nn.losses.cross_entropy(lm.model(ids[:, :-1]).astype(mx.float32), ids[:, 1:]) * mask[:, 1:]).sum()
    assert _close(a, plain) and _close(b, plain) and int(n.item()) == batch.n_trained
    assert loss_split(lm)[1] is None


@pytest.mark.parametrize("bits", [None, 4])
def test_training_in_bf16_gives_finite_decreasing_loss_and_a_loadable_adapter(tmp_path_factory, bits):
    """Metal trains in bf16 (and 4-bit QLoRA with bf16 compute): the same engine on the CPU,
    a few steps on one repeated batch of a tiny model."""
    from macft.adapter import read_peft_adapter
    from macft.mlx_backend.infer import MLXChatModel

    model = _micro_gemma(tmp_path_factory.mktemp("micro-bf16"), dtype="bfloat16")
    engine = _engine(model, mx.bfloat16, bits=bits)
    assert engine.model.model.layers[0].mlp.down_proj.linear.weight.dtype == (mx.uint32 if bits else mx.bfloat16)
    batch = _batches(model, 1, False, size=2)[0]
    losses = []
    for _ in range(6):
        loss, n = engine.train_micro(batch)
        losses.append(loss / n)
        engine.optimizer_step(1e-2, n, 1.0)
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] - 0.1, losses
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    engine.save_adapter(out)
    modules, cfg = read_peft_adapter(out)
    assert cfg["r"] == 4 and all(np.isfinite(b).all() and np.abs(b).max() > 0 for _, b in modules.values())
    chat = MLXChatModel(model, out, ["<end_of_turn>"], precision="bf16")
    s, k = chat.loss(batch)
    assert np.isfinite(s) and k == batch.n_trained
