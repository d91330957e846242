"""The embedded toy: a synthetic world in which a 1.75M-parameter LLaVA shows textual unlearning on a laptop.

    world.py      the world: tasks, harmful topics, responses, the train / held-out split, suites, unlearning data
    images.py     its images: a 3x5 bitmap font, one word per patch cell, drawn shapes
    tokenizer.py  its tokenizer, learned on every sentence of the world
    judges.py     its two judges: refusal phrases (`toy`) and harmful steps given (`toy_harm`)
    build.py      `python -m toy.build`: trains the toy LLaVA from scratch into assets/toy_llava
    defaults.py   what a bare `python train.py` / `python eval.py` takes from here
    table.py      `python -m toy.table`: eval.py's report over several seeds, as mean and range
    smollm2.py    `python -m toy.smollm2`: the second world, a real language model (SmolLM2-135M-Instruct, from
                  `python -m weights_tools.smollm2`) on the public data sets: the fixed split, the unlearning records
                  (the base's own harmful answers), the held-out suites

The toy imports `ref` and `evals`; nothing in them imports the toy.
"""
