"""Jobs: config -> workdir -> library calls -> checkpoints, metrics, reports.

One module per job (`lm`, `sae`; influence, steering and fine-tuning join them), each a
`run(config, workdir)` that the absl mains in `experiments/` call; `loop` is the training loop
they share and `workdir` the saved-config check that makes a resume compute what an
uninterrupted run would. Jobs sit above every science room and import them; nothing in
`interp` below this room imports a job.
"""
