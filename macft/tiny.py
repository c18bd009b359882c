"""Tiny random-init models built locally (tests, `macft demo`, benchmarks). Nothing is downloaded.

- :func:`build_tiny_gemma3`: a ``Gemma3ForCausalLM`` with a SentencePiece BPE tokenizer
  trained on the fly on the given texts (Gemma's special-token ids: pad 0, eos 1,
  bos 2, unk 3, then ``<start_of_turn>`` / ``<end_of_turn>``) and Gemma 3's chat
  template. Widths are multiples of 256 so llama.cpp's k-quants apply without fallback.
- :func:`build_tiny_qwen2`: a ``Qwen2ForCausalLM`` with a byte-level BPE tokenizer
  (GPT-2's vocabulary, read from a vocabulary file of the pinned llama.cpp source, so that
  llama.cpp recognises its pre-tokenizer) plus ChatML's ``<|im_start|>`` / ``<|im_end|>``.

``initializer_range`` defaults to 0.2: with the usual 0.02 and tied, frozen embeddings the
logits of a random model stay near zero and LoRA cannot learn the answers in few steps.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
GEMMA_TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def template(name: str) -> str:
    return resources.files("macft").joinpath("templates", f"{name}.jinja").read_text(encoding="utf-8")


@dataclass
class TinySize:
    hidden: int = 256
    layers: int = 6  # mlx-lm's gemma3_text needs >= 6 (its sliding-window pattern)
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64
    intermediate: int = 512
    vocab: int = 1024
    initializer_range: float = 0.2
    seed: int = 0


def corpus_from_jsonl(paths: list[Path]) -> list[str]:
    """Every string in the given JSONL files (messages, instructions, ...), for tokenizer training."""
    texts: list[str] = []

    def walk(o: object) -> None:
        if isinstance(o, str):
            texts.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for p in paths:
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            if line.strip():
                walk(json.loads(line))
    return texts


def _train_sentencepiece(texts: list[str], vocab: int, workdir: Path) -> Path:
    import sentencepiece as spm

    prefix = workdir / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts + ["user", "model", "system", "\n"]),
        model_prefix=str(prefix), vocab_size=vocab, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=GEMMA_TURN_TOKENS + ["\n"],
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


def build_tiny_gemma3(out: Path, texts: list[str], size: TinySize | None = None,
                      model_vocab: int | None = None, dtype: str = "float32") -> Path:
    """Write a tiny Gemma-3 model (HF format, fp32 safetensors) with its tokenizer to ``out``.

    ``model_vocab``: an embedding larger than the tokenizer (the real models' 262k rows, for
    memory measurements); ``dtype``: the dtype the weights are saved in."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    size = size or TinySize()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sp_model = _train_sentencepiece(texts, size.vocab, Path(tmp))
        shutil.copy(sp_model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": GEMMA_TURN_TOKENS,
        "chat_template": template("gemma3"),
        "model_max_length": 2048,
    }, indent=1))
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.save_pretrained(str(out))  # writes tokenizer.json
    vocab = len(tok)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    torch.manual_seed(size.seed)
    cfg = Gemma3TextConfig(
        vocab_size=max(vocab, model_vocab or 0), hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
        query_pre_attn_scalar=size.head_dim, max_position_embeddings=2048, sliding_window=512,
        initializer_range=size.initializer_range, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=[1, eot], bos_token_id=2)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # a 4B-shaped model is 16 GB in fp32
    try:
        model = Gemma3ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = [1, eot]
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 2
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_tiny_qwen2(out: Path, gpt2_vocab_gguf: Path, size: TinySize | None = None) -> Path:
    """A tiny Qwen2 with GPT-2's byte-level BPE vocabulary plus ChatML tokens.

    ``gpt2_vocab_gguf``: ``models/ggml-vocab-gpt-2.gguf`` from the llama.cpp source
    (see :func:`export.llama_cpp.source_dir`).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    size = size or TinySize(hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32, intermediate=256)
    tokens, merges = _read_bpe_vocab(gpt2_vocab_gguf)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, additional_special_tokens=CHATML_TOKENS[1:],
        model_max_length=2048, clean_up_tokenization_spaces=False)
    fast.add_special_tokens({"additional_special_tokens": CHATML_TOKENS[1:]})
    fast.chat_template = template("chatml")
    fast.save_pretrained(str(out))
    vocab = len(fast)
    torch.manual_seed(size.seed)
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, max_position_embeddings=2048,
        initializer_range=size.initializer_range, tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    model.generation_config.eos_token_id = [cfg.eos_token_id, fast.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def _read_bpe_vocab(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def strings(key: str) -> list[str]:
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in strings("tokenizer.ggml.merges")]
    # GPT-2's own <|endoftext|> is the last token; ChatML tokens are added after it
    return tokens, merges  # type: ignore[return-value]


def pretrain(model_dir: Path, data: Path, out: Path, *, steps: int = 150, lr: float = 1e-3,
             batch_size: int = 8, seed: int = 0) -> Path:
    """Give a tiny random model some "general knowledge": a short full fine-tune (every weight,
    PyTorch, fp32) on ``data``, saved as a new base model in ``out``.

    A random-init base answers with noise, which makes "before vs after" and forgetting
    (LwF) meaningless; after this its answers follow ``data`` (plain answers for
    examples/data/general), like a real pretrained base would.
    """
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from .data.batching import BatchPlan
    from .data.dataset import build_data
    from .data.render import Renderer
    from .data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    d = build_data(str(data), None, Renderer(tok), max_seq_len=256, valid_fraction=0)
    plan = BatchPlan(d.train, batch_size, seed=seed, pad_id=tok.pad_token_id or 0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    stream = plan.iterate()
    for step in range(steps):
        _, _, b = next(stream)
        ids = torch.from_numpy(b.input_ids.astype("int64"))
        att = torch.from_numpy((b.segment_ids > 0).astype("int64"))
        w = torch.from_numpy(b.loss_mask[:, 1:])
        logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (ce * w).sum() / w.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (1 - step / steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    for f in Path(model_dir).iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out
