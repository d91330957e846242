"""Command-line tools around `ref.weights`, each runnable as `python -m weights_tools.<name> --help`.

- `inspect`: a checkpoint's detected layout, tensor and parameter counts per part, dtypes, files, config summary.
- `make_tiny`: a tiny random LLaVA checkpoint (config.json, model.safetensors, tokenizer.json) for tests and smoke runs.
- `convert_original`: the original LLaVA release (+ its CLIP folder) -> a llava-hf layout folder.
"""
