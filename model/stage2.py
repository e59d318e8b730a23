"""Stage 2 of Re2Pix: a Cosmos-Predict-style diffusion transformer over WAN2.1-VAE latents.

The network follows Cosmos-Predict2's ``MiniTrainDIT`` (paper section 3.3) without its cross-attention,
and adds the paper's early semantic fusion. Its layout:

- **Input.** ``x`` [B, 16, T, h, w] is what the EDM preconditioning feeds the network
  (``c_in``-scaled noisy future latents next to the clean context latents, see ``model.diffusion``).
  A context-mask channel (1 for context latents, 0 for future latents) is concatenated, so every
  pixel carries 16 + 1 channels; 2 x 2 spatial patches (temporal patch 1) give 17 * 4 = 68 values per
  token, embedded by one bias-free linear layer to ``dim``. (Cosmos concatenates a padding mask
  the same way, which is why its patch embedding also takes ``in_channels + 1``.)
- **Early fusion** (section 3.3, "Early Semantic Alignment"). The features [B, T, Hf, Wf, Cf] are
  resized to the token grid (h/2 x w/2: 32 x 56 -> 27 x 48 at paper geometry) with bilinear
  interpolation, ``align_corners=False`` and **antialias off** (the grid shrinks by a factor below
  2, so a bilinear kernel already covers every source sample; antialias would only blur), embedded by
  their own bias-free linear layer Cf -> dim and **summed** with the latent tokens. The token count
  does not grow. With ``semantic=False`` (the Baseline, ``--no-semantics``) the feature branch does not
  exist and features are ignored.
- **Timestep embedding (AdaLN-LoRA, as in Cosmos).** ``c_noise`` is per latent frame ([B, T]: the
  context frames carry 0.001). A sinusoidal embedding of width ``dim`` (cos half, then sin half) of
  ``timestep_scale * c_noise`` goes two ways: through a bias-free MLP dim -> dim -> 3*dim whose output
  is the **shared base** modulation (shift, scale, gate) used by every sublayer of every block; and,
  through an RMSNorm with learnable scale, as the embedding ``emb`` that each sublayer's own low-rank
  projection reads: SiLU -> Linear(dim, rank) -> Linear(rank, 3*dim), added to the shared base.
  Cosmos has three such LoRA modulations per block (self-attention, cross-attention, MLP); we drop
  cross-attention, so a block has two (attention and MLP). The final layer has its own LoRA
  projection to (shift, scale) = 2*dim, added to the first 2*dim of the shared base. Every modulation
  is per frame ([B, T, dim]) and broadcast over that frame's tokens.
- **Blocks.** Pre-modulation norm is LayerNorm **without** affine parameters (Cosmos: the AdaLN
  (1 + scale) already provides a per-channel scale, a learnable one would be redundant); the paper's
  "RMSNorm with learnable scales in all self-attention blocks" is the QK-norm: RMSNorm with learnable
  scale over the head dimension on q and k, as in Cosmos' ``Attention``; the timestep embedding norm
  is an RMSNorm with learnable scale too. All linear layers are bias-free (Cosmos). MLP: dim -> 4 dim,
  GELU (exact), -> dim.
- **3D-factorized RoPE** on q and k after the QK-norm, positions in token units (t, h, w); the head
  dimension is split as Cosmos' ``VideoRopePosition3DEmb``: dim_h = dim_w = head_dim // 6 * 2,
  dim_t = head_dim - 2 * dim_h (128 -> t 44, h 42, w 42), theta 10000 per axis, rotate-half pairing
  (x[i], x[i + head_dim/2]) with the frequency vector [t | h | w]. Cosmos' fps modulation of the
  temporal positions is not used: every clip has the same latent frame layout.
- **Output.** A modulated final layer (LayerNorm without affine, LoRA shift/scale, bias-free linear
  dim -> 16 * 2 * 2), unpatchified to [B, 16, T, h, w]. The output for context frames is computed but
  not used: the denoiser replaces it by the ground truth.
- **Initialisation (DiT).** Linear layers Xavier-uniform, the timestep MLP's first layer N(0, 0.02),
  and zero for every modulation's output projection (the shared base's last layer and every LoRA
  up-projection: all shifts, scales and gates start at 0, so every block starts as the identity) and
  for the final linear layer (the network starts by predicting F = 0).

Parameter count of ``DiTConfig.paper()`` (see :func:`parameter_breakdown`): 781,989,376 for the
Baseline, the paper's "782M"; the semantic model adds the 1152 x 2048 feature embedding (2,359,296).
``DiTConfig.paper_large()`` (Baseline-Large, paper table 1: "1.5B") doubles the depth to 28 blocks,
Cosmos-Predict2-2B's own depth: 1,545,356,288 as the Baseline (27 blocks would give 1,490,830,080).

``forward(..., hidden_block=k)`` also returns the tokens after block k (1-based, [B, T, S, dim]): the
hook that REPA and VideoREPA (``model.repa``) align with the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.diffusion import fit_channels
from pipeline.config import Sized

__all__ = [
    "DiTConfig",
    "RMSNorm",
    "Re2PixDiT",
    "apply_rope",
    "features_to_grid",
    "grid_positions",
    "parameter_breakdown",
    "rope_angles",
    "rope_split",
    "timestep_embedding",
]


@dataclass
class DiTConfig(Sized):
    """Sizes of the Stage 2 DiT. The defaults are the paper's (``paper()``); ``SIZES`` holds the named ones."""

    num_layers: int = 14
    num_heads: int = 16
    dim: int = 2048
    patch_spatial: int = 2
    patch_temporal: int = 1
    latent_channels: int = 16
    mlp_ratio: float = 4.0
    adaln_lora_rank: int = 256
    num_pca_channels: int = 1152  # PCA channels of the semantic features it takes
    semantic: bool = True  # False: the Baseline, no feature branch at all
    rope_theta: float = 10000.0
    # The sinusoidal timestep embedding sees timestep_scale * c_noise; Cosmos-Predict2 calls this
    # rectified_flow_t_scaling_factor (1.0 in its own configs, 1000 in its WAN-based ones).
    timestep_scale: float = 1.0
    norm_eps: float = 1e-6
    # recompute each block's activations in the backward pass (torch.utils.checkpoint): about a third
    # more compute for a block's worth of activations instead of all of them (model/memory.py)
    gradient_checkpointing: bool = False

    HELP = {  # jobs.train's --stage2.model.FIELD help
        "num_layers": "DiT blocks",
        "num_heads": "attention heads",
        "dim": "hidden width",
        "patch_spatial": "latent patch size (pixels of the latent per token side)",
        "patch_temporal": "latent frames per token (1)",
        "mlp_ratio": "MLP width / dim",
        "adaln_lora_rank": "rank of the AdaLN-LoRA modulation",
        "rope_theta": "3D RoPE base",
        "timestep_scale": "scale of the noise level fed to the timestep embedding",
        "norm_eps": "LayerNorm epsilon",
    }

    # paper: 14 layers, 16 heads, dim 2048, 2x2 patches, AdaLN-LoRA rank 256 (~782M); paper_large:
    # Baseline-Large (paper table 1, "1.5B"), 28 blocks instead of 14; tiny: CPU demos and tests (~0.2M)
    SIZES = {
        "tiny": {"num_layers": 2, "num_heads": 4, "dim": 96, "adaln_lora_rank": 16, "num_pca_channels": 64},
        "paper": {},
        "paper_large": {"num_layers": 28},
    }
    FROM_DATA = ("num_pca_channels", "latent_channels", "semantic")  # the trainer takes these from the store and stage
    RENAMED = {"feature_channels": "num_pca_channels"}  # checkpoints saved before

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "dim"):  # before the divisions below use them
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patch_temporal != 1:
            raise ValueError(
                "patch_temporal must be 1: the noise conditioning and the context mask are per latent frame"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim // 6 * 2 < 2:
            raise ValueError(f"head_dim {self.head_dim} is too small or odd for a 3D RoPE split")
        if self.dim % 2:
            raise ValueError("dim must be even (sinusoidal timestep embedding)")
        for name in (
            "num_layers",
            "num_heads",
            "dim",
            "patch_spatial",
            "latent_channels",
            "adaln_lora_rank",
            "num_pca_channels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    @classmethod
    def paper_large(cls, **values) -> DiTConfig:
        return cls.sized("paper_large", **values)


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-channel scale, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters (Cosmos' pre-modulation norm)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dimension split of the 3D RoPE as (dim_t, dim_h, dim_w), Cosmos' rule."""
    dim_hw = head_dim // 6 * 2
    return head_dim - 2 * dim_hw, dim_hw, dim_hw


def grid_positions(t: int, h: int, w: int, device=None) -> torch.Tensor:
    """(t, h, w) integer positions of a token grid flattened t-major: [t*h*w, 3] float32."""
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device),
        torch.arange(h, device=device),
        torch.arange(w, device=device),
        indexing="ij",
    )
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3).float()


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles [N, head_dim // 2] for positions [N, 3] in (t, h, w) order.

    Each axis a with sub-dimension d_a gets d_a / 2 frequencies theta ** (-2i / d_a); the angle
    vector is [t angles | h angles | w angles], pairing channel i with channel i + head_dim / 2.
    """
    parts = []
    for axis, d in enumerate(rope_split(head_dim)):
        exponent = torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d
        freqs = theta ** (-exponent)
        parts.append(positions[:, axis : axis + 1].double() * freqs[None, :])
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., N, head_dim] by angles [N, head_dim // 2] (rotate-half pairing), in float32."""
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [..., dim] (cos half, then sin half) of c_noise [...], float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=c_noise.device) / half)
    args = c_noise.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LoRAModulation(nn.Module):
    """One AdaLN-LoRA projection: SiLU -> Linear(dim, rank) -> Linear(rank, chunks * dim), bias-free."""

    def __init__(self, dim: int, rank: int, chunks: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, chunks * dim, bias=False)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(F.silu(emb)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with QK-norm (learnable RMSNorm) and 3D RoPE applied after it."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        # x: [B, N, dim]; angles: [N, head_dim // 2]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        q = apply_rope(self.q_norm(q), angles)
        k = apply_rope(self.k_norm(k), angles)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, head_dim]
        return self.out(rearrange(o, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Self-attention and MLP sublayers, each with its own AdaLN-LoRA (shift, scale, gate)."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False),
            nn.GELU(),
            nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False),
        )
        self.mod_attn = LoRAModulation(cfg.dim, cfg.adaln_lora_rank, 3)
        self.mod_mlp = LoRAModulation(cfg.dim, cfg.adaln_lora_rank, 3)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, base: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        # x: [B, T, S, dim] (S tokens per frame); emb: [B, T, dim]; base: [B, T, 3 dim]
        b, t, s, d = x.shape
        shift, scale, gate = (self.mod_attn(emb) + base).unsqueeze(2).chunk(3, dim=-1)
        h = _modulate(_layer_norm(x, self.eps), shift, scale)
        x = x + gate * self.attn(h.reshape(b, t * s, d), angles).reshape(b, t, s, d)
        shift, scale, gate = (self.mod_mlp(emb) + base).unsqueeze(2).chunk(3, dim=-1)
        x = x + gate * self.mlp(_modulate(_layer_norm(x, self.eps), shift, scale))
        return x


class TimestepEmbedder(nn.Module):
    """Per-frame noise conditioning: returns (emb [B, T, dim], shared base modulation [B, T, 3 dim])."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.scale = cfg.timestep_scale
        self.linear_1 = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.linear_2 = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, c_noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sinusoid = timestep_embedding(c_noise * self.scale, self.dim).to(self.linear_1.weight.dtype)
        base = self.linear_2(F.silu(self.linear_1(sinusoid)))
        return self.norm(sinusoid), base


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.dim = cfg.dim
        self.mod = LoRAModulation(cfg.dim, cfg.adaln_lora_rank, 2)
        out = cfg.patch_spatial * cfg.patch_spatial * cfg.patch_temporal * cfg.latent_channels
        self.linear = nn.Linear(cfg.dim, out, bias=False)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.mod(emb) + base[..., : 2 * self.dim]).unsqueeze(2).chunk(2, dim=-1)
        return self.linear(_modulate(_layer_norm(x, self.eps), shift, scale))


# --------------------------------------------------------------------------- the model


class Re2PixDiT(nn.Module):
    """The Stage 2 denoiser network F (see module docstring).

    forward(x [B, 16, T, h, w], c_noise [B, T] or [B], context_mask [B, T] bool,
            features [B, T, Hf, Wf, Cf] or None) -> F [B, 16, T, h, w]
    """

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p, pt = cfg.patch_spatial, cfg.patch_temporal
        self.x_embedder = nn.Linear((cfg.latent_channels + 1) * p * p * pt, cfg.dim, bias=False)
        self.feature_embedder = nn.Linear(cfg.num_pca_channels, cfg.dim, bias=False) if cfg.semantic else None
        self.t_embedder = TimestepEmbedder(cfg)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.num_layers)])
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        # every shift/scale/gate starts at zero, and so does the output (DiT's adaLN-Zero)
        nn.init.zeros_(self.t_embedder.linear_2.weight)
        for block in self.blocks:
            nn.init.zeros_(block.mod_attn.up.weight)
            nn.init.zeros_(block.mod_mlp.up.weight)
        nn.init.zeros_(self.final_layer.mod.up.weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    def embed_features(self, features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Resize features [B, T, Hf, Wf, C<=Cf] to the token grid and embed them: [B, T, Hs*Ws, dim].

        Features with fewer channels than ``num_pca_channels`` (a reader that fetched only the first c
        PCA channels) are zero-padded, which is exactly nested truncation to c channels.
        """
        if self.feature_embedder is None:
            raise RuntimeError("this is the Baseline DiT (semantic=False): it has no feature branch")
        if features.ndim != 5:
            raise ValueError(f"features must be [B, T, Hf, Wf, C], got shape {tuple(features.shape)}")
        c = features.shape[-1]
        cf = self.cfg.num_pca_channels
        if c > cf:
            raise ValueError(f"features have {c} channels, the model takes at most {cf}")
        maps = fit_channels(features.to(self.feature_embedder.weight.dtype), cf)
        return self.feature_embedder(features_to_grid(maps, grid))

    def forward(
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor,
        context_mask: torch.Tensor,
        features: torch.Tensor | None = None,
        *,
        hidden_block: int | None = None,
    ):
        """F [B, 16, T, h, w]; with ``hidden_block=k`` the pair (F, tokens after block k [B, T, S, dim])."""
        cfg = self.cfg
        if hidden_block is not None and not 1 <= hidden_block <= cfg.num_layers:
            raise ValueError(f"hidden_block must be in [1, {cfg.num_layers}], got {hidden_block}")
        p = cfg.patch_spatial
        if x.ndim != 5 or x.shape[1] != cfg.latent_channels:
            raise ValueError(f"x must be [B, {cfg.latent_channels}, T, h, w], got {tuple(x.shape)}")
        b, _, t, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        hs, ws = h // p, w // p
        if c_noise.ndim == 1:
            c_noise = c_noise[:, None].expand(b, t)
        if tuple(c_noise.shape) != (b, t) or tuple(context_mask.shape) != (b, t):
            raise ValueError(f"c_noise and context_mask must be [B, T] = [{b}, {t}]")

        dtype = self.x_embedder.weight.dtype
        mask = context_mask.to(dtype)[:, None, :, None, None].expand(b, 1, t, h, w)
        patches = torch.cat([x.to(dtype), mask], dim=1)  # [B, 17, T, h, w]
        patches = rearrange(patches, "b c t (h p) (w q) -> b t (h w) (c p q)", p=p, q=p)
        tokens = self.x_embedder(patches)  # [B, T, S, dim]

        if self.feature_embedder is not None:
            if features is None:
                raise ValueError("the semantic DiT needs features (build DiTConfig(semantic=False) for the Baseline)")
            if features.shape[0] != b or features.shape[1] != t:
                raise ValueError(f"features must be [B={b}, T={t}, Hf, Wf, C], got {tuple(features.shape)}")
            tokens = tokens + self.embed_features(features, (hs, ws))  # early fusion: summed, same tokens

        emb, base = self.t_embedder(c_noise)  # [B, T, dim], [B, T, 3 dim]
        angles = rope_angles(grid_positions(t, hs, ws, device=x.device), cfg.head_dim, cfg.rope_theta)
        hidden = None
        recompute = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for depth, block in enumerate(self.blocks, start=1):
            if recompute:
                tokens = checkpoint(block, tokens, emb, base, angles, use_reentrant=False)
            else:
                tokens = block(tokens, emb, base, angles)
            if depth == hidden_block:
                hidden = tokens
        out = self.final_layer(tokens, emb, base)  # [B, T, S, p*p*16]
        out = rearrange(out, "b t (h w) (p q c) -> b c t (h p) (w q)", h=hs, w=ws, p=p, q=p)
        return out if hidden_block is None else (out, hidden)


def features_to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Features [B, T, Hf, Wf, C] on the DiT's token grid (Hs, Ws): [B, T, Hs*Ws, C], tokens h-major as
    the patch embedding flattens them. Bilinear, align_corners=False, antialias off (module docstring);
    the interpolation runs in float32 and the result keeps the input's dtype."""
    if features.ndim != 5:
        raise ValueError(f"features must be [B, T, Hf, Wf, C], got shape {tuple(features.shape)}")
    b, t, hf, wf, _ = features.shape
    maps = rearrange(features, "b t h w c -> (b t) c h w")
    if (hf, wf) != tuple(grid):
        maps = F.interpolate(maps.float(), size=tuple(grid), mode="bilinear", align_corners=False, antialias=False).to(
            features.dtype
        )
    return rearrange(maps, "(b t) c h w -> b t (h w) c", b=b, t=t)


def parameter_breakdown(model: Re2PixDiT) -> dict[str, int]:
    """Parameter counts by part (works on the meta device)."""

    def count(params) -> int:
        return sum(p.numel() for p in params)

    blocks = model.blocks
    out = {
        "x_embedder": count(model.x_embedder.parameters()),
        "feature_embedder": count(model.feature_embedder.parameters()) if model.feature_embedder is not None else 0,
        "t_embedder": count(model.t_embedder.parameters()),
        "blocks.attention": count(p for blk in blocks for n, p in blk.attn.named_parameters() if "norm" not in n),
        "blocks.qk_norm": count(p for blk in blocks for n, p in blk.attn.named_parameters() if "norm" in n),
        "blocks.mlp": count(p for blk in blocks for p in blk.mlp.parameters()),
        "blocks.adaln_lora": count(p for blk in blocks for m in (blk.mod_attn, blk.mod_mlp) for p in m.parameters()),
        "final_layer": count(model.final_layer.parameters()),
    }
    out["total"] = count(model.parameters())
    assert out["total"] == sum(v for k, v in out.items() if k != "total")
    return out
