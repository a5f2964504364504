"""robosuite's control step without the physics work it repeats, to the bit.

Each of robosuite's 25 physics substeps per env step runs MuJoCo's whole forward pass three times on one state:
`sim.forward()` at the top of the substep, again in the arm controller's `update()`, and once more inside
`mj_step`. The position and velocity stages (kinematics, collisions, the mass matrix: what the controller reads) give
the same numbers every time, since nothing moves in between; only the later stages (actuation, acceleration, the
constraint solver) can differ, because the solver starts from `qacc_warmstart`, which each forward pass rewrites
(MuJoCo 3), and the actuation reads the controls the controller has just set.

So while `fewer_forwards` is active, a forward pass on a state that has not changed since the last one recomputes
only those later stages (`mj_forwardSkip` from the velocity stage), and a step on such a state runs those stages and
the integration (`mj_step2`). Each call still happens, in order, so the warm starts, and with them every state, are
those of robosuite's own loop bit for bit (tested on LIBERO-Spatial and LIBERO-Object episodes). "Not changed" is
checked, not assumed: positions, velocities and mocap poses (what the skipped stages read of the data) are compared
with those of the last full forward pass, and any difference gets a full one; the model itself is taken to stay as
it is. Measured side by side (`python -m ript_ablate.bench.libero_step`: an expert episode then random actions, 200
steps alternating between two environments; two runs on a busy machine): 0.76-0.79 of robosuite's time per env step
on LIBERO-Spatial's first task, 0.82-0.84 on LIBERO-Object's; the rest is mostly robosuite's controller in Python
and the constraint solver, which still runs three times.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


class _Skipper:
    """`forward` and `step` for one robosuite `MjSim`, skipping the stages whose inputs have not changed."""

    def __init__(self, sim: Any):
        import mujoco

        self.mujoco = mujoco
        self.model = sim.model._model
        self.data = sim.data._data
        self.seen: np.ndarray | None = None  # the state the last full forward pass ran on

    def _state(self) -> np.ndarray:
        """What the position and velocity stages read of the data (controls, activations and applied forces enter
        only the later stages, which always run)."""
        d = self.data
        return np.concatenate([d.qpos, d.qvel, d.mocap_pos.ravel(), d.mocap_quat.ravel()])

    def forward(self) -> None:
        state = self._state()
        if self.seen is not None and np.array_equal(self.seen, state):
            self.mujoco.mj_forwardSkip(self.model, self.data, self.mujoco.mjtStage.mjSTAGE_VEL, 0)
        else:
            self.mujoco.mj_forward(self.model, self.data)
            self.seen = state  # (a forward pass moves nothing: the state it ran on is the one read before it)

    def step(self, with_udd: bool = True) -> None:
        if self.seen is not None and np.array_equal(self.seen, self._state()):
            self.mujoco.mj_checkPos(self.model, self.data)  # as mj_step does: a state gone bad is reset, warned
            self.mujoco.mj_checkVel(self.model, self.data)
            self.mujoco.mj_step2(self.model, self.data)
        else:
            self.mujoco.mj_step(self.model, self.data)
        self.seen = None


@contextmanager
def fewer_forwards(sim: Any) -> Iterator[None]:
    """Within the block, `sim.forward()` and `sim.step()` skip what an unchanged state makes repeated work."""
    skipper = _Skipper(sim)
    sim.forward, sim.step = skipper.forward, skipper.step
    try:
        yield
    finally:
        del sim.forward, sim.step
