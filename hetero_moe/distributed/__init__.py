"""Scale out: a model's layers as pipeline stages on Ray actors (models larger than one host's
DRAM), and whole-model replicas behind Ray Serve.

    split.py     contiguous stages by the planner's byte accounting; the per-token prediction for
                 a cluster (`hetero-moe plan --stages N`)
    stage.py     one stage: maps only its own tensors, runs its layers, a KV cache per sequence
    pipeline.py  the driver: stage actors, micro-batched decode, failures (StageError)
    replicas.py  `hetero-moe serve --replicas R` on Ray Serve

Ray is optional (pip install 'hetero-moe[ray]'); nothing here imports it until it is used.
"""
from .split import StageSpec, StageSplit, plan_stages, predict_cluster, split_stages


def load_staged(*args, **kwargs):
    """hetero_moe.load(path, stages=N, cluster=...): see pipeline.load_staged."""
    from .pipeline import load_staged as _load
    return _load(*args, **kwargs)


__all__ = ["StageSpec", "StageSplit", "load_staged", "plan_stages", "predict_cluster",
           "split_stages"]
