"""The architectures macft trains with MLX (no imports: the README table and `macft models`
read it without MLX installed). What each needs is in :mod:`.architectures`."""

# transformers model_type -> what it covers
SUPPORTED: dict[str, str] = {
    "gemma3_text": "Gemma-3 1B (Gemma3ForCausalLM)",
    "gemma3": "Gemma-3 4B/12B/27B, text part (Gemma3ForConditionalGeneration; the vision tower is not loaded)",
    "gemma": "Gemma 1 (GemmaForCausalLM)",
    "llama": "Llama-2, Llama-3.x (LlamaForCausalLM, incl. llama3 rope scaling)",
    "mistral": "Mistral (MistralForCausalLM)",
    "qwen2": "Qwen2 / Qwen2.5 (Qwen2ForCausalLM)",
    "qwen3": "Qwen3 dense (Qwen3ForCausalLM)",
    "gpt_neox": "GPT-NeoX: Pythia, rinna japanese-gpt-neox (GPTNeoXForCausalLM)",
    "gpt2": "GPT-2: openai-community/gpt2, rinna japanese-gpt2 (GPT2LMHeadModel)",
}
