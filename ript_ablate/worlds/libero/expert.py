"""A scripted pick-and-place expert for LIBERO from privileged object poses (LIBERO ships no demonstrations here).

Phases: above the object at carry height, down to the grasp point (position first), close, lift (pulling the object
towards the robot first if something above blocks it), carry over the goal keeping the grasp's offset, lower, open;
a grasp that closed on nothing or lost the object starts again (at most twice). Positions are steered with a
proportional step on OSC_POSE's position deltas (one full action moves the gripper about 1 cm per step at 20 Hz);
the gripper stays top-down, turned about the vertical only where a plan asks.
Where to grasp depends on the object: a bowl by its rim (its centre is too low and wide for the fingers), the
grocery items of LIBERO-Object around their middle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OPEN, CLOSED = -1.0, 1.0
POSITION_GAIN = 100.0  # action per metre of error: saturates (1.0) beyond 1 cm
MISSED_GRASP_OPENING = 0.004  # finger joint (m) below which the gripper closed on nothing
MAX_REGRASPS = 2
CLOSE_STEPS = 12  # steps the gripper takes to close on an object
WITHDRAW = np.array([-0.10, 0.0, 0.0])  # towards the robot's base
DROPPED = 0.03  # the object moved this far (m) from where the hand holds it: it slipped out


@dataclass(frozen=True)
class GraspPlan:
    """Where the fingers close relative to the object's body position, and how high the object is released above
    the goal's body position."""

    grasp_offset: tuple[float, float, float]
    release_height: float = 0.05
    carry_height: float = 0.12
    yaw: float = 0.0  # turn the gripper about the vertical by this much (rad) before grasping


# By object category (the object name without its instance number, e.g. "akita_black_bowl").
# LIBERO-Object's grocery items: grasped at their body position, released 15 cm above the basket's so that the tall
# ones (milk, juice, bottles) clear its rim while carried.
GROCERY_PLAN = GraspPlan(grasp_offset=(0.0, 0.0, 0.0), release_height=0.15)
GRASP_PLANS: dict[str, GraspPlan] = {
    "akita_black_bowl": GraspPlan(grasp_offset=(0.0, 0.045, 0.03)),
    **{item: GROCERY_PLAN for item in (
        "alphabet_soup", "cream_cheese", "salad_dressing", "bbq_sauce", "ketchup", "tomato_sauce", "butter", "milk",
        "chocolate_pudding", "orange_juice")},
}
# Tasks whose scene needs another grasp than their object's usual one: the bowl in the cabinet's top drawer sits
# under the cabinet's top, which stops the fingers above its far rim, so it is taken by the rim nearest the robot
# with the gripper turned a quarter (its fingers then close across that rim).
TASK_PLANS: dict[str, GraspPlan] = {
    "pick_up_the_black_bowl_in_the_top_drawer_of_the_wooden_cabinet_and_place_it_on_the_plate":
        GraspPlan(grasp_offset=(-0.045, 0.0, 0.03), yaw=np.pi / 2),
}
PICK_AND_PLACE_PREDICATES = ("on", "in")


def category(obj: str) -> str:
    head, _, tail = obj.rpartition("_")
    return head if tail.isdigit() else obj


def grasp_plan(task: str, predicates: list[list[str]], obj: str) -> GraspPlan | None:
    """The expert's plan for a task, or None where it has none: one `on`/`in` goal whose object it can grasp."""
    if len(predicates) != 1 or predicates[0][0] not in PICK_AND_PLACE_PREDICATES:
        return None
    return TASK_PLANS.get(task) or GRASP_PLANS.get(category(obj))


@dataclass
class PickPlaceExpert:
    """The expert's state for one episode; `act` reads LIBERO's raw observation dict."""

    obj: str
    goal: str
    plan: GraspPlan
    phase: str = "approach"
    count: int = 0
    heights: list[float] = field(default_factory=list)
    retries: int = 0
    start_yaw: float | None = None
    grasp_z: float = 0.0
    withdrawn: bool = False
    withdraw_to: np.ndarray = field(default_factory=lambda: np.zeros(3))
    grip_offset: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def carry_z(self, goal: np.ndarray, grasp: np.ndarray) -> float:
        """High enough to clear the goal and whatever the object stood in (a drawer, a box)."""
        return max(goal[2] + self.plan.release_height, self.grasp_z) + self.plan.carry_height

    def yaw_action(self, quat: np.ndarray) -> float:
        """Hold the gripper at its starting yaw plus the plan's turn (OSC_POSE's rotation deltas, 0.5 rad per unit)."""
        x, y, z, w = quat
        yaw = np.arctan2(2 * (x * y + w * z), 1 - 2 * (y * y + z * z))
        if self.start_yaw is None:
            self.start_yaw = float(yaw)
        error = (self.start_yaw + self.plan.yaw - yaw + np.pi) % (2 * np.pi) - np.pi
        return float(np.clip(2.0 * error, -1.0, 1.0))

    def act(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        eef = np.asarray(raw["robot0_eef_pos"], dtype=np.float64)
        obj = np.asarray(raw[f"{self.obj}_pos"], dtype=np.float64)
        goal = np.asarray(raw[f"{self.goal}_pos"], dtype=np.float64)
        grasp = obj + self.plan.grasp_offset
        held = eef - obj  # the gripper's offset from the object once it is held
        gripper = CLOSED
        target = eef
        if self.phase == "approach":
            gripper, target = OPEN, grasp + (0.0, 0.0, self.plan.carry_height)
            if np.linalg.norm((target - eef)[:2]) < 0.01:
                self.phase = "descend"
        if self.phase == "descend":  # xy first: the fingers must come down beside the rim, not on it
            gripper, target = OPEN, grasp.copy()
            if np.linalg.norm((grasp - eef)[:2]) > 0.006:
                target[2] = eef[2]
            else:  # stalled: the fingers rest on something, so close where they are
                self.heights.append(float(eef[2]))
            stalled = len(self.heights) > 4 and self.heights[-4] - self.heights[-1] < 0.002
            if abs(grasp[2] - eef[2]) < 0.008 or stalled:
                self.phase = "close"
        if self.phase == "close":
            target = grasp
            self.count += 1
            if self.count >= CLOSE_STEPS:
                if raw["robot0_gripper_qpos"][0] < MISSED_GRASP_OPENING and self.retries < MAX_REGRASPS:
                    self.phase, self.count, self.heights = "reopen", 0, []  # closed on nothing: try again
                    self.retries += 1
                else:
                    self.phase, self.grip_offset, self.grasp_z = "lift", held, float(grasp[2])
                    self.heights = []
        if self.phase == "reopen":
            gripper, target = OPEN, eef + (0.0, 0.0, 0.02)
            self.count += 1
            if self.count >= 6:
                self.phase, self.count = "approach", 0
        if self.phase in ("lift", "withdraw", "carry", "lower") and np.linalg.norm(held - self.grip_offset) > DROPPED \
                and self.retries < MAX_REGRASPS:  # the object slipped out of the hand: pick it up again
            self.phase, self.count, self.heights = "reopen", 0, []
            self.retries += 1
        if self.phase == "lift":
            target = np.array([eef[0], eef[1], self.carry_z(goal, grasp)])
            self.heights.append(float(eef[2]))
            if eef[2] > target[2] - 0.02:
                self.phase = "carry"
            elif len(self.heights) > 6 and self.heights[-6] - self.heights[-1] > -0.003 and not self.withdrawn:
                # blocked from above (a bowl in a drawer under the cabinet's top): pull it out towards the robot
                self.phase, self.withdraw_to, self.withdrawn, self.count = "withdraw", eef + WITHDRAW, True, 0
        if self.phase == "withdraw":
            target = self.withdraw_to
            self.count += 1
            if np.linalg.norm(target - eef) < 0.01 or self.count > 40:
                self.phase, self.heights = "lift", []
        if self.phase == "carry":
            target = np.array([goal[0] + held[0], goal[1] + held[1],
                               self.carry_z(goal, grasp)])
            if np.linalg.norm((target - eef)[:2]) < 0.01:
                self.phase = "lower"
        if self.phase == "lower":
            target = np.array([goal[0] + held[0], goal[1] + held[1], goal[2] + self.plan.release_height + held[2]])
            if abs(target[2] - eef[2]) < 0.01:
                self.phase, self.count = "release", 0
        if self.phase == "release":
            gripper, target = OPEN, eef
            self.count += 1
            if self.count > 8:
                self.phase = "retreat"
        if self.phase == "retreat":
            gripper, target = OPEN, eef + (0.0, 0.0, 0.05)
        action = np.zeros(7, dtype=np.float32)
        action[:3] = np.clip((target - eef) * POSITION_GAIN, -1.0, 1.0)
        if self.plan.yaw:
            action[5] = self.yaw_action(np.asarray(raw["robot0_eef_quat"], dtype=np.float64))
        action[6] = gripper
        return action

