"""Tiny random-init models in the exact published layouts of real hub checkpoints.

Each :class:`Layout` stands for one real repository of the Hugging Face hub. :func:`build`
writes a complete model directory the way that repository ships it: ``config.json`` with the
hub's own keys (``published/<id>.config.json``: the hub's file with the dimensions shrunk;
transformers-4.x-era keys kept as written), safetensors weights under the published tensor
names, in the published dtype and sharding (old buffers such as ``attn.bias`` included where
the old checkpoints carry them), the tokenizer files the hub ships (and only those), and
``generation_config.json`` where the hub has one. Nothing is downloaded.

Vocabularies are real where llama.cpp's source tree has them (``models/ggml-vocab-*.gguf``:
GPT-2, GPT-NeoX, Llama-2's SentencePiece, Llama-3, Qwen2), else a SentencePiece model is
trained on the fly on ``texts`` (Gemma: BPE with Gemma's special ids; rinna: unigram).

The weights are drawn with std 0.2 (not the published ``initializer_range``, which the
config keeps) so that LoRA can learn a pattern in a few dozen steps.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from macft.tiny import _train_sentencepiece, corpus_from_jsonl, template

HERE = Path(__file__).resolve().parent
PUBLISHED = HERE / "published"
REPO = HERE.parents[1]
DEFAULT_CORPUS = (REPO / "examples/data/nya_chat/train.jsonl", REPO / "examples/data/general/train.jsonl")
INIT_STD = 0.2


@dataclass(frozen=True)
class Layout:
    id: str
    hub_id: str
    architecture: str
    tokenizer_files: tuple[str, ...]  # the tokenizer files written, as the hub repo ships them
    chat_template: bool  # whether the tokenizer ships a chat template
    end_of_turn: str  # the token/text a reply ends with in this model's chat format
    notes: str  # what is special about this layout (and what is unverified)


_GEMMA_TOK = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_SPIECE_TOK = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json")
_QWEN_TOK = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")

LAYOUTS: dict[str, Layout] = {lay.id: lay for lay in [
    Layout(
        "gemma3-1b", "google/gemma-3-1b-it", "Gemma3ForCausalLM", _GEMMA_TOK, True, "<end_of_turn>",
        "gemma3_text with the hub's 4.50 keys (rope_local_base_freq, sliding_window_pattern 6, "
        "cache_implementation hybrid, eos [1,106]); bf16, one file, tied (no lm_head); SentencePiece "
        "BPE trained on the fly with Gemma 3's low ids (<mask> 4, [multimodal] 5, <unused0-98> 6-104, "
        "<start_of_turn> 105, <end_of_turn> 106, '\\n' 107); vocab_size is the tiny one (1024); "
        "unverified: whether the hub's 1b tokenizer_config also names the image tokens (left out "
        "here, and added_tokens.json with them)."),
    Layout(
        "gemma3-4b", "google/gemma-3-4b-it", "Gemma3ForConditionalGeneration",
        ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json"), True, "<end_of_turn>",
        "multimodal gemma3: text_config holds only hidden/intermediate/layers/rope_scaling/"
        "sliding_window, so heads 8, kv 4, head_dim 256 and vocab 262208 come from Gemma3TextConfig's "
        "defaults; weights language_model.model.* / vision_tower.vision_model.* / "
        "multi_modal_projector.*, no lm_head, two shards + index; image 112 px, patch 14, "
        "mm_tokens_per_image 16; the tokenizer keeps the hub's ids: the trained pieces are followed "
        "by UNUSED filler pieces (<fill_N>) up to <start_of_image> 255999 / <end_of_image> 256000, "
        "<unused99-6241> at 256001-262143 and <image_soft_token> 262144 as an added token "
        "(added_tokens.json), so text-only loading and llama.cpp see the hub's ids; "
        "unverified: the hub also ships chat_template.json (processor) - here the template is in "
        "tokenizer_config.json only."),
    Layout(
        "gemma-2b", "google/gemma-2b", "GemmaForCausalLM", _GEMMA_TOK, False, "<eos>",
        "Gemma 1 base: hidden_act 'gelu' (transformers maps it to gelu_pytorch_tanh), head_dim "
        "explicit, bf16, two shards, tied; SentencePiece with Gemma 1's ids (<mask> 4, <2mass> 5, "
        "[@BOS@] 6, <unused0-98> 7-105, <start_of_turn> 106, <end_of_turn> 107: llama.cpp hard-codes "
        "eot 107); no chat template (base model); unverified: whether the hub's config also has "
        "'hidden_activation' (left out)."),
    Layout(
        "rinna-neox-3.6b", "rinna/japanese-gpt-neox-3.6b-instruction-sft", "GPTNeoXForCausalLM",
        _SPIECE_TOK, False, "</s>",
        "GPT-NeoX with transformers 4.26 keys (rotary_pct 1.0, rotary_emb_base, sequential "
        "residual, untied embed_out); fp16 gpt_neox.* + embed_out.weight with the 4.26 buffers "
        "attention.bias (bool tril) / attention.masked_bias / attention.rotary_emb.inv_freq; "
        "T5Tokenizer from spiece.model only (SentencePiece unigram trained on the fly, byte "
        "fallback, no dummy prefix, whitespace kept), no tokenizer.json, no chat template; chat "
        "format 'ユーザー: ...<NL>システム: ...' with the literal '<NL>' for newlines, replies end "
        "with </s>; transformers 5 turns spiece.model into a Unigram with unk_id 2 hard-coded (<s> "
        "here), no byte fallback, collapsed whitespace and </s> appended; llama.cpp cannot convert "
        "it (no BPE pre-tokenizer); unverified: special pieces ([PAD] 0, [UNK] 1, <s> 2, </s> 3), "
        "whether the hub's weights are pytorch_model.bin only, the buffers' dtypes."),
    Layout(
        "rinna-gpt2-medium", "rinna/japanese-gpt2-medium", "GPT2LMHeadModel", _SPIECE_TOK, False, "</s>",
        "GPT-2 (n_embd/n_head/n_layer/n_ctx keys, old 'gradient_checkpointing' key) with a "
        "T5Tokenizer spiece.model only (do_lower_case true in tokenizer_config, which "
        "transformers ignores); fp32 transformer.* names with the old attn.bias (uint8) / "
        "attn.masked_bias buffers, tied (no lm_head.weight): transformers 5 reports masked_bias as "
        "unexpected, mlx-lm expects no 'transformer.' prefix; unverified: the whole config key set, "
        "bos/eos ids, special pieces, and whether the hub has safetensors at all "
        "(pytorch_model.bin)."),
    Layout(
        "gpt2", "openai-community/gpt2", "GPT2LMHeadModel",
        ("vocab.json", "merges.txt", "tokenizer_config.json"), False, "<|endoftext|>",
        "the original GPT-2: config without torch_dtype/transformers_version, "
        "task_specific_params; fp32 weights WITHOUT the 'transformer.' prefix (wte.weight, "
        "h.0.attn.c_attn.weight, ...) with h.N.attn.bias fp32 buffers, tied; tokenizer from "
        "vocab.json + merges.txt (GPT-2's real vocabulary) and tokenizer_config.json "
        "{model_max_length: 1024}; no tokenizer.json (the hub has one; this layout leaves it out on "
        "purpose), no chat template; llama.cpp b11312's converter stops at h.0.attn.bias."),
    Layout(
        "pythia", "EleutherAI/pythia-160m-deduped", "GPTNeoXForCausalLM",
        ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"), False, "<|endoftext|>",
        "GPT-NeoX with partial rotary (rotary_pct 0.25), parallel residual, untied embed_out, "
        "vocab 50304 > tokenizer 50277; fp16 with the 4.24 buffers (attention.bias, masked_bias, "
        "rotary_emb.inv_freq); tokenizer.json only (GPT-NeoX-20B's real BPE: NFC, byte level, "
        "whitespace-run tokens 50254-50276); bos = eos = <|endoftext|> 0; no chat template; "
        "unverified: tokenizer_config keys, the buffers' dtypes, no generation_config.json."),
    Layout(
        "elyza-llama2-7b", "elyza/ELYZA-japanese-Llama-2-7b-instruct", "LlamaForCausalLM",
        ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"), False, "</s>",
        "Llama-2 keys (pretraining_tp 1, rope_scaling null, num_key_value_heads), untied lm_head, "
        "fp16 (Llama-2 hf checkpoints are fp16), two shards, per-layer "
        "self_attn.rotary_emb.inv_freq buffers as 4.30 checkpoints carry; tokenizer.model is "
        "Llama-2's real 32k SentencePiece (rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf) + "
        "LlamaTokenizer config (add_bos_token, legacy false), no tokenizer.json, no chat template; "
        "chat format '[INST] <<SYS>>...<</SYS>> ... [/INST] reply </s>'; unverified: fp16 vs bf16, "
        "rms_norm_eps, transformers_version, legacy, safetensors vs pytorch_model-*.bin, "
        "generation_config.json."),
    Layout(
        "qwen3", "Qwen/Qwen3-0.6B", "Qwen3ForCausalLM", _QWEN_TOK, True, "<|im_end|>",
        "Qwen3 with explicit head_dim (heads*head_dim != hidden), q/k norms, tie_word_embeddings "
        "true yet lm_head.weight stored too (the hub file's size says so: unverified); bf16; "
        "Qwen2's real byte-level BPE with the hub's added tokens 151643-151668 (<think> 151667, "
        "</think> 151668), thinking chat template, eos <|im_end|>, pad <|endoftext|>."),
    Layout(
        "qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2ForCausalLM", _QWEN_TOK, True, "<|im_end|>",
        "Qwen2 (q/k/v biases), tied, no lm_head tensor, bf16; Qwen2's real byte-level BPE with "
        "added tokens 151643-151664; ChatML template with the default system prompt."),
    Layout(
        "llama-3.2", "meta-llama/Llama-3.2-1B-Instruct", "LlamaForCausalLM",
        ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"), True, "<|eot_id|>",
        "Llama 3 rope_scaling (rope_type llama3, factor 32), tied (no lm_head), eos "
        "[128001,128008,128009], bf16; tokenizer.json only (Llama 3's real 128k BPE, "
        "ignore_merges, <|begin_of_text|> template post-processor) with the 256 special tokens at "
        "their ids; PreTrainedTokenizerFast; Llama 3.2 chat template."),
]}


# ---------------------------------------------------------------------------------------------
# sources


def llama_cpp_models() -> Path:
    from export.llama_cpp import source_dir

    return source_dir() / "models"


def default_texts() -> list[str]:
    return corpus_from_jsonl(list(DEFAULT_CORPUS))


def published_config(layout_id: str) -> dict[str, Any]:
    return json.loads((PUBLISHED / f"{layout_id}.config.json").read_text(encoding="utf-8"))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
               12: "<f8"}


@cache
def gguf_metadata(name: str) -> dict[str, Any]:
    """The key/value metadata of a llama.cpp vocabulary file (``models/<name>``).

    A direct reader of the GGUF header: gguf.GGUFReader builds a numpy view per string and
    takes 15 s for Qwen2's 151k tokens + 151k merges; this takes well under a second."""
    import struct

    import numpy as np

    buf = (llama_cpp_models() / name).read_bytes()
    if buf[:4] != b"GGUF":
        raise ValueError(f"{name}: not a GGUF file")
    _version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n:pos].decode("utf-8")

    def value(t: int) -> Any:
        nonlocal pos
        if t == 8:
            return string()
        if t == 9:
            et, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if et == 8:
                return [string() for _ in range(count)]
            if et == 9:
                return [value(9) for _ in range(count)]
            arr = np.frombuffer(buf, dtype=_GGUF_NUMPY[et], count=count, offset=pos)
            pos += arr.nbytes
            return arr.tolist()
        fmt = _GGUF_SCALARS[t]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = string()
        (t,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        meta[key] = value(t)
    return meta


def _gguf_vocab(name: str) -> tuple[list[str], list[float] | None, list[int]]:
    """tokens, scores (None for BPE vocabularies) and token types of a llama.cpp vocab file."""
    m = gguf_metadata(name)
    return m["tokenizer.ggml.tokens"], m.get("tokenizer.ggml.scores"), m["tokenizer.ggml.token_type"]


def _bpe(name: str) -> tuple[list[str], list[tuple[str, str]]]:
    """tokens and merges, as macft.tiny._read_bpe_vocab reads them (but fast)."""
    m = gguf_metadata(name)
    return m["tokenizer.ggml.tokens"], [tuple(x.split(" ", 1)) for x in m["tokenizer.ggml.merges"]]


# ---------------------------------------------------------------------------------------------
# writing helpers


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _tok_entry(content: str, special: bool = True) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def _map_entry(content: str) -> dict[str, Any]:
    e = _tok_entry(content)
    del e["special"]
    return e


def _added_decoder(items: list[tuple[int, str, bool]]) -> dict[str, Any]:
    return {str(i): _tok_entry(c, s) for i, c, s in items}


def _save_weights(out: Path, tensors: dict[str, Any], shards: int = 1) -> None:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index as save_pretrained
    shards (in state-dict order, split by bytes)."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    total = sum(sizes.values())
    groups: list[dict[str, Any]] = [{} for _ in range(shards)]
    acc, g = 0, 0
    for k, v in tensors.items():
        if g < shards - 1 and groups[g] and acc + sizes[k] / 2 > total * (g + 1) / shards:
            g += 1
        groups[g][k] = v
        acc += sizes[k]
    assert all(groups), "a shard would be empty"
    weight_map = {}
    for i, grp in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(grp, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(grp, fname))
    _dump(out / "model.safetensors.index.json",
          {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def _model(config_dict: dict[str, Any], seed: int, *, vision: bool = False):
    """The transformers model for a published config dict, drawn with std INIT_STD."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3ForConditionalGeneration

    d = dict(config_dict)
    d.pop("transformers_version", None)
    cfg = AutoConfig.for_model(**d)
    for c in (cfg, getattr(cfg, "text_config", None), getattr(cfg, "vision_config", None)):
        if c is not None:
            c.initializer_range = INIT_STD
    torch.manual_seed(seed)
    if vision:
        model = Gemma3ForConditionalGeneration(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


def _cast(sd: dict[str, Any], dtype) -> dict[str, Any]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).clone() for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------
# tokenizers


GEMMA3_LOW = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)]  # ids 4..104
GEMMA1_LOW = ["<mask>", "<2mass>", "[@BOS@]"] + [f"<unused{i}>" for i in range(99)]  # ids 4..105


def _gemma_sentencepiece(texts: list[str], low: list[str], vocab: int, workdir: Path):
    """macft.tiny's Gemma SentencePiece (pad 0 eos 1 bos 2 unk 3, <start_of_turn>,
    <end_of_turn>, '\\n') with ``low`` inserted at id 4 so that the turn tokens land on the
    hub's ids. Returns the ModelProto."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    spm.set_random_generator_seed(0)
    path = _train_sentencepiece(texts, vocab - len(low), workdir)
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    pieces = list(proto.pieces)
    assert [p.piece for p in pieces[:6]] == ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    new = []
    for s in low:
        p = pb.ModelProto.SentencePiece()
        p.piece, p.score, p.type = s, 0.0, pb.ModelProto.SentencePiece.USER_DEFINED
        new.append(p)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:4] + new + pieces[4:])
    proto.trainer_spec.vocab_size = len(proto.pieces)
    proto.trainer_spec.model_prefix = "tokenizer"  # not the temporary directory: builds are reproducible
    return proto


def _gemma_tokenizer_json(out: Path) -> None:
    """tokenizer.json converted by transformers from tokenizer.model (as the hub's)."""
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer.from_pretrained(str(out))
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


def _write_gemma_tokenizer(out: Path, texts: list[str], *, gemma3: bool, vocab: int,
                           image_tokens: bool = False) -> int:
    """Gemma's tokenizer files; returns the number of pieces of the trained part (the tiny
    vocab_size; with ``image_tokens`` the model proto is then filled up to the hub's 262144)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    low = GEMMA3_LOW if gemma3 else GEMMA1_LOW
    with tempfile.TemporaryDirectory() as tmp:
        proto = _gemma_sentencepiece(texts, low, vocab, Path(tmp))
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    assert ids["<end_of_turn>"] == (106 if gemma3 else 107)
    n_trained = len(proto.pieces)
    added: list[tuple[int, str, bool]] = [(i, p.piece, True) for i, p in enumerate(proto.pieces)
                                          if p.type in (2, 3, 4) and i <= ids["\n"]]
    added = [(i, c, c != "\n") for i, c, _ in added]
    if image_tokens:
        n = len(proto.pieces)
        Piece = pb.ModelProto.SentencePiece

        def add(s: str, t: int) -> None:
            p = Piece()
            p.piece, p.score, p.type = s, 0.0, t
            proto.pieces.append(p)

        for i in range(n, 255999):
            add(f"<fill_{i}>", Piece.UNUSED)
        add("<start_of_image>", Piece.USER_DEFINED)
        add("<end_of_image>", Piece.USER_DEFINED)
        for k in range(99, 6242):
            add(f"<unused{k}>", Piece.USER_DEFINED)
        assert len(proto.pieces) == 262144
        proto.trainer_spec.vocab_size = len(proto.pieces)
        added += [(255999, "<start_of_image>", False), (256000, "<end_of_image>", False)]
        added += [(256001 + k - 99, f"<unused{k}>", True) for k in range(99, 6242)]
        added += [(262144, "<image_soft_token>", True)]
        _dump(out / "added_tokens.json", {"<image_soft_token>": 262144})
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    turn = ["<start_of_turn>", "<end_of_turn>"]
    cfg: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": _added_decoder(added),
    }
    if not image_tokens:
        cfg["additional_special_tokens"] = turn
    if image_tokens:
        cfg["boi_token"] = "<start_of_image>"
    cfg["bos_token"] = "<bos>"
    if gemma3:
        cfg["chat_template"] = template("gemma3")
    cfg["clean_up_tokenization_spaces"] = False
    if image_tokens:
        cfg["eoi_token"] = "<end_of_image>"
    cfg["eos_token"] = "<eos>"
    if image_tokens:
        cfg["extra_special_tokens"] = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                       "image_token": "<image_soft_token>"}
        cfg["image_token"] = "<image_soft_token>"
    cfg["model_max_length"] = 1000000000000000019884624838656
    cfg["pad_token"] = "<pad>"
    if image_tokens:
        cfg["processor_class"] = "Gemma3Processor"
    cfg["sp_model_kwargs"] = {}
    cfg["spaces_between_special_tokens"] = False
    cfg["tokenizer_class"] = "GemmaTokenizer"
    cfg["unk_token"] = "<unk>"
    cfg["use_default_system_prompt"] = False
    _dump(out / "tokenizer_config.json", cfg)
    stm: dict[str, Any] = {}
    if image_tokens:
        stm["boi_token"] = "<start_of_image>"
    else:
        stm["additional_special_tokens"] = turn
    stm["bos_token"] = _map_entry("<bos>")
    if image_tokens:
        stm["eoi_token"] = "<end_of_image>"
    stm["eos_token"] = _map_entry("<eos>")
    if image_tokens:
        stm["image_token"] = "<image_soft_token>"
    stm["pad_token"] = _map_entry("<pad>")
    stm["unk_token"] = _map_entry("<unk>")
    _dump(out / "special_tokens_map.json", stm)
    _gemma_tokenizer_json(out)
    return n_trained


RINNA_VOCAB = 1024  # asked of the trainer; a unigram model of the small corpus has fewer pieces
# rinna's chat format and every printable ASCII character, so that the vocabulary has them
# (transformers 5 loads spiece.model without byte fallback: a missing character becomes unk)
RINNA_EXTRA = ["ユーザー: こんにちは<NL>システム: こんにちは", "".join(chr(c) for c in range(33, 127))]


def _write_rinna_tokenizer(out: Path, texts: list[str], vocab: int, *, lower: bool) -> int:
    """rinna's style: a SentencePiece unigram model (spiece.model) with byte fallback, no
    dummy prefix and whitespace kept, loaded as T5Tokenizer. Returns its number of pieces."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    spm.set_random_generator_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts + RINNA_EXTRA), model_prefix=str(prefix), vocab_size=vocab,
            model_type="unigram", character_coverage=1.0, byte_fallback=True, split_digits=True,
            add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
            pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="<s>", eos_piece="</s>",
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
        proto = pb.ModelProto()
        proto.ParseFromString(prefix.with_suffix(".model").read_bytes())
    proto.trainer_spec.model_prefix = "spiece"  # not the temporary directory: builds are reproducible
    (out / "spiece.model").write_bytes(proto.SerializeToString())
    cfg: dict[str, Any] = {
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "do_lower_case": lower,
        "eos_token": "</s>",
        "extra_ids": 0,
        "pad_token": "[PAD]",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "[UNK]",
    }
    _dump(out / "tokenizer_config.json", cfg)
    _dump(out / "special_tokens_map.json",
          {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "unk_token": "[UNK]"})
    return len(proto.pieces)


def _write_llama2_tokenizer(out: Path) -> None:
    """Llama-2's tokenizer.model, rebuilt from llama.cpp's ggml-vocab-llama-spm.gguf."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens, scores, types = _gguf_vocab("ggml-vocab-llama-spm.gguf")
    assert scores is not None and len(tokens) == 32000
    proto = pb.ModelProto()
    for t, s, ty in zip(tokens, scores, types):
        p = proto.pieces.add()
        p.piece, p.score, p.type = t, s, ty  # llama.cpp's token types are SentencePiece's
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = 32000
    ts.character_coverage = 0.99995
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.byte_fallback = True
    ts.max_sentencepiece_length = 16
    ts.vocabulary_output_piece_score = True
    ts.hard_vocab_limit = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = 0, 1, 2, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece, ts.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    ts.unk_surface = " \u2047 "
    ns = proto.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())

    def added(c: str) -> dict[str, Any]:
        return {"__type": "AddedToken", **_map_entry(c)}

    _dump(out / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": added("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": added("</s>"),
        "legacy": False,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": added("<unk>"),
    })
    _dump(out / "special_tokens_map.json",
          {"bos_token": _map_entry("<s>"), "eos_token": _map_entry("</s>"), "unk_token": _map_entry("<unk>")})


QWEN_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_ADDED = [  # (content, special) from 151643 on, as Qwen2.5 / Qwen3 ship them
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED = [("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False)]


def _bpe_tokenizer(tokens: list[str], merges: list[tuple[str, str]], added: list[tuple[str, bool]], *,
                   regex: str | None, nfc: bool, ignore_merges: bool = False, trim_offsets: bool = False):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, dropout=None, unk_token=None,
                     continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False,
                     ignore_merges=ignore_merges)
    tk = Tokenizer(bpe)
    if nfc:
        tk.normalizer = normalizers.NFC()
    if regex is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False)])
    tk.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False)
    tk.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False)
    for content, special in added:
        t = AddedToken(content, special=special, normalized=not special and content.strip() == "",
                       lstrip=False, rstrip=False, single_word=False)
        if special:
            tk.add_special_tokens([t])
        else:
            tk.add_tokens([t])
    return tk


def _write_vocab_merges(out: Path, tokens: list[str], merges: list[tuple[str, str]]) -> None:
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False),
                                    encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                    encoding="utf-8")


def _write_qwen_tokenizer(out: Path, *, qwen3: bool) -> None:
    tokens, merges = _bpe("ggml-vocab-qwen2.gguf")
    base = tokens[:151643]
    assert tokens[151643] == "<|endoftext|>"
    added = QWEN_ADDED + (QWEN3_ADDED if qwen3 else [])
    tk = _bpe_tokenizer(base, merges, added, regex=QWEN_REGEX, nfc=True)
    tk.save(str(out / "tokenizer.json"))
    _write_vocab_merges(out, base, merges)
    name = "Qwen-Qwen3-0.6B" if qwen3 else "Qwen-Qwen2.5-7B-Instruct"
    chat = (llama_cpp_models() / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    _dump(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_decoder([(151643 + i, c, s) for i, (c, s) in enumerate(added)]),
        "additional_special_tokens": [c for c, s in QWEN_ADDED[1:14]],
        "bos_token": None,
        "chat_template": chat,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })


# llama.cpp's vocab file is Llama 3.0's; 3.1+ renamed 128004/128008/128010 and renumbered the rest
LLAMA31_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
     "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])


def _write_llama3_tokenizer(out: Path) -> None:
    from tokenizers import processors

    tokens, merges = _bpe("ggml-vocab-llama-bpe.gguf")
    assert len(tokens) == 128256 and tokens[128000] == "<|begin_of_text|>"
    added = [(t, True) for t in LLAMA31_SPECIALS]
    tk = _bpe_tokenizer(tokens[:128000], merges, added, regex=LLAMA3_REGEX, nfc=False, ignore_merges=True,
                        trim_offsets=True)
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A:0", pair="<|begin_of_text|> $A:0 <|begin_of_text|>:1 $B:1",
            special_tokens=[("<|begin_of_text|>", 128000)]),
    ])
    tk.save(str(out / "tokenizer.json"))
    chat = (llama_cpp_models() / "templates" / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text(encoding="utf-8")
    _dump(out / "tokenizer_config.json", {
        "added_tokens_decoder": _added_decoder([(128000 + i, c, True) for i, (c, _) in enumerate(added)]),
        "bos_token": "<|begin_of_text|>",
        "chat_template": chat,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
    _dump(out / "special_tokens_map.json",
          {"bos_token": _map_entry("<|begin_of_text|>"), "eos_token": _map_entry("<|eot_id|>")})


def _write_gpt2_tokenizer(out: Path) -> None:
    tokens, merges = _bpe("ggml-vocab-gpt-2.gguf")
    assert len(tokens) == 50257 and tokens[-1] == "<|endoftext|>"
    _write_vocab_merges(out, tokens, merges)
    _dump(out / "tokenizer_config.json", {"model_max_length": 1024})


def _write_neox_tokenizer(out: Path) -> None:
    tokens, merges = _bpe("ggml-vocab-gpt-neox.gguf")
    tokens = tokens[:50277]  # the rest are llama.cpp's [PAD] rows up to the 50432 embedding
    assert tokens[0] == "<|endoftext|>" and tokens[1] == "<|padding|>" and tokens[50276] == "  "
    tk = _bpe_tokenizer(tokens[:50254], merges, [], regex=None, nfc=True)
    from tokenizers import AddedToken

    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False),
                           AddedToken("<|padding|>", special=True, normalized=False)])
    tk.add_tokens([AddedToken(t, special=False, normalized=True) for t in tokens[50254:]])
    tk.save(str(out / "tokenizer.json"))
    _dump(out / "tokenizer_config.json", {
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "name_or_path": "EleutherAI/gpt-neox-20b",
        "tokenizer_class": "GPTNeoXTokenizer",
        "unk_token": "<|endoftext|>",
    })
    _dump(out / "special_tokens_map.json",
          {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})


# ---------------------------------------------------------------------------------------------
# builders: one per layout, each writes config, weights, tokenizer and generation config


def _config(out: Path, layout_id: str, **values: Any) -> dict[str, Any]:
    """Write the published config.json; ``values`` replace existing keys in place (the
    vocabulary size of a tokenizer trained on the fly)."""
    cfg = published_config(layout_id)
    assert set(values) <= set(cfg), set(values) - set(cfg)
    cfg.update(values)
    _dump(out / "config.json", cfg)
    return cfg


def _drop_tied(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sd.items() if k != "lm_head.weight"}


def _build_gemma3_1b(out: Path, texts: list[str], seed: int) -> None:
    import torch

    n = _write_gemma_tokenizer(out, texts, gemma3=True, vocab=published_config("gemma3-1b")["vocab_size"])
    cfg = _config(out, "gemma3-1b", vocab_size=n)
    model = _model(cfg, seed)
    _save_weights(out, _cast(_drop_tied(model.state_dict()), torch.bfloat16))
    _dump(out / "generation_config.json", {
        "bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
        "pad_token_id": 0, "top_k": 64, "top_p": 0.95, "transformers_version": "4.50.0.dev0"})


def _build_gemma3_4b(out: Path, texts: list[str], seed: int) -> None:
    import torch

    cfg = _config(out, "gemma3-4b")
    _write_gemma_tokenizer(out, texts, gemma3=True, vocab=1024, image_tokens=True)
    model = _model(cfg, seed, vision=True)
    sd = {}
    for k, v in _drop_tied(model.state_dict()).items():
        # transformers 5 names -> the hub's (4.50) names
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model.vision_tower.") and not k.startswith("model.vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("model.vision_tower."):]
        elif k.startswith("model."):
            k = k[len("model."):]
        sd[k] = v
    _save_weights(out, _cast(sd, torch.bfloat16), shards=2)
    _dump(out / "generation_config.json", {
        "bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True, "eos_token_id": [1, 106],
        "pad_token_id": 0, "top_k": 64, "top_p": 0.95, "transformers_version": "4.50.0.dev0"})
    v = cfg["vision_config"]
    _dump(out / "preprocessor_config.json", {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_pan_and_scan": None,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": cfg["mm_tokens_per_image"],
        "image_std": [0.5, 0.5, 0.5],
        "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None,
        "processor_class": "Gemma3Processor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": v["image_size"], "width": v["image_size"]},
    })
    _dump(out / "processor_config.json",
          {"image_seq_length": cfg["mm_tokens_per_image"], "processor_class": "Gemma3Processor"})


def _build_gemma_2b(out: Path, texts: list[str], seed: int) -> None:
    import torch

    n = _write_gemma_tokenizer(out, texts, gemma3=False, vocab=published_config("gemma-2b")["vocab_size"])
    cfg = _config(out, "gemma-2b", vocab_size=n)
    model = _model(cfg, seed)
    _save_weights(out, _cast(_drop_tied(model.state_dict()), torch.bfloat16), shards=2)
    _dump(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
        "transformers_version": "4.38.0.dev0"})


def _neox_state(model, cfg: dict[str, Any], dtype) -> dict[str, Any]:
    """transformers 5's GPT-NeoX state dict under the 4.2x names, with the old buffers."""
    import torch

    sd: dict[str, Any] = {}
    n_pos = cfg["max_position_embeddings"]
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    rot = int(head * cfg["rotary_pct"])
    inv_freq = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    mask = torch.tril(torch.ones((n_pos, n_pos), dtype=torch.bool)).view(1, 1, n_pos, n_pos)
    for k, v in _cast(model.state_dict(), dtype).items():
        if k == "lm_head.weight":
            k = "embed_out.weight"
        sd[k] = v
        if k.endswith(".input_layernorm.bias"):
            p = k[: -len("input_layernorm.bias")] + "attention."
            sd[p + "bias"] = mask.clone()
            sd[p + "masked_bias"] = torch.tensor(-1e9).to(dtype)
            sd[p + "rotary_emb.inv_freq"] = inv_freq.to(dtype)
    return sd


def _build_rinna_neox(out: Path, texts: list[str], seed: int) -> None:
    import torch

    n = _write_rinna_tokenizer(out, texts, RINNA_VOCAB, lower=False)
    cfg = _config(out, "rinna-neox-3.6b", vocab_size=n)
    model = _model(cfg, seed)
    _save_weights(out, _neox_state(model, cfg, torch.float16))


def _gpt2_state(model, cfg: dict[str, Any], *, prefix: bool, old_buffers: bool) -> dict[str, Any]:
    import torch

    n = cfg["n_positions"]
    sd: dict[str, Any] = {}
    for k, v in _cast(_drop_tied(model.state_dict()), torch.float32).items():
        if not prefix:
            k = k[len("transformer."):]
        sd[k] = v
        if k.endswith(".ln_1.bias"):
            p = k[: -len("ln_1.bias")] + "attn."
            if old_buffers:  # transformers 4.x (2021): uint8 causal mask + masked_bias
                sd[p + "bias"] = torch.tril(torch.ones((n, n), dtype=torch.uint8)).view(1, 1, n, n)
                sd[p + "masked_bias"] = torch.tensor(-1e4)
            else:  # the 2019 checkpoint: a float causal mask only
                sd[p + "bias"] = torch.tril(torch.ones((n, n))).view(1, 1, n, n)
    return sd


def _build_rinna_gpt2(out: Path, texts: list[str], seed: int) -> None:
    n = _write_rinna_tokenizer(out, texts, RINNA_VOCAB, lower=True)
    cfg = _config(out, "rinna-gpt2-medium", vocab_size=n)
    model = _model(cfg, seed)
    _save_weights(out, _gpt2_state(model, cfg, prefix=True, old_buffers=True))


def _build_gpt2(out: Path, texts: list[str], seed: int) -> None:
    cfg = _config(out, "gpt2")
    _write_gpt2_tokenizer(out)
    model = _model(cfg, seed)
    _save_weights(out, _gpt2_state(model, cfg, prefix=False, old_buffers=False))
    _dump(out / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": 50256, "eos_token_id": 50256,
        "transformers_version": "4.26.0.dev0"})


def _build_pythia(out: Path, texts: list[str], seed: int) -> None:
    import torch

    cfg = _config(out, "pythia")
    _write_neox_tokenizer(out)
    model = _model(cfg, seed)
    _save_weights(out, _neox_state(model, cfg, torch.float16))


def _build_elyza(out: Path, texts: list[str], seed: int) -> None:
    import torch

    cfg = _config(out, "elyza-llama2-7b")
    _write_llama2_tokenizer(out)
    model = _model(cfg, seed)
    head = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head, 2, dtype=torch.float32) / head))
    sd: dict[str, Any] = {}
    for k, v in _cast(model.state_dict(), torch.float16).items():
        sd[k] = v
        if k.endswith(".self_attn.o_proj.weight"):
            sd[k[: -len("o_proj.weight")] + "rotary_emb.inv_freq"] = inv_freq.to(torch.float16)
    _save_weights(out, sd, shards=2)


def _build_qwen(out: Path, seed: int, *, qwen3: bool) -> None:
    import torch

    lid = "qwen3" if qwen3 else "qwen2.5"
    cfg = _config(out, lid)
    _write_qwen_tokenizer(out, qwen3=qwen3)
    model = _model(cfg, seed)
    sd = model.state_dict()
    if not qwen3:
        sd = _drop_tied(sd)
    _save_weights(out, _cast(sd, torch.bfloat16))
    if qwen3:
        gen = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
               "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
               "transformers_version": "4.51.0"}
    else:
        gen = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
               "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
               "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
    _dump(out / "generation_config.json", gen)


def _build_llama32(out: Path, texts: list[str], seed: int) -> None:
    import torch

    cfg = _config(out, "llama-3.2")
    _write_llama3_tokenizer(out)
    model = _model(cfg, seed)
    _save_weights(out, _cast(_drop_tied(model.state_dict()), torch.bfloat16))
    _dump(out / "generation_config.json", {
        "bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
        "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0"})


_BUILDERS: dict[str, Callable[[Path, list[str], int], None]] = {
    "gemma3-1b": _build_gemma3_1b,
    "gemma3-4b": _build_gemma3_4b,
    "gemma-2b": _build_gemma_2b,
    "rinna-neox-3.6b": _build_rinna_neox,
    "rinna-gpt2-medium": _build_rinna_gpt2,
    "gpt2": _build_gpt2,
    "pythia": _build_pythia,
    "elyza-llama2-7b": _build_elyza,
    "qwen3": lambda out, texts, seed: _build_qwen(out, seed, qwen3=True),
    "qwen2.5": lambda out, texts, seed: _build_qwen(out, seed, qwen3=False),
    "llama-3.2": _build_llama32,
}
assert set(_BUILDERS) == set(LAYOUTS)


def build(layout_id: str, out: Path, texts: list[str] | None = None, *, seed: int = 0) -> Path:
    """Write the tiny model of ``layout_id`` (a key of :data:`LAYOUTS`) to ``out`` and return it.

    ``texts``: the corpus SentencePiece tokenizers are trained on where no real vocabulary is
    available (default: every string of examples/data/nya_chat and general train.jsonl)."""
    if layout_id not in LAYOUTS:
        raise KeyError(f"unknown layout {layout_id!r}; known: {', '.join(LAYOUTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _BUILDERS[layout_id](out, list(texts) if texts is not None else default_texts(), seed)
    return out
