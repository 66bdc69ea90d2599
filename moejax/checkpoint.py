"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's state."""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from moejax.errors import UserError


class Checkpointer:
    """`WORKDIR/checkpoints/<step>/{state,data}`; saves are atomic (orbax writes to a temporary
    directory and renames), the last `keep` are kept, and writes are asynchronous where the backend
    allows (call `wait()` before exiting)."""

    def __init__(self, directory: str, keep: int = 3):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the shapes/dtypes/shardings of `abstract_state` (a pytree of arrays or
        ShapeDtypeStructs). Returns (state, data_state)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {self.directory}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Restore only `state["params"]` (a partial restore): what inference, analysis and
        conversion need, whatever optimizer state the run was saved with."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint in {self.directory}")
        item = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_params)}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
        return restored.state["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
