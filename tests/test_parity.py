"""Both backends see the same tokens, masks and weights: same initial loss on the same batch."""

from __future__ import annotations

import pytest

pytest.importorskip("mlx_lm")
pytest.importorskip("peft")


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_initial_loss_equal_in_mlx_and_torch(tiny_gemma, nya_dir, packing):
    import mlx.core as mx
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cuda_backend.engine import batch_loss
    from macft.data.batching import BatchPlan
    from macft.data.dataset import build_data
    from macft.data.render import Renderer
    from macft.data.tokenizer import load_tokenizer
    from macft.mlx_backend.engine import token_losses
    from macft.mlx_backend.model import add_lora, load

    tok = load_tokenizer(str(tiny_gemma))
    data = build_data(str(nya_dir), None, Renderer(tok), max_seq_len=512)
    plan = BatchPlan(data.train, 8, seed=0, pad_id=tok.pad_token_id, packing=packing, max_seq_len=512)
    batch = plan.batch(0, 0)
    assert batch.packed == packing

    lm = load(tiny_gemma, mx.float32)
    mx.random.seed(0)
    add_lora(lm, 16, 32.0, 0.0, ["all-linear"], -1)  # B = 0: the base model
    lm.model.eval()
    ids, mask = mx.array(batch.input_ids), mx.array(batch.loss_mask)
    s, n = token_losses(lm, ids, mask, mx.array(batch.segment_ids) if packing else None)
    mlx_loss = s.item() / n.item()

    base = AutoModelForCausalLM.from_pretrained(str(tiny_gemma), dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)).eval()
    with torch.no_grad():
        ts, tn = batch_loss(pm, batch, torch.device("cpu"))
    torch_loss = float(ts) / tn
    assert int(n.item()) == tn == batch.n_trained
    assert abs(mlx_loss - torch_loss) < 1e-3, (mlx_loss, torch_loss)
