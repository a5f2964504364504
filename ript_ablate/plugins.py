"""Choosing a world and a policy: registered names, import paths and entry points.

`suite.name` and `policy.name` accept, in this order:
  1. a name registered at run time with `register_world` / `register_policy`;
  2. a built-in name (`metaworld`, `libero` with its extra, `reference`);
  3. a name an installed package declares in the entry-point group `ript_ablate.worlds` or `ript_ablate.policies`
     (as pytest and gymnasium plug-ins do), e.g. in its pyproject.toml:
         [project.entry-points."ript_ablate.worlds"]
         pointmass = "ript_pointmass.world:PointMassWorld"
  4. an import path 'package.module:attribute'.
A world factory is called as `factory(cfg) -> World`, a policy factory as `factory(cfg, world) -> Policy`.
An unknown name or a broken import is a ConfigError naming the key, raised by `load_checked_config` before any
compute (rollout worker processes resolve the same names again, so they must be importable there too).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ript_ablate.config import Config, PolicyConfig, config_from_dict, load_config, pretrain_config
from ript_ablate.errors import ConfigError

KINDS = {"world": ("suite.name", "ript_ablate.worlds"), "policy": ("policy.name", "ript_ablate.policies")}
BUILTIN: dict[str, dict[str, str]] = {
    "world": {"metaworld": "ript_ablate.worlds.metaworld:MetaWorld", "libero": "ript_ablate.worlds.libero:LiberoWorld"},
    "policy": {"reference": "ript_ablate.policies.reference:make_reference_policy"},
}
_registered: dict[str, dict[str, Callable[..., Any]]] = {"world": {}, "policy": {}}


def register_world(name: str, factory: Callable[[Config], Any]) -> None:
    """Make `suite.name: <name>` build worlds with `factory(cfg)` in this process (and in rollout workers, if the
    registering module is imported there too; prefer an entry point for that)."""
    _registered["world"][name] = factory


def register_policy(name: str, factory: Callable[[Config, Any], Any]) -> None:
    """Make `policy.name: <name>` build policies with `factory(cfg, world)`."""
    _registered["policy"][name] = factory


class PluginError(ConfigError):
    """A world or policy name that cannot be resolved."""


def _entry_points(kind: str) -> dict[str, Any]:
    group = KINDS[kind][1]
    return {ep.name: ep for ep in entry_points(group=group)}


def known_names(kind: str) -> list[str]:
    return sorted({*_registered[kind], *BUILTIN[kind], *_entry_points(kind)})


def _import_path(path: str, key: str) -> Any:
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise PluginError([f"{key}: {path!r} is neither a known name nor an import path 'package.module:attribute'"])
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError([f"{key}: cannot import module {module_name!r} of {path!r} ({exc})"]) from None
    except Exception as exc:  # the plug-in's own code failed while importing
        raise PluginError([f"{key}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"]) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        match = difflib.get_close_matches(attribute, [n for n in dir(module) if not n.startswith("_")], n=1,
                                          cutoff=0.6)
        hint = f" (did you mean '{module_name}:{match[0]}'?)" if match else ""
        raise PluginError([f"{key}: module {module_name!r} has no attribute {attribute!r}{hint}"]) from None


def resolve(kind: str, name: str) -> Callable[..., Any]:
    """The factory `name` stands for (see the module docstring for the lookup order)."""
    key = KINDS[kind][0]
    if name in _registered[kind]:
        return _registered[kind][name]
    if name in BUILTIN[kind]:
        return _import_path(BUILTIN[kind][name], key)
    eps = _entry_points(kind)
    if name in eps:
        try:
            return eps[name].load()
        except Exception as exc:
            raise PluginError([f"{key}: the entry point {name!r} ({eps[name].value}) failed to load: "
                               f"{type(exc).__name__}: {exc}"]) from None
    if ":" in name:
        factory = _import_path(name, key)
        if not callable(factory):
            raise PluginError([f"{key}: {name!r} is not callable (expected a class or a factory function)"])
        return factory
    names = known_names(kind)
    match = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" (did you mean {match[0]!r}?)" if match else ""
    raise PluginError([f"{key}: unknown {kind} {name!r}{hint}; known: {', '.join(names)}, or an import path "
                       "'package.module:attribute'"])


def build_world(cfg: Config) -> Any:
    """The world of `cfg`, with the config it was built from as `world.run_config` (its cache keys read it)."""
    world = resolve("world", cfg.suite.name)(cfg)
    world.run_config = cfg
    return world


def build_policy(cfg: Config, world: Any) -> Any:
    return resolve("policy", cfg.policy.name)(cfg, world)


def reference_only_problems(cfg: Config) -> list[str]:
    """`policy.d_model` ... `policy.denoise_steps` configure the built-in policy only: set for a plug-in they would be
    ignored silently, so they are refused, pointing at `policy.options`."""
    if cfg.policy.name == "reference":
        return []
    default = PolicyConfig()
    return [f"policy.{f.name}: got {getattr(cfg.policy, f.name)!r}, but it configures the built-in 'reference' "
            f"policy only; settings of the policy {cfg.policy.name!r} go in policy.options"
            for f in dataclasses.fields(PolicyConfig) if f.name not in ("name", "options")
            and getattr(cfg.policy, f.name) != getattr(default, f.name)]


def config_problems(cfg: Config) -> list[str]:
    """Problems only the chosen world and policy can see: the names resolve, then each one's own checks."""
    problems: list[str] = []
    for kind, name in (("world", cfg.suite.name), ("policy", cfg.policy.name)):
        try:
            factory = resolve(kind, name)
        except PluginError as exc:
            problems.extend(exc.problems)
            continue
        if kind == "policy":
            problems.extend(reference_only_problems(cfg))
        observations = getattr(factory, "observations", ("state",)) if kind == "world" else None
        if observations is not None and cfg.suite.observation not in observations:
            problems.append(f"suite.observation: got {cfg.suite.observation!r}, but the world {name!r} gives "
                            f"{' | '.join(observations)}")
        check = getattr(factory, "config_problems", None)
        if callable(check):
            problems.extend(check(cfg))
            if kind == "world" and cfg.sft.pretrain_tasks:  # the pre-training tasks, as the world sees tasks
                problems.extend(p.replace("suite.tasks:", "sft.pretrain_tasks:", 1)
                                for p in check(pretrain_config(cfg)) if p.startswith("suite.tasks:"))
    return problems


def load_checked_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """`config.load_config` plus the world's and policy's own checks: everything before any compute."""
    return load_config(path, overrides, extra_checks=config_problems)


def checked_config_from_dict(data: Any, source: str = "<dict>", explicit: Any = ()) -> Config:
    """`config.config_from_dict` plus the world's and policy's own checks; `explicit` as there."""
    return config_from_dict(data, source, extra_checks=config_problems, explicit=explicit)
