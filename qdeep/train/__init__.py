"""CNN training on Ray Train: `worker.py` is what each worker runs, `driver.py` how many, where."""

CNN_KIND = "cnn"  # config.json "kind" of models exported by `qdeep train`
