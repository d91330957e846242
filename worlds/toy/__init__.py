"""The embedded toy: a synthetic world in which a 1.75M-parameter LLaVA shows textual unlearning on a laptop.

    world.py      the world: tasks, harmful topics, responses, the train / held-out split, suites, unlearning data
    images.py     its images: a 3x5 bitmap font, one word per patch cell, drawn shapes
    tokenizer.py  its tokenizer, learned on every sentence of the world
    judges.py     its two judges: refusal phrases (`toy`) and harmful steps given (`toy_harm`)
    build.py      `python -m worlds.toy.build`: trains the toy LLaVA from scratch into assets/toy_llava
    defaults.py   what a bare `python train.py` / `python eval.py` takes from here
    table.py      `python -m worlds.toy.table`: eval.py's report over several seeds, as mean and range

The toy imports `ref` and `evals`; nothing in them imports the toy. The programs reach it through
worlds/embedded.py.
"""
