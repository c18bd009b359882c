"""Which published checkpoints macft trains and exports: the conformance table.

One row per checkpoint layout that macft's users fine-tune, as published on the Hugging Face
hub (config.json keys, weight names and tokenizer files as the repository ships them). Every
row is proven by the conformance suite (``tests/checkpoints/test_conformance.py``), which
builds a tiny random-init model in exactly that layout and runs it end to end: ``macft train``
on each backend, the adapter loaded by peft, ``macft export --quant q4_k_m``, and llama.cpp
answering held-out prompts with the learned reply and stopping. A cell that is not "yes" is
the refusal macft gives at start (its message contains the text after "no: "). The README's
"Models" table is generated from this one (:func:`models_markdown`), and a test keeps them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

YES = "yes"


@dataclass(frozen=True)
class Checkpoint:
    layout: str  # tests/checkpoints/layouts.py id
    hub_id: str
    architecture: str
    chat_template: str  # what `macft train` renders with: "model" (its own) or --chat-template NAME
    mlx: str  # YES, or "no: <the refusal>"
    cuda: str
    export: str
    note: str = ""


CHECKPOINTS: tuple[Checkpoint, ...] = (
    Checkpoint("gemma3-1b", "google/gemma-3-1b-it", "Gemma3ForCausalLM", "model", YES, YES, YES),
    Checkpoint("gemma3-4b", "google/gemma-3-4b-it", "Gemma3ForConditionalGeneration", "model", YES, YES, YES,
               "text-only LoRA on the language model; export keeps the vision tower as an mmproj GGUF"),
    Checkpoint("gemma-2b", "google/gemma-2b", "GemmaForCausalLM", "alpaca", YES, YES, YES,
               "base model, no chat template: alpaca format"),
    Checkpoint("rinna-neox-3.6b", "rinna/japanese-gpt-neox-3.6b-instruction-sft", "GPTNeoXForCausalLM", "rinna",
               YES, YES, "no: reads the vocabulary of GPT-NeoX models only as byte-level BPE",
               "SentencePiece spiece.model only; rinna's 'ユーザー: ...<NL>システム: ...' format"),
    Checkpoint("rinna-gpt2-medium", "rinna/japanese-gpt2-medium", "GPT2LMHeadModel", "rinna",
               YES, YES, "no: reads the vocabulary of GPT-2 models only as byte-level BPE",
               "SentencePiece spiece.model only; weights under transformer.*"),
    Checkpoint("gpt2", "openai-community/gpt2", "GPT2LMHeadModel", "fallback", YES, YES, YES,
               "vocab.json + merges.txt; Conv1D projections (fan_in_fan_out)"),
    Checkpoint("pythia", "EleutherAI/pythia-160m-deduped", "GPTNeoXForCausalLM", "fallback", YES, YES, YES,
               "partial rotary (rotary_pct 0.25), transformers-4.24 config keys"),
    Checkpoint("elyza-llama2-7b", "elyza/ELYZA-japanese-Llama-2-7b-instruct", "LlamaForCausalLM", "llama2",
               YES, YES, YES, "SentencePiece tokenizer.model only, no chat template: Llama-2's [INST] format"),
    Checkpoint("qwen3", "Qwen/Qwen3-0.6B", "Qwen3ForCausalLM", "model", YES, YES, YES,
               "thinking-mode chat template"),
    Checkpoint("qwen2.5", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen2ForCausalLM", "model", YES, YES, YES),
    Checkpoint("llama-3.2", "meta-llama/Llama-3.2-1B-Instruct", "LlamaForCausalLM", "model", YES, YES, YES,
               "tokenizer.json only, <|eot_id|>"),
)


def by_layout(layout: str) -> Checkpoint:
    for c in CHECKPOINTS:
        if c.layout == layout:
            return c
    raise KeyError(layout)


def _md(value: str) -> str:
    return "yes" if value == YES else value.replace("|", "\\|")


def models_markdown() -> str:
    """The README's "Models" table."""
    lines = ["| checkpoint (published layout) | architecture | chat template | MLX | PyTorch | export (GGUF) | notes |",
             "|---|---|---|---|---|---|---|"]
    for c in CHECKPOINTS:
        template = "its own" if c.chat_template == "model" else f"`--chat-template {c.chat_template}`"
        lines.append(f"| {c.hub_id} | {c.architecture} | {template} | {_md(c.mlx)} | {_md(c.cuda)} | "
                     f"{_md(c.export)} | {c.note.replace('|', '/')} |")
    return "\n".join(lines)
