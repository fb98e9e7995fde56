"""Mesh, logical-axis rules, batch sharding and multi-host start-up."""

from rlhf_jax.parallel.distributed import initialize, is_main_process
from rlhf_jax.parallel.mesh import (
    MESH_AXES,
    SAMPLE_RULES,
    TRAIN_RULES,
    axis_rules,
    batch_sharding,
    check_batch_divisible,
    current_rules,
    data_parallel_axes,
    host_local_to_global,
    logical_to_spec,
    make_mesh,
    replicated,
    reshard,
    state_shardings,
    with_logical_constraint,
)

__all__ = [
    "MESH_AXES", "SAMPLE_RULES", "TRAIN_RULES", "axis_rules", "batch_sharding", "check_batch_divisible",
    "current_rules", "data_parallel_axes", "host_local_to_global", "initialize", "is_main_process",
    "logical_to_spec", "make_mesh", "replicated", "reshard", "state_shardings",
    "with_logical_constraint",
]
