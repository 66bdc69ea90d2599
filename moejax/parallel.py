"""Device meshes, logical-axis sharding rules, sharded parameter creation, multi-host start-up.

The mesh has four axes, always in this order: `data`, `fsdp`, `expert`, `tensor`. The model names
only *logical* axes (on parameters: vocab, embed, heads, kv_heads, head_dim, mlp, exp, norm; on
activations: batch, length, act_embed). `RULES` maps each logical name to mesh axes; changing the
parallelism means changing the mesh sizes (or this table), never the model.

- data:   the batch is split; parameters are replicated.
- fsdp:   the batch is split and every parameter's `embed` dimension too (ZeRO-3 style: gathered
          for use, gradients reduce-scattered, all by XLA's SPMD partitioner).
- expert: the batch is split outside MoE blocks; inside, each device owns E / expert experts and
          tokens travel to them by all-to-all (moejax.model.moe_parallel).
- tensor: attention heads and FFN/expert hidden units are split (Megatron-style); the batch is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax.config import Config, MeshConfig, check_expert_parallel
from moejax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes the batch is split over

RULES: dict[str, tuple[str, ...] | None] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "exp": ("expert",),
    "norm": None,
    # activations
    "batch": BATCH_AXES,
    "length": None,
    "act_embed": None,
}


# ----------------------------------------------------------------------------------------------
# Mesh.


def mesh_shape(m: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve -1 and check that the axis sizes multiply to the device count."""
    sizes = dataclasses.asdict(m)
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    for name, v in sizes.items():
        if v == -1:
            if num_devices % known:
                raise ConfigError(f"mesh.{name} = -1 cannot fill {num_devices} devices: the other axes "
                                  f"multiply to {known}, which does not divide {num_devices}")
            sizes[name] = num_devices // known
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        raise ConfigError(f"mesh {sizes} has {total} devices but {num_devices} are available; "
                          "make the product of mesh.data, mesh.fsdp, mesh.expert, mesh.tensor equal "
                          "the device count (one axis may be -1)")
    return sizes


def check_mesh_fits_model(cfg: Config, sizes: dict[str, int]) -> None:
    e = cfg.model.moe.num_experts
    if sizes["expert"] > 1 and (e == 0 or e % sizes["expert"]):
        raise ConfigError(f"mesh.expert = {sizes['expert']} must divide model.moe.num_experts = {e}")
    check_expert_parallel(cfg.model.moe, sizes["expert"], sizes["tensor"])
    if cfg.train.batch_size % (sizes["data"] * sizes["fsdp"] * sizes["expert"]):
        n = sizes["data"] * sizes["fsdp"] * sizes["expert"]
        raise ConfigError(f"train.batch_size = {cfg.train.batch_size} must be a multiple of "
                          f"mesh.data * mesh.fsdp * mesh.expert = {n}")


def make_mesh(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg.mesh, len(devices))
    check_mesh_fits_model(cfg, sizes)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


# ----------------------------------------------------------------------------------------------
# Logical axes -> shardings.


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes`. A dimension that its mesh axes do not divide, or a mesh
    axis already used by an earlier dimension, stays unsplit (replicated) rather than failing."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        mesh_axes = RULES.get(name) if name is not None else None
        if mesh_axes and mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
            size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
            if shape is not None and shape[i] % size:
                mesh_axes = ()
        if not mesh_axes:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedSharding for every variable of an (abstract) nnx.State, from its logical_axes."""
    def one(var):
        axes = var.get_metadata().get("logical_axes")
        shape = var.value.shape
        spec = logical_to_spec(axes, shape, mesh) if axes else P()
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), None, mesh))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place this process's rows of the global batch on the mesh (rows split over the batch axes).
    Every process passes its own consecutive share of rows (the Packer's shard)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Activation constraints: a no-op unless a mesh is active (so single-device code is unchanged).

_ACTIVE: list[Mesh] = []


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Make `mesh` the one `constrain` (and the expert-parallel MoE) use while tracing."""
    _ACTIVE.append(mesh)
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.pop()


def active_mesh() -> Mesh | None:
    return _ACTIVE[-1] if _ACTIVE else None


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    mesh = active_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))


# ----------------------------------------------------------------------------------------------
# Many hosts.


def maybe_initialize_distributed() -> None:
    """Join a multi-process JAX system when the environment describes one: a TPU pod slice
    (`TPU_WORKER_HOSTNAMES`, or `MOEJAX_DISTRIBUTED=1` to let JAX detect it), `JAX_COORDINATOR_ADDRESS`
    + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`, or a SLURM job step with more than one task. On CPU the
    processes talk through gloo collectives."""
    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
    tpu_pod = env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
    # MOEJAX_DISTRIBUTED=1 (set by tpu/run.sh): initialise with JAX's own detection, which reads
    # a Cloud TPU VM's metadata when no environment variable describes the slice.
    forced = env.get("MOEJAX_DISTRIBUTED", "") == "1"
    if not (explicit or slurm or tpu_pod or forced):
        return
    if jax.config.jax_platforms in (None, "", "cpu") or env.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ConfigError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not")
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()
