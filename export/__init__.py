"""Export a LoRA run to verified GGUF files for llama.cpp, Ollama and LM Studio.

One concern per module:

- :mod:`export.llama_cpp`  obtain, build and locate the pinned llama.cpp tools
- :mod:`export.job`  what to export, resolved and checked before anything is written
- :mod:`export.safetensors_io`  read and write safetensors shards tensor by tensor (numpy)
- :mod:`export.names`  adapter module names vs. base weight names across naming schemes
- :mod:`export.dequant`  reproduce the 4/8-bit base a QLoRA adapter was trained on
- :mod:`export.merge`  stream W + scale * B @ A through the base's shards
- :mod:`export.tokenizer_fix`  keep special tokens special in the merged copy
- :mod:`export.convert` / :mod:`export.quantize`  the llama.cpp converters and llama-quantize
- :mod:`export.gguf_info`  read a GGUF header (types, metadata) without llama.cpp's code
- :mod:`export.prompts`  validation prompts and evaluation tokens
- :mod:`export.reference`  the Hugging Face side of every comparison (torch, transformers)
- :mod:`export.verify`  run llama.cpp on every GGUF and compare with the reference
- :mod:`export.modelfile`  Ollama Modelfile and the export README
- :mod:`export.report`  the summary table
- :mod:`export.pipeline`  the steps in order, with safe temporary outputs
- :mod:`export.command`  the ``macft export`` and ``macft setup llama-cpp`` handlers
- :mod:`export.fixtures`  adapters and run directories for tests and benchmarks

Nothing here imports torch, transformers or mlx at module level.
"""
