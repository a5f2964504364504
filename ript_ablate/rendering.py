"""Headless camera images of a MuJoCo scene: uint8 RGB arrays, one renderer per environment.

Why `mujoco.Renderer` per environment and not the simulator's own render call: each renderer owns its OpenGL
context and buffers, so two image environments in one process render independently (a second Meta-World image
environment made through gymnasium's renderer after the first was closed rendered black frames), and closing one
leaves the others working. Shadows and reflections are off: on Mesa's software renderer they cost 4-6x the
frame rate and carry nothing a policy needs.

Backend: MuJoCo picks its OpenGL backend from `MUJOCO_GL` when it is first imported, and its default (GLFW) needs a
display. `choose_gl_backend()`, called when ript_ablate is imported, sets `MUJOCO_GL=egl` (or `osmesa`) on a machine
without a display when that library is installed and nothing was chosen; a failure to render is raised as a
`RenderingError` that says what to install.
"""

from __future__ import annotations

import atexit
import ctypes.util
import os
import sys
import weakref
from collections.abc import Iterable, MutableMapping
from typing import Any

import numpy as np

from ript_ablate.errors import RiptAblateError

_LIVE: weakref.WeakSet[CameraRenderer] = weakref.WeakSet()
_EXIT_HOOK: list[bool] = []  # one entry once the exit hook is registered
SETUP_HINT = ("rendering needs a headless OpenGL library: EGL (`apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri` "
              "on a CPU machine; a GPU machine's NVIDIA driver brings its own) with MUJOCO_GL=egl, or OSMesa "
              "(`apt-get install libosmesa6`) with MUJOCO_GL=osmesa, set before Python starts")


class RenderingError(RiptAblateError):
    """The scene cannot be rendered on this machine (no OpenGL backend) or a camera does not exist."""


def choose_gl_backend(environ: MutableMapping[str, str] | None = None, platform: str = sys.platform) -> str | None:
    """Set MUJOCO_GL for a machine without a display, when unset: egl if libEGL is installed, else osmesa if
    libOSMesa is. A PyOpenGL platform already chosen (PYOPENGL_PLATFORM, e.g. by a robosuite set-up) is kept: MuJoCo
    refuses to import with a backend that disagrees with it. Returns the backend set, or None when nothing was
    changed."""
    env = os.environ if environ is None else environ
    if env.get("MUJOCO_GL") or not platform.startswith("linux") or env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return None
    chosen = env.get("PYOPENGL_PLATFORM", "").strip().lower()
    if chosen:
        if chosen in ("egl", "osmesa"):
            env["MUJOCO_GL"] = chosen
            return chosen
        return None
    for backend, library in (("egl", "EGL"), ("osmesa", "OSMesa")):
        if ctypes.util.find_library(library):
            env["MUJOCO_GL"] = backend
            if backend == "osmesa":
                env.setdefault("PYOPENGL_PLATFORM", "osmesa")
            return backend
    return None


def model_cameras(model: Any) -> list[str]:
    """The named cameras of a MuJoCo model, in model order."""
    return [model.camera(i).name for i in range(model.ncam)]


class CameraRenderer:
    """Renders `cameras` of one model's `data` as (size, size, 3) uint8 images. Cameras in `upside_down` are turned
    180 degrees so that every image is upright (the world says which of its cameras need it)."""

    def __init__(self, model: Any, data: Any, cameras: Iterable[str], size: int,
                 upside_down: Iterable[str] = ()):
        import mujoco

        self.cameras = list(cameras)
        known = model_cameras(model)
        missing = [c for c in self.cameras if c not in known]
        if missing:
            raise RenderingError(f"suite.cameras: {missing} not in this scene; its cameras are {known}")
        # the offscreen buffer must hold the image; its size is a visual setting that changes no physics
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        try:
            self._renderer: Any = mujoco.Renderer(model, size, size)
        except Exception as exc:  # EGL/OSMesa/GLFW failures have many types; all mean the same to a user
            backend = os.environ.get("MUJOCO_GL", "unset")
            raise RenderingError(f"cannot render (MUJOCO_GL={backend}: {type(exc).__name__}: {exc}); {SETUP_HINT} "
                                 "(MuJoCo reads it when first imported: a program that imports mujoco before "
                                 "ript_ablate must set it itself)") from exc
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            self._renderer.scene.flags[flag] = 0
        self.data = data
        self.size = size
        self.upside_down = frozenset(upside_down)
        if not _LIVE and not _EXIT_HOOK:
            atexit.register(_close_all)
            _EXIT_HOOK.append(True)
        _LIVE.add(self)

    def render(self) -> dict[str, np.ndarray]:
        """{camera: (size, size, 3) uint8} of the current state of `data`."""
        out = {}
        for camera in self.cameras:
            self._renderer.update_scene(self.data, camera=camera)
            image = self._renderer.render()
            out[camera] = np.ascontiguousarray(image[::-1, ::-1]) if camera in self.upside_down else image
        return out

    def close(self) -> None:
        renderer, self._renderer = self._renderer, None
        if renderer is not None:
            renderer.close()


def _close_all() -> None:
    """Free every renderer's context while its display is still up. Registered when the first renderer is made,
    after MuJoCo's OpenGL module registered its own exit hook (which ends the display; hooks run last first), so
    this one runs before it; a context freed at interpreter teardown instead raises from `__del__`."""
    for renderer in list(_LIVE):
        try:
            renderer.close()
        except Exception:  # the context may already be gone with its library; nothing is left to free
            pass
