"""The embedded worlds: what `python train.py` and `python eval.py` run on a laptop, models and data made here.

    toy/       the synthetic toy: a 1.76M-parameter LLaVA trained from scratch on a world written for this project
               (assets/toy_llava); the bare commands' default
    smollm2/   the SmolLM2 world: a real language model (SmolLM2-135M-Instruct, `python -m weights_tools.smollm2`)
               with a typographic tower (assets/smollm2_vision), on the public data sets' fixed split
    embedded.py  the one interface through which the programs learn a world's defaults (`world_of`)

Imports run one way: ref <- evals <- worlds <- the programs; nothing in ref or evals imports a world.
"""
