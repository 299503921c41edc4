"""Ray Tune around Ray Train (the Train V2 pattern): each trial is a small Tune function that builds
and fits a TorchTrainer named after the trial, whose workers report through Tune, so one trial can
span several GPU workers; and the sweep's search space, scheduler and concurrency."""

from __future__ import annotations

from dataclasses import replace

from qdeep import tracking
from qdeep.config import SWEPT, Sweep, TrainConfig
from qdeep.distributed.driver import make_trainer
from qdeep.distributed.ingest import DATA_CPUS, DATA_RESERVE, training_datasets
from qdeep.distributed.prepare import TrainingData, loop_config
from qdeep.errors import QdeepError
from qdeep.parts import load_plugins

TRIAL_CPU = 0.01  # the Tune function only waits on its trainer; the workers hold the real resources
# Every Ray head has this resource (Ray pins its own Train and Data state actors to the head with it). A
# trial's driver asks for a sliver of it, so it runs on the head, which is on-demand in cluster.yaml, and
# not on a spot GPU node that would take the trial down with it; the workers still go where the GPUs are.
HEAD_RESOURCE = "node:__internal_head__"
TRIAL_RESOURCES = {"cpu": TRIAL_CPU, HEAD_RESOURCE: 0.001}


def param_space(space: dict) -> dict:
    """The sweep's space for Tune: lists become grids, {sampler: args} samplers, anything else fixed."""
    from ray import tune

    samplers = {"choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
                "loguniform": lambda a: tune.loguniform(*a)}
    out = {}
    for key, value in space.items():
        if isinstance(value, list):
            out[key] = tune.grid_search(value)
        elif isinstance(value, dict) and len(value) == 1:
            kind, arg = next(iter(value.items()))
            if kind not in samplers:
                raise QdeepError(f"sweep key {key!r}: unknown sampler {kind!r} (choice, uniform, loguniform)")
            out[key] = samplers[kind](arg)
        else:
            out[key] = value
    return out


def tune_trial(config: dict, data: TrainingData, settings: dict) -> None:
    """One trial: a Ray Train run named after the trial, reporting every epoch through Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    load_plugins(settings["plugins"])
    train_config = replace(TrainConfig(**settings["base"]), **{k: config[k] for k in SWEPT})  # paths made absolute
    run_id = tracking.child_run(settings["mlflow_uri"], settings["parent_run_id"], trial_id, f"trial-{trial_id}",
                                {**train_config.as_dict(), "trial_id": trial_id})
    name = f"{settings['name']}-{trial_id}"
    finished = _finished_run_metrics(f"{settings['storage_path']}/{name}", train_config.epochs)
    if finished:  # resumed after its last epoch: nothing to train, but Tune needs the result
        ray.tune.report(finished)
        return
    loop = loop_config(train_config, data, settings["mlflow_uri"], run_id, settings["plugins"])
    trainer = make_trainer(
        loop,
        workers=settings["workers_per_trial"],
        name=name,
        storage_path=settings["storage_path"],
        use_gpu=settings["gpus_per_trial"] > 0,
        cpus=worker_cpus(settings["gpus_per_trial"]),
        gpus=settings["gpus_per_trial"] // settings["workers_per_trial"],  # whole GPUs: see _check_gpus
        callbacks=[TuneReportCallback()],
        datasets=training_datasets(data, loop),
    )
    trainer.fit()


def _finished_run_metrics(run_path: str, epochs: int) -> dict | None:
    """The last metrics of a Ray Train run that already trained all its epochs, else None."""
    import ray.train

    try:
        metrics = ray.train.Result.from_path(run_path).metrics or {}
    except RuntimeError:  # no such run yet
        return None
    return metrics if int(metrics.get("epoch", -1)) + 1 >= epochs else None


def worker_cpus(gpus_per_trial: float) -> float:
    """A trial's worker asks for a CPU; on a CPU-only cluster a little less, so that the trials'
    Ray Data input tasks (`ingest.DATA_CPUS` each) find CPUs beside them."""
    return 1 if gpus_per_trial else 1 - DATA_CPUS


def concurrency(sweep: Sweep) -> int:
    """Trials that fit at once: each needs all its workers placed, or trials would hold their
    Tune slots while their workers wait for each other (CPU-only: `ingest.DATA_RESERVE` left free)."""
    import ray

    resources = ray.cluster_resources()
    free = resources.get("CPU", 1) - (0 if sweep.gpus_per_trial else DATA_RESERVE)
    fits = int(free // (sweep.workers_per_trial * worker_cpus(sweep.gpus_per_trial)))
    if sweep.gpus_per_trial:
        if not resources.get("GPU"):  # an autoscaling cluster starts GPU nodes once trials ask for them
            return sweep.max_concurrent or 1
        fits = min(fits, int(resources.get("GPU", 0) // sweep.gpus_per_trial))
    if fits < 1:
        raise QdeepError(f"one trial needs {sweep.workers_per_trial} CPU worker(s) and {sweep.gpus_per_trial} GPU(s); "
                         f"the cluster has {resources.get('CPU', 0)} CPUs, {resources.get('GPU', 0)} GPUs")
    return min(fits, sweep.max_concurrent or fits)


def scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler

    if sweep.scheduler == "none":
        return None
    if sweep.scheduler != "asha":
        raise QdeepError(f"unknown scheduler {sweep.scheduler!r} (asha or none)")
    return ASHAScheduler(time_attr="training_iteration", max_t=sweep.base.epochs, grace_period=sweep.grace_period,
                         reduction_factor=sweep.reduction_factor)
