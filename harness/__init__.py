"""What every program needs around the method: train.py, eval.py, evals/sweep.py and the tools share it.

    console.py         progress lines, one-line user errors (exit status 2), the number types of the options
    files.py           atomic writes, new output folders, the run-folder check every program's --out goes through
    readers.py         the strict CSV, JSON and JSONL readers (one per format; errors name the file and line)
    devices.py         the device policy: which --device this torch can use, the default compute dtype
    provenance.py      date, git commit, package versions and the sha256 of a run's inputs
    models.py          the base model as the programs load it (one `load_base`)
    runs.py            a train.py run folder: its files, the training checkpoint, reading a run back
    train_options.py   train.py's options: the TrainOptions record, its command line, resume's option merging
    train_run.py       a training run in its folder: begun or resumed, logged, checkpointed, its outputs and summary
    train_console.py   what train.py prints while it trains: the announcement, the progress line, why it stopped
    signals.py         a stop asked of a running program (Ctrl-C, SIGTERM): finish the step, checkpoint, exit
    memory.py          the memory a training step used, as its log reports it
    eval_folder.py     an eval.py run folder: run.json, the appended responses, starting or resuming, reading back
    unlearning_data.py the unlearning JSONL's reader and writer, and converters from public data sets

ref/ (the method) imports nothing from here; the harness imports ref/ only.
"""
