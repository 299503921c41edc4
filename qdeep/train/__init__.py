"""CNN training on Ray Train: `worker.py` is what each worker runs, `driver.py` how many, where."""
