"""The PyTorch loss without full-vocabulary logits (cuda_backend/loss.py and its use in the
engine): the chunked CE and LwF KL and their gradients equal the plain full-logits math;
backbone + head equals the model's own forward on every published layout of
tests/checkpoints; the one-time check falls back to the model's logits when they differ;
no tensor the size of [tokens, vocab] is made; bf16 autocast and 4-bit QLoRA train on the CPU.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
F = torch.nn.functional
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # peft
              pytest.mark.usefixtures("one_torch_thread")]




# --------------------------------------------------------------------------- the function itself


def _reference(hidden, weight, bias, softcap, targets, w, base=None, kl_w=None, t=1.0):
    """Per-token CE (and KL) through the full [N, V] fp32 logits, as the engine used to."""
    def logits(h):
        z = h @ weight.T + (bias if bias is not None else 0.0)
        return torch.tanh(z / softcap) * softcap if softcap is not None else z

    z = logits(hidden)
    ce = F.cross_entropy(z, targets, reduction="none") * w
    if base is None:
        return ce, None
    lp, lq = F.log_softmax(z / t, -1), F.log_softmax(logits(base) / t, -1)
    return ce, (lp.exp() * (lp - lq)).sum(-1) * kl_w * t * t


def _problem(n=37, h=16, v=101, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen) * 0.7
    bias = torch.randn(v, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    w = torch.rand(n, generator=gen) * 2  # weights not all 1 (and some near 0)
    w[::5] = 0.0
    upstream = torch.rand(n, generator=gen) + 0.5  # a non-uniform d(objective)/d(loss_i)
    return hidden, weight, bias, targets, w, upstream


def test_chunk_planning():
    """The rule shared with MLX and the memory estimate: at most 2^24 logits per chunk."""
    import inspect

    from cuda_backend.loss import head_losses
    from macft.training.chunking import CHUNK_LOGITS, chunk_rows

    assert CHUNK_LOGITS == 2 ** 24 == inspect.signature(head_losses).parameters["budget"].default
    assert chunk_rows(262_144) == 64  # Gemma-3: 64 tokens x 262,144 = 2^24 logits
    assert chunk_rows(151_936) == 110 and 110 * 151_936 <= CHUNK_LOGITS < 111 * 151_936
    assert chunk_rows(65_536, 2 ** 20) == 16
    assert chunk_rows(101, 505) == 5
    assert chunk_rows(10 ** 9) == 1  # never zero


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_chunked_ce_and_its_gradient_equal_full_logits(softcap, with_bias):
    """37 tokens in chunks of 5 (the last one partial), weights not all 1."""
    from cuda_backend.loss import Head, head_losses

    hidden, weight, bias, targets, w, up = _problem()
    bias = bias if with_bias else None
    ce, kl = head_losses(hidden, Head(weight, bias, softcap), targets, w, budget=5 * 101)
    (g,) = torch.autograd.grad((ce * up).sum(), hidden)
    ref, _ = _reference(hidden, weight, bias, softcap, targets, w)
    (g_ref,) = torch.autograd.grad((ref * up).sum(), hidden)
    assert kl is None and ce.dtype == torch.float32
    _assert_near(ce, ref)
    _assert_near(g, g_ref)
    assert float(g[::5].abs().max()) == 0.0 and float(g.abs().max()) > 1e-2  # weight 0: no gradient


@pytest.mark.parametrize("softcap", [None, 2.0], ids=["plain", "softcap"])
def test_lwf_kl_and_its_gradient_equal_full_logits(softcap):
    from cuda_backend.loss import Head, head_losses

    hidden, weight, bias, targets, w, up = _problem()
    gen = torch.Generator().manual_seed(1)
    base = hidden.detach() + 0.5 * torch.randn(hidden.shape, generator=gen)
    kl_w = (torch.arange(37) % 4 != 0).float()  # "real" positions
    ce, kl = head_losses(hidden, Head(weight, bias, softcap), targets, w, base, kl_w, temperature=2.0,
                         budget=5 * 101)
    (g,) = torch.autograd.grad(ce.sum() + 0.3 * (kl * up).sum(), hidden)
    ref_ce, ref_kl = _reference(hidden, weight, bias, softcap, targets, w, base, kl_w, t=2.0)
    (g_ref,) = torch.autograd.grad(ref_ce.sum() + 0.3 * (ref_kl * up).sum(), hidden)
    _assert_near(ce, ref_ce)
    _assert_near(kl, ref_kl)
    _assert_near(g, g_ref)
    assert float(kl.detach().min()) >= 0 and float(kl.detach().max()) > 1e-2


def test_no_gradient_work_without_autograd_and_a_trained_head_is_refused():
    from cuda_backend.loss import Head, head_losses

    hidden, weight, bias, targets, w, _ = _problem()
    with torch.no_grad():
        ce, _ = head_losses(hidden, Head(weight, None, None), targets, w, budget=505)
    assert ce.grad_fn is None
    with pytest.raises(ValueError, match="output head"):
        head_losses(hidden, Head(weight.requires_grad_(), None, None), targets, w)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements of any tensor an operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_tokens_by_vocab_is_made():
    """V = 65,536 and N = 2,048 with a budget of 2^20 logits: every tensor made in forward and
    backward (CE and KL) stays within the budget; [N, V] would be 128x over it."""
    from cuda_backend.loss import Head, head_losses

    n, h, v, budget = 2048, 8, 65_536, 2 ** 20
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, requires_grad=True)
    head = Head(torch.randn(v, h, generator=gen) * 0.3, None, 5.0)
    targets = torch.randint(0, v, (n,), generator=gen)
    spy = _LargestTensor()
    with spy:
        ce, kl = head_losses(hidden, head, targets, torch.ones(n), hidden.detach() * 0.9, torch.ones(n),
                             temperature=2.0, budget=budget)
        (ce.sum() + kl.sum()).backward()
    assert 0 < spy.largest <= budget < n * v, spy.largest
    assert torch.isfinite(hidden.grad).all() and float(hidden.grad.abs().max()) > 0


# --------------------------------------------------------------------------- models

SEQ_LENGTHS = (9, 14, 5, 11)


def _examples(vocab: int, seed: int = 0) -> list[Any]:
    from macft.data.dataset import Example

    rng = np.random.default_rng(seed)
    return [Example(ids=rng.integers(5, min(vocab, 5000), n).astype(np.int32),
                    mask=(np.arange(n) >= n // 3).astype(np.uint8), where="x") for n in SEQ_LENGTHS]


def _batches(vocab: int) -> dict[str, Any]:
    from macft.data.batching import collate

    ex = _examples(vocab)
    return {"padded": collate([[e] for e in ex], pad_id=0, packed=False),
            "packed": collate([ex[:2], ex[2:]], pad_id=0, packed=True)}


def _reference_token_losses(model: Any, batch: Any) -> Any:
    """[B, T-1] losses from the model's own forward (full logits) and F.cross_entropy."""
    from cuda_backend.engine import batch_inputs

    inputs = batch_inputs(batch, "cpu")
    logits = model(**inputs).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), inputs["input_ids"][:, 1:], reduction="none")
    return ce * torch.from_numpy(batch.loss_mask[:, 1:])


def _ours_and_reference(model, batch):
    """(token_losses, their LoRA gradients, the model-logits reference, its gradients)."""
    from cuda_backend.engine import token_losses

    model.zero_grad()
    ours = token_losses(model, batch, "cpu")
    ours.sum().backward()
    g = _lora_grads(model)
    model.zero_grad()
    ref = _reference_token_losses(model, batch)
    ref.sum().backward()
    return ours, g, ref, _lora_grads(model)


def _with_lora(model: Any, seed: int = 0) -> Any:
    """LoRA on every linear layer of the decoder, with B non-zero (so the adapter matters)."""
    from peft import LoraConfig, get_peft_model

    from cuda_backend.model import resolve_targets

    targets = resolve_targets(model, ["all-linear"], -1)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets.modules,
                                          fan_in_fan_out=targets.conv1d))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return pm.eval()


def _assert_near(a: Any, b: Any, rel: float = 1e-5, what: str = "") -> None:
    """Every entry within ``rel`` x the largest magnitude of ``b`` (fp32 sums in another order
    differ by a few units of the largest term, not of each small one)."""
    scale = float(b.detach().abs().max())
    err = float((a.detach() - b.detach()).abs().max())
    assert a.shape == b.shape and err <= rel * scale, (what, err, scale)


def _lora_grads(model: Any) -> Any:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _compare_on_batches(model: Any, vocab: int) -> None:
    """token_losses == the full-logits reference, and so are the LoRA gradients, on a padded and
    a packed batch; the model must go through backbone + head (not the fallback)."""
    from cuda_backend.engine import batch_inputs, output_head

    for kind, batch in _batches(vocab).items():
        assert output_head(model, batch_inputs(batch, "cpu")) is not None, kind
        ours, g, ref, g_ref = _ours_and_reference(model, batch)
        assert ours.shape == ref.shape == (batch.shape[0], batch.shape[1] - 1), kind
        _assert_near(ours, ref, what=kind)
        _assert_near(g, g_ref, what=kind)
        assert float(g.abs().max()) > 0 and float(ours.detach().sum()) > 0, kind


def _layout_model(layout: str) -> Any:
    """The published config of a tests/checkpoints layout, random init (std 0.2, so that a
    missed step after the backbone shows), fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.checkpoints.layouts import published_config

    d = published_config(layout)
    d.pop("transformers_version", None)
    cfg = AutoConfig.for_model(**d)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None:
            c.initializer_range = 0.2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _vocab(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _published_layouts() -> list[str]:
    from tests.checkpoints.layouts import LAYOUTS

    return list(LAYOUTS)


@pytest.mark.parametrize("layout", _published_layouts())
def test_backbone_and_head_equal_the_model_on_every_published_layout(layout):
    """GPT-2, GPT-NeoX, Llama, Qwen2/3, Gemma 1, Gemma-3 1B and 4B (ConditionalGeneration), as
    published: the engine's loss and LoRA gradients equal the full-logits computation."""
    model = _with_lora(_layout_model(layout))
    _compare_on_batches(model, _vocab(model))


def _tiny_text_config(**extra: Any) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            initializer_range=0.2, **extra)


def test_final_logit_softcapping_is_applied_where_the_model_applies_it():
    """Gemma3ForCausalLM caps its logits when its config says so (a cap of 0.5 makes the tanh
    matter); Gemma3ForConditionalGeneration ignores its text config's cap, and so must we."""
    from transformers import AutoModelForCausalLM, Gemma3Config, SiglipVisionConfig

    from cuda_backend.engine import batch_inputs, output_head

    torch.manual_seed(0)
    text = AutoModelForCausalLM.from_config(_tiny_text_config(final_logit_softcapping=0.5))
    assert type(text).__name__ == "Gemma3ForCausalLM"
    model = _with_lora(text)
    batch = _batches(300)["padded"]
    assert output_head(model, batch_inputs(batch, "cpu"))[1].softcap == 0.5
    _compare_on_batches(model, 300)

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14)
    torch.manual_seed(0)
    mm = AutoModelForCausalLM.from_config(Gemma3Config(text_config=_tiny_text_config(final_logit_softcapping=0.5),
                                                       vision_config=vc, mm_tokens_per_image=4))
    assert type(mm).__name__ == "Gemma3ForConditionalGeneration"
    model = _with_lora(mm)
    assert output_head(model, batch_inputs(batch, "cpu"))[1].softcap is None
    _compare_on_batches(model, 300)


def test_a_model_that_does_more_after_its_backbone_uses_its_own_logits():
    """A logit scale the head does not know of (a forward hook on lm_head, as an unknown
    architecture's extra step): the one-time check sees it, and the losses and gradients
    still equal the model's own."""
    from cuda_backend.engine import batch_inputs, output_head

    model = _with_lora(_layout_model("llama-3.2"))
    model.get_base_model().lm_head.register_forward_hook(lambda mod, args, out: out * 1.5)
    batch = _batches(_vocab(model))["padded"]
    assert output_head(model, batch_inputs(batch, "cpu")) is None
    ours, g, ref, g_ref = _ours_and_reference(model, batch)
    _assert_near(ours, ref)
    _assert_near(g, g_ref)


def test_a_trained_head_gets_its_gradient_through_the_model_logits():
    """A head that requires a gradient (a plain model, all parameters trainable): the model's
    own logits are used, and the head's gradient is there; without autograd the chunked path
    serves it."""
    from cuda_backend.engine import batch_inputs, batch_loss, output_head

    model = _layout_model("gpt2").eval()
    batch = _batches(_vocab(model))["padded"]
    assert output_head(model, batch_inputs(batch, "cpu")) is None
    loss, n = batch_loss(model, batch, "cpu")
    loss.backward()
    assert n == batch.n_trained and float(model.lm_head.weight.grad.abs().max()) > 0
    with torch.no_grad():
        assert output_head(model, batch_inputs(batch, "cpu")) is not None
        ours, _ = batch_loss(model, batch, "cpu")
        ref = _reference_token_losses(model, batch).sum()
    assert abs(float(ours) - float(ref)) < 1e-5 * float(ref)


def test_distill_loss_equals_the_full_logits_lwf():
    """LwF on a packed batch: CE sum, KL sum, real-token count and the LoRA gradients of
    the objective as TorchEngine.train_micro builds it, against the full [B, T, V] logits."""
    from cuda_backend.engine import _distill_from_logits, batch_inputs, distill_loss

    model = _with_lora(_layout_model("gemma3-1b"))
    batch = _batches(_vocab(model))["packed"]
    ce, kl, n_real, n = distill_loss(model, batch, "cpu", temperature=2.0)
    (ce + 0.5 * kl / n_real * n).backward()
    g = _lora_grads(model)
    model.zero_grad()
    w = torch.from_numpy(batch.loss_mask[:, 1:])
    real = torch.from_numpy((batch.segment_ids[:, 1:] > 0).astype(np.float32))
    ref_ce, ref_kl = _distill_from_logits(model, batch_inputs(batch, "cpu"), w, real, 2.0)
    (ref_ce + 0.5 * ref_kl / n_real * n).backward()
    assert n == batch.n_trained and float(n_real) == float((batch.segment_ids[:, 1:] > 0).sum())
    _assert_near(ce, ref_ce)
    _assert_near(kl, ref_kl)
    _assert_near(g, _lora_grads(model))
    assert float(kl.detach()) > 1e-3  # the adapter moves the model away from the base


# --------------------------------------------------------------------------- training, bf16 and 4-bit


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama (untied head, vocab 1,000) saved as a checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


def _train(path, adapter, quantize: str, steps: int, distill: float = 0.0) -> tuple[list[float], Any]:
    """What the GPU's bf16 recipe does (bf16 base, bf16 autocast, QLoRA's bf16 compute), on
    the CPU: ``load_for_training`` and the engine's own steps."""
    from cuda_backend.distributed import DistContext
    from cuda_backend.engine import TorchEngine
    from cuda_backend.hardware import Precision
    from cuda_backend.model import load_for_training
    from macft.config import RunConfig
    from macft.data.batching import collate
    from macft.model_info import read_model_info

    cfg = RunConfig()
    cfg.model.name, cfg.model.quantize = str(path), quantize
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 8.0, 0.0
    precision = Precision("bf16", True)
    loaded = load_for_training(cfg, path, read_model_info(path), precision, "cpu")
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    engine = TorchEngine(loaded.model, loaded.lora_modules, loaded.spec, torch.optim.AdamW(params, lr=0.02),
                         DistContext(), precision, seed=0, device_label="CPU", distill_weight=distill)
    batch = collate([[e] for e in _examples(1000)], pad_id=0, packed=False)
    losses = []
    for _ in range(steps):
        loss, n = engine.train_micro(batch)
        engine.optimizer_step(0.02, n, 1.0)
        losses.append(loss / n)
    engine.save_adapter(adapter)
    return losses, engine


def _assert_adapter_loads(path, adapter, engine) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32),
                                      str(adapter))
    loaded = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    trained = {n: p for n, p in engine.model.named_parameters() if ".lora_" in n}
    assert loaded.keys() == trained.keys() and loaded
    for name, p in loaded.items():
        torch.testing.assert_close(p, trained[name].float(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("distill", [0.0, 0.5], ids=["ce", "lwf"])
def test_bf16_autocast_trains_on_the_cpu(tiny_llama_dir, tmp_path, distill):
    from cuda_backend.engine import output_head

    losses, engine = _train(tiny_llama_dir, tmp_path / "adapter", "none", steps=4, distill=distill)
    assert engine.model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    assert output_head(engine.model, {"input_ids": torch.tensor([[5, 6, 7]])}) is not None  # the chunked path
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    if distill:
        assert engine.last_kl is not None and np.isfinite(engine.last_kl) and engine.last_kl > 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    _assert_adapter_loads(tiny_llama_dir, tmp_path / "adapter", engine)


def test_bf16_autocast_loss_is_the_logits_paths_within_bf16_rounding(tiny_llama_dir):
    """Under bf16 autocast the head's matmul is in bf16 as nn.Linear's was; the rest in fp32."""
    from transformers import AutoModelForCausalLM

    from cuda_backend.engine import _token_losses_from_logits, batch_inputs, token_losses

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16).eval()
    batch = _batches(1000)["padded"]
    w = torch.from_numpy(batch.loss_mask[:, 1:])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = token_losses(model, batch, "cpu")
        ref = _token_losses_from_logits(model, batch_inputs(batch, "cpu"), w)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=2e-2)


def test_qlora_4bit_with_bf16_compute_trains_on_the_cpu(tiny_llama_dir, tmp_path):
    """bitsandbytes leaves lm_head unquantized (a plain nn.Linear, fp32 after
    prepare_model_for_kbit_training): the chunked path serves it under bf16 autocast."""
    pytest.importorskip("bitsandbytes")
    from cuda_backend.engine import output_head

    losses, engine = _train(tiny_llama_dir, tmp_path / "adapter", "4bit", steps=3)
    base = engine.model.get_base_model()
    assert type(base.model.layers[0].mlp.down_proj.base_layer).__name__ == "Linear4bit"
    assert type(base.lm_head) is torch.nn.Linear
    assert output_head(engine.model, {"input_ids": torch.tensor([[5, 6, 7]])}) is not None
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    _assert_adapter_loads(tiny_llama_dir, tmp_path / "adapter", engine)
