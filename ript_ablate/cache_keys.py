"""Cache keys by what produces the cached thing: its settings *and its code*.

Demonstrations are keyed by the world's description and settings, the world's code (the built-in world's own
package, or a plug-in's whole top-level package: every file in it), the framework's demonstration code and the
simulator's version (which the world states in `describe()`). A behaviour-cloning base is keyed by its
demonstrations' key, the policy's settings and code, the behaviour-cloning code and torch's version. Nothing of
the RL algorithm enters either, so a change to the update or the rollouts keeps every cache.

Python files count by their syntax tree without docstrings (a comment, a docstring or a re-wrapped line changes no
key); every other file of a package counts byte for byte. A world or a policy factory may declare settings in
`suite.options` / `policy.options` that change nothing it produces as `inert_options` (a set of names): those are
left out of its keys.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Any

KEY_FORMAT = 3  # 3: keys include the producing code
FRAMEWORK_DEMO_CODE = ("ript_ablate.demos", "ript_ablate.episodes")
FRAMEWORK_BC_CODE = ("ript_ablate.bc", "ript_ablate.augment", "ript_ablate.device", "ript_ablate.interfaces.policy",
                     "ript_ablate.families")
# what of `suite` shapes demonstrations (the cameras and image size only when images are observed)
DEMO_SUITE_KEYS = ("name", "tasks", "demos_per_task", "seed", "options", "observation", "cameras", "image_size",
                   "demo_action_noise")
IMAGE_KEYS = ("cameras", "image_size")
POLICY_IMAGE_KEYS = ("image_tokens", "image_channels")
SKIPPED_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def digest(data: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:length]


def _normalised_python(source: bytes) -> bytes:
    """The syntax tree without docstrings; the raw bytes when the file does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False).encode()


def _files(module: str) -> list[tuple[str, Path]]:
    """(name inside the module, path) of every file of a package, or of a single module's file."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {module!r}")
    if spec.submodule_search_locations:
        files = []
        for root in map(Path, spec.submodule_search_locations):
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root)
                if (path.is_file() and not SKIPPED_DIRS & set(rel.parts) and path.suffix not in (".pyc", ".pyo")
                        and not any(p.endswith(".egg-info") for p in rel.parts)):
                    files.append((rel.as_posix(), path))
        return files
    return [(Path(spec.origin).name, Path(spec.origin))] if spec.origin and spec.origin != "built-in" else []


@lru_cache(maxsize=None)
def code_digest(*modules: str) -> str:
    """A digest of the code of these modules or packages (see the module docstring for what counts)."""
    sha = hashlib.sha256()
    for module in modules:
        for name, path in _files(module):
            raw = path.read_bytes()
            sha.update(f"{module}/{name}\0".encode())
            sha.update(_normalised_python(raw) if path.suffix == ".py" else raw)
    return sha.hexdigest()[:16]


def owning_package(obj: Any) -> str:
    """The code a plug-in's output depends on: a built-in's own sub-package (`ript_ablate.worlds.metaworld`), or
    the whole top-level package (or module) of a plug-in."""
    module = obj.__module__ if hasattr(obj, "__module__") else type(obj).__module__
    parts = module.split(".")
    if parts[0] == "ript_ablate" and len(parts) > 2:
        return ".".join(parts[:3])
    return parts[0]


def without_inert(options: dict[str, Any], owner: Any) -> dict[str, Any]:
    inert = set(getattr(owner, "inert_options", ()) or ())
    return {k: v for k, v in options.items() if k not in inert}


def demo_identity(world: Any, cfg: Any) -> dict[str, Any]:
    """Everything the demonstration key hashes, named (printed on a cache hit and stored with the base)."""
    suite = {k: v for k, v in asdict(cfg.suite).items() if k in DEMO_SUITE_KEYS}
    if suite["observation"] == "state":
        suite = {k: v for k, v in suite.items() if k not in IMAGE_KEYS}
    else:  # the cameras the world renders ([] means its defaults), and the OpenGL backend that renders them
        suite["cameras"] = list(getattr(world, "cameras", suite["cameras"]))
        suite["gl"] = os.environ.get("MUJOCO_GL", "")
    suite["options"] = without_inert(suite["options"], type(world))
    return {"format": KEY_FORMAT, "world": world.describe(), "suite": suite,
            "world_code": code_digest(owning_package(type(world))),
            "demo_code": code_digest(*FRAMEWORK_DEMO_CODE)}


def demo_key(world: Any, cfg: Any) -> str:
    return digest(demo_identity(world, cfg))


def policy_identity(cfg: Any, policy_factory: Any) -> dict[str, Any]:
    """The policy's settings (inert options left out) and code, the BC code, torch's version and the precision."""
    import torch

    policy = asdict(cfg.policy)
    policy["options"] = without_inert(policy["options"], policy_factory)
    if cfg.suite.observation == "state":  # the image encoder's settings shape nothing without images
        for key in POLICY_IMAGE_KEYS:
            policy.pop(key, None)
    return {"policy": policy, "policy_code": code_digest(owning_package(policy_factory)),
            "bc_code": code_digest(*FRAMEWORK_BC_CODE), "torch": torch.__version__,
            "precision": cfg.training.precision}
