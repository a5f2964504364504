"""Reference policy, a small VLA stand-in: state + instruction -> an action chunk, in one of three families on the
same backbone (`policy.head`):
    laplace  mu and log_b (B, H, D) from an action head and a scale head (OpenVLA-OFT's Laplace head)
    tokens   logits (B, H, D, n_bins) over per-dimension action bins (OpenVLA-style tokens, decoded in parallel)
    flow     a flow-matching action expert: one transformer block over the H noisy actions, reading the backbone's
             action-query states as its prefix, called once per denoising step (pi0-style); its scale-head module
             holds a noise head (flow_noise) and a Laplace scale head (laplace_ode)

Tokens: instruction words (hashed vocabulary), the normalised flat observation projected into a few tokens, each
camera's image encoded into a few tokens (`vision.ImageEncoder`: convolutions and spatial-softmax keypoints), and
H learned action queries (parallel decoding, as OpenVLA-OFT does). A pre-LN transformer whose linear layers
(q, k, v, o, fc1, fc2) are plain `nn.Linear`, so LoRA adapters (peft) can be injected into them for RL (the image
encoders, like the rest of the base backbone, stay frozen in RL).
The action head reads mu from the action-query tokens; a separate scale head reads log_b from the same
tokens (small initial weights, bias -3, as in the original).
"""

from __future__ import annotations

import contextlib
import math
import re
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ript_ablate.config import PolicyConfig
from ript_ablate.interfaces.policy import FlowPolicy, Policy, TokenPolicy
from ript_ablate.policies.reference.vision import ImageEncoder


def tokenize(text: str, vocab_size: int, max_tokens: int) -> list[int]:
    """Words hashed into [1, vocab_size); 0 is padding. Stable across runs and machines."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:max_tokens]
    ids = [1 + zlib.crc32(w.encode()) % (vocab_size - 1) for w in words]
    return ids + [0] * (max_tokens - len(ids))


class Block(nn.Module):
    """Pre-LN transformer block with separate q/k/v/o projections (LoRA targets)."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
                                             attn_mask=key_mask[:, None, None, :])
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Backbone(nn.Module):
    """Instruction tokens, the normalised vector observation's tokens (when the world gives one), each camera's
    image tokens, and the H action queries, through the transformer blocks."""

    def __init__(self, cfg: PolicyConfig, obs_dim: int, image_keys: tuple[str, ...] = ()):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.n_obs_tokens = cfg.n_obs_tokens if obs_dim else 0
        self.word_emb = nn.Embedding(cfg.vocab_size, d)
        self.obs_proj = nn.Linear(obs_dim, cfg.n_obs_tokens * d) if obs_dim else None
        self.action_queries = nn.Parameter(torch.randn(cfg.chunk_size, d) * 0.02)
        n_tokens = (cfg.max_instruction_tokens + self.n_obs_tokens + len(image_keys) * cfg.image_tokens
                    + cfg.chunk_size)
        self.pos_emb = nn.Parameter(torch.randn(n_tokens, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.image_keys = image_keys
        self.encoder_names = {key: module_name(key) for key in image_keys}
        if len(set(self.encoder_names.values())) < len(image_keys):
            raise ValueError(f"camera keys {list(image_keys)} collide once '.' is replaced (module names)")
        self.image_encoders = nn.ModuleDict(
            {self.encoder_names[key]: ImageEncoder(d, cfg.image_tokens, cfg.image_channels) for key in image_keys}
        ) if image_keys else None

    def forward(self, obs_norm: torch.Tensor | None, instr: torch.Tensor,
                images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states of the H action-query tokens, (B, H, d_model)."""
        b = instr.shape[0]
        cfg = self.cfg
        parts = [self.word_emb(instr)]
        if self.obs_proj is not None:
            parts.append(self.obs_proj(obs_norm).view(b, cfg.n_obs_tokens, cfg.d_model))
        for key in self.image_keys:
            parts.append(self.image_encoders[self.encoder_names[key]](images[key]))  # type: ignore[index]
        parts.append(self.action_queries.expand(b, -1, -1))
        tokens = torch.cat(parts, dim=1) + self.pos_emb
        keep = torch.cat([instr != 0, torch.ones(b, tokens.shape[1] - instr.shape[1], dtype=torch.bool,
                                                 device=instr.device)], dim=1)
        for block in self.blocks:
            tokens = block(tokens, keep)
        return self.ln_f(tokens[:, -cfg.chunk_size:])


def module_name(key: str) -> str:
    """An observation key as a submodule name (torch forbids '.' in one)."""
    return key.replace(".", "_")


class ReferencePolicy(Policy):
    """obs {"state": (B, obs_dim)} (and cameras {key: (B, S, S, 3) uint8}) + instruction ids (B, L) -> mu (B, H, D),
    log_b (B, H, D). `vector_keys` are the flat observations read (concatenated, normalised), `image_keys` the
    cameras."""

    replicable = True

    def __init__(self, cfg: PolicyConfig, obs_dim: int, action_dim: int, image_keys: tuple[str, ...] = (),
                 vector_keys: tuple[str, ...] = ("state",)):
        super().__init__()
        self.cfg = cfg
        self.chunk_size = cfg.chunk_size
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.vector_keys = vector_keys if obs_dim else ()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        with torch.random.fork_rng(devices=[]):  # same seed, same initial weights; global RNG untouched
            torch.manual_seed(cfg.seed)
            self.backbone = Backbone(cfg, obs_dim, image_keys)
            self.action_head = nn.Linear(cfg.d_model, action_dim)
            self.scale_head = nn.Linear(cfg.d_model, action_dim)
            nn.init.normal_(self.scale_head.weight, std=1e-3)
            nn.init.constant_(self.scale_head.bias, cfg.scale_bias_init)

    def set_obs_normalizer(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalise observations by demo statistics; a floored std keeps constant dims from exploding."""
        self.obs_mean.copy_(mean)
        self.obs_std.copy_(std.clamp_min(self.cfg.obs_std_floor))

    def vector(self, obs: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The flat observations, concatenated in `vector_keys` order (None when the policy reads none)."""
        if not self.vector_keys:
            return None
        return torch.cat([obs[key] for key in self.vector_keys], -1)

    def hidden(self, obs: dict[str, torch.Tensor], instr: torch.Tensor) -> torch.Tensor:
        vector = self.vector(obs)
        normalised = None if vector is None else (vector - self.obs_mean) / self.obs_std
        return self.backbone(normalised, instr, {key: obs[key] for key in self.backbone.image_keys})

    def forward(self, obs: dict[str, torch.Tensor], instr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(obs, instr)
        return self.action_head(hidden), self.scale_head(hidden)

    # -- the Policy interface ----------------------------------------------------------------------------------
    def encode_instruction(self, text: str) -> torch.Tensor:
        return torch.tensor(tokenize(text, self.cfg.vocab_size, self.cfg.max_instruction_tokens), dtype=torch.long)

    def modules_by_role(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "action_head": self.action_head, "scale_head": self.scale_head}

    def observe_demonstrations(self, obs: dict[str, torch.Tensor]) -> None:
        vector = self.vector(obs)
        if vector is not None:
            states = vector.double()
            self.set_obs_normalizer(states.mean(0).float(), states.std(0).nan_to_num(0.0).float())

    def prepare_for_rl(self, cfg) -> None:
        """LoRA on the backbone (frozen base), as RIPT's OpenVLA-OFT path."""
        inject_lora(self, cfg.algo.lora_rank, cfg.policy.lora_alpha, cfg.algo.lora_dropout, cfg.policy.lora_targets,
                    cfg.policy.lora_init)

    def rollout_state(self) -> dict[str, torch.Tensor]:
        return merged_state_dict(self)


class _SharedBackbone:
    """What every family of the reference policy shares with the Laplace one: normaliser, instruction, LoRA."""

    cfg: PolicyConfig
    backbone: Backbone
    set_obs_normalizer = ReferencePolicy.set_obs_normalizer
    vector = ReferencePolicy.vector
    hidden = ReferencePolicy.hidden
    encode_instruction = ReferencePolicy.encode_instruction
    observe_demonstrations = ReferencePolicy.observe_demonstrations
    rollout_state = ReferencePolicy.rollout_state

    @contextlib.contextmanager
    def _seeded_build(self, cfg: PolicyConfig, obs_dim: int, action_dim: int, image_keys: tuple[str, ...],
                      vector_keys: tuple[str, ...]) -> Iterator[None]:
        """Build the shared part under `cfg.seed`; the heads built inside the block draw from the same stream
        (same seed, same initial weights; the global RNG untouched)."""
        self.cfg, self.chunk_size, self.obs_dim, self.action_dim = cfg, cfg.chunk_size, obs_dim, action_dim
        self.vector_keys = vector_keys if obs_dim else ()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))  # type: ignore[attr-defined]
        self.register_buffer("obs_std", torch.ones(obs_dim))  # type: ignore[attr-defined]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.backbone = Backbone(cfg, obs_dim, image_keys)
            yield

    def prepare_for_rl(self, cfg) -> None:
        inject_lora(self, cfg.algo.lora_rank, cfg.policy.lora_alpha, cfg.algo.lora_dropout, cfg.policy.lora_targets,
                    cfg.policy.lora_init)


class ReferenceTokenPolicy(_SharedBackbone, TokenPolicy):
    """obs + instruction -> logits (B, H, D, n_bins): one token per action dim, bins over [-1, 1]."""

    replicable = True

    def __init__(self, cfg: PolicyConfig, obs_dim: int, action_dim: int, image_keys: tuple[str, ...] = (),
                 vector_keys: tuple[str, ...] = ("state",)):
        super().__init__()
        self.n_bins = cfg.n_bins
        with self._seeded_build(cfg, obs_dim, action_dim, image_keys, vector_keys):
            self.action_head = nn.Linear(cfg.d_model, action_dim * cfg.n_bins)

    def forward(self, obs: dict[str, torch.Tensor], instr: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden(obs, instr)
        return self.action_head(hidden).view(hidden.shape[0], self.chunk_size, self.action_dim, self.n_bins)

    def modules_by_role(self) -> dict[str, nn.Module | None]:
        return {"backbone": self.backbone, "action_head": self.action_head, "scale_head": None}


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the denoising time t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    angles = 100.0 * t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], -1)


class FlowExpert(nn.Module):
    """The action expert: noisy chunk + time, attending over the H positions, added to the prefix states."""

    def __init__(self, d_model: int, action_dim: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.d_model = d_model
        self.in_proj = nn.Linear(action_dim, d_model)
        self.time_mlp = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        self.block = Block(d_model, n_heads, mlp_ratio)
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, action_dim)

    def hidden(self, prefix: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = prefix + self.in_proj(x_t) + self.time_mlp(time_embedding(t, self.d_model))[:, None, :]
        keep = torch.ones(h.shape[0], h.shape[1], dtype=torch.bool, device=h.device)
        return self.ln(self.block(h, keep))

    def forward(self, prefix: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(prefix, x_t, t))


class FlowHeads(nn.Module):
    """The flow policy's scale-head role: a noise head on the expert's states (flow_noise) and a Laplace scale head
    on the prefix (laplace_ode)."""

    def __init__(self, d_model: int, action_dim: int, scale_bias_init: float):
        super().__init__()
        self.noise = nn.Linear(d_model, action_dim)
        self.log_scale = nn.Linear(d_model, action_dim)
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)  # the middle of the noise bounds until prepare_for_rl sets its start
        nn.init.normal_(self.log_scale.weight, std=1e-3)
        nn.init.constant_(self.log_scale.bias, scale_bias_init)


class ReferenceFlowPolicy(_SharedBackbone, FlowPolicy):
    """obs + instruction -> prefix (B, H, d_model); velocity(prefix, x_t, t) -> (B, H, D)."""

    replicable = True

    def __init__(self, cfg: PolicyConfig, obs_dim: int, action_dim: int, image_keys: tuple[str, ...] = (),
                 vector_keys: tuple[str, ...] = ("state",)):
        super().__init__()
        self.denoise_steps = cfg.denoise_steps
        with self._seeded_build(cfg, obs_dim, action_dim, image_keys, vector_keys):
            self.expert = FlowExpert(cfg.d_model, action_dim, cfg.n_heads, cfg.mlp_ratio)
            self.heads = FlowHeads(cfg.d_model, action_dim, cfg.scale_bias_init)

    def forward(self, obs: dict[str, torch.Tensor], instr: torch.Tensor) -> torch.Tensor:
        return self.hidden(obs, instr)

    def velocity(self, prefix: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.expert(prefix, x_t, t)

    def noise_std_raw(self, prefix: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.heads.noise(self.expert.hidden(prefix, x_t, t))

    def log_scale(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.heads.log_scale(prefix)

    def modules_by_role(self) -> dict[str, nn.Module | None]:
        return {"backbone": self.backbone, "action_head": self.expert, "scale_head": self.heads}

    def prepare_for_rl(self, cfg) -> None:
        """LoRA on the backbone; the noise head starts at `algo.flow_noise_std_init` (unless a header checkpoint
        gave it its weights)."""
        super().prepare_for_rl(cfg)
        if cfg.algo.flow_logprob == "flow_noise" and not cfg.algo.header_checkpoint:
            from ript_ablate.families.flow import init_noise_head

            init_noise_head(self.heads.noise, cfg.algo.flow_noise_std, cfg.algo.flow_noise_std_init)


HEADS = {"laplace": ReferencePolicy, "tokens": ReferenceTokenPolicy, "flow": ReferenceFlowPolicy}


def build_policy(cfg: PolicyConfig, obs_dim: int, action_dim: int, image_keys: tuple[str, ...] = (),
                 vector_keys: tuple[str, ...] = ("state",)) -> Policy:
    return HEADS[cfg.head](cfg, obs_dim, action_dim, image_keys, vector_keys)


def make_reference_policy(cfg, world) -> Policy:
    """The `reference` plug-in: reads every flat observation of the world ((n,), e.g. "state" or "proprio") and
    every camera image ((S, S, 3) uint8)."""
    from ript_ablate.errors import ConfigError

    shapes = world.observation_shapes
    vector_keys = tuple(k for k, shape in shapes.items() if len(shape) == 1)
    image_keys = tuple(k for k, shape in shapes.items() if len(shape) == 3 and shape[2] == 3)
    other = {k: shape for k, shape in shapes.items() if k not in vector_keys + image_keys}
    if other or not (vector_keys or image_keys):
        raise ConfigError([f"policy.name: 'reference' reads flat observations (n,) and camera images (S, S, 3); "
                           f"the world {type(world).__name__} gives {shapes}"])
    obs_dim = sum(shapes[k][0] for k in vector_keys)
    return build_policy(cfg.policy, obs_dim, world.action_dim, image_keys, vector_keys)


def default_lora_alpha(rank: int) -> float:
    """The original's rule: lora_alpha = min(rank, 16), so the adapter scaling alpha / rank is at most 1."""
    return float(min(rank, 16))


def inject_lora(policy: nn.Module, rank: int, alpha: float | None, dropout: float, targets: list[str],
                init: str = "gaussian") -> None:
    """Wrap the backbone's target linear layers with peft LoRA adapters and freeze the base backbone.

    Only the adapter (lora_A / lora_B) stays trainable in the backbone, as in RIPT's OpenVLA-OFT path.
    `alpha=None` applies the original's min(rank, 16); `init` "gaussian" is the original's
    `init_lora_weights="gaussian"` (A ~ N(0, 1/rank)), "kaiming_uniform" peft's default. B starts at zero in both,
    so the policy is unchanged at the start; the init sets the size of the first updates.
    """
    from peft import LoraConfig, inject_adapter_in_model

    pattern = r".*\.(" + "|".join(map(re.escape, targets)) + r")$"
    config = LoraConfig(r=rank, lora_alpha=default_lora_alpha(rank) if alpha is None else alpha,
                        lora_dropout=dropout, target_modules=pattern,
                        init_lora_weights="gaussian" if init == "gaussian" else True)
    inject_adapter_in_model(config, policy.backbone)
    for name, param in policy.backbone.named_parameters():
        param.requires_grad = "lora_" in name


def lora_parameters(policy: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in policy.backbone.named_parameters() if "lora_" in n]


def merged_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """Plain-policy weights with LoRA deltas folded in: rollout workers need neither peft nor adapters."""
    state: dict[str, torch.Tensor] = {}
    lora_modules: dict[str, Any] = {}
    for name, module in policy.named_modules():
        if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight"):
            lora_modules[name] = module
    for key, value in policy.state_dict().items():
        if "lora_" in key:
            continue
        prefix, _, leaf = key.rpartition(".")
        owner = prefix.removesuffix(".base_layer")
        if prefix.endswith(".base_layer") and owner in lora_modules:
            module = lora_modules[owner]
            if leaf == "weight":
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                value = value + delta.to(value.dtype)
            key = f"{owner}.{leaf}"
        state[key] = value.detach().float().cpu().clone()
    return state

