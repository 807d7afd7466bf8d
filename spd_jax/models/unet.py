"""ADM/DDPM++-family U-Net in Flax Linen (docs/math.md §8).

One configurable network serves every model family of spd_jax:

* residual blocks with a FiLM (scale/shift) time embedding, GroupNorm, dropout and self-attention
  at configured resolutions (guided-diffusion ``UNetModel``, EDM ``DhariwalUNet``);
* resampling by strided/up convolutions (``resample="conv"``) or by residual blocks
  (``resample="resblock"``);
* one decoder, or two decoders sharing the encoder for DDM's dual (c, eps) head, each optionally
  opened by a "decouple" block (``decouple=True``);
* SMD's per-pixel hypernetwork at the two sites of docs/math.md §8 when ``hyper_dim`` is set;
* an extra conditioning image concatenated to the input (``cond_channels``).

Inputs and outputs are pixel space, NHWC. Time is the library's continuous t in [0, 1] (t = 0
data); the network's own time label is computed from t inside the model (:func:`time_label`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

TIME_EMBEDDINGS = ("linear", "log", "discrete")
RESAMPLE_MODES = ("conv", "resblock")
_LOG_T_FLOOR = 1e-5  # smallest t fed to log t (the network is never evaluated at t = 0 exactly)


def time_label(
    t: jax.Array, kind: str = "linear", scale: float = 1000.0, num_levels: int | None = None
):
    """The network's own time label from continuous t in [0, 1], shape (B,).

    * ``"linear"``: scale * t (default 1000 t, the DDPM/guided-diffusion range);
    * ``"log"``: log t (DDM/ADM), with t floored at 1e-5;
    * ``"discrete"``: i * scale / num_levels for the discrete level i = round(t * num_levels) - 1
      (SPD's i * 1000 / T; a continuous-time port maps level i to t = (i + 1) / T, docs/math.md §10).
    """
    t = jnp.asarray(t, jnp.float32)
    if kind == "linear":
        return scale * t
    if kind == "log":
        return jnp.log(jnp.maximum(t, _LOG_T_FLOOR))
    if kind == "discrete":
        if num_levels is None or num_levels < 1:
            raise ValueError(f"time_embedding='discrete' needs num_levels >= 1; got {num_levels}")
        level = jnp.clip(jnp.round(t * num_levels), 1, num_levels) - 1
        return level * (scale / num_levels)
    raise ValueError(f"unknown time_embedding {kind!r}; expected one of {TIME_EMBEDDINGS}")


def sinusoidal_embedding(label: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Transformer-style embedding [cos(label f_j), sin(label f_j)] of a (B,) label -> (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = label[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def norm_groups_for(channels: int, max_groups: int = 32) -> int:
    """GroupNorm group count: the largest divisor of ``channels`` not above min(max_groups, C/4)."""
    groups = max(min(max_groups, channels // 4), 1)
    while channels % groups:
        groups -= 1
    return groups


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, epsilon: float = 1e-5) -> jax.Array:
    """GroupNorm of channels-last features x (B, ..., C) with per-channel ``scale`` and ``bias``.

    Statistics are taken in float32 over the spatial axes and the C / groups channels of each group,
    with the variance from the centred values (two passes, no cancellation). The spatial sums run
    per channel first (a reduction over the leading axes with the channels contiguous) and the
    groups are summed from those; on XLA:CPU this is several times faster than reducing a
    (B, ..., G, C / G) view, and the normalisation is a single multiply-add per element.
    """
    batch, channels = x.shape[0], x.shape[-1]
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} groups")
    per_group = channels // groups
    axes = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * per_group
    bcast = (batch,) + (1,) * len(axes) + (channels,)

    def group_mean(values):  # (B, ..., C) -> (B, C): the mean over each channel's group, repeated
        sums = jnp.sum(values, axis=axes).reshape(batch, groups, per_group).sum(-1)
        return jnp.repeat(sums / count, per_group, axis=1)

    xf = x.astype(jnp.float32)
    centred = xf - group_mean(xf).reshape(bcast)
    gain = jax.lax.rsqrt(group_mean(jnp.square(centred)) + epsilon) * scale
    return centred * gain.reshape(bcast) + bias


class GroupNorm(nn.Module):
    """GroupNorm over channels-last features (:func:`group_norm`), output in ``dtype``.

    Its parameters are those of ``flax.linen.GroupNorm``: ``scale`` (ones) and ``bias`` (zeros),
    both (C,) float32, so checkpoints are interchangeable. Outputs and gradients agree with it to
    float32 rounding on well-scaled features; on features with large offsets this form is the more
    accurate one (Flax's default variance is one-pass). tests/test_models.py checks both.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def _group_norm(channels: int, max_groups: int, dtype=jnp.float32, name: str | None = None) -> GroupNorm:
    # statistics in float32 whatever the compute dtype
    return GroupNorm(num_groups=norm_groups_for(channels, max_groups), epsilon=1e-5, dtype=dtype, name=name)


def _resample(x: jax.Array, mode: str | None) -> jax.Array:
    """2x nearest up-sampling ("up"), 2x2 average pooling ("down") or nothing (None)."""
    if mode == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if mode == "down":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    return x


class FiLM(nn.Module):
    """Per-channel scale and shift, each (B, C), from the time embedding: one dense layer to 2C.

    The parameters are those of ``flax.linen.Dense(2 * channels)`` (``kernel`` (E, 2C), LeCun
    normal; ``bias`` (2C,), zeros) and the values are its output split in two halves. The bias is
    added to each half after the split, not before: XLA:CPU fuses the FiLM into the GroupNorm and
    SiLU loop that follows, and there one (B, 2C) sum read through two slices makes that loop several
    times slower (docs/results.md). The arithmetic is the same, so the outputs are bitwise equal.
    """

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (emb.shape[-1], 2 * self.channels), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (2 * self.channels,), jnp.float32)
        emb, kernel, bias = nn.dtypes.promote_dtype(emb, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(emb, kernel, (((emb.ndim - 1,), (0,)), ((), ())))
        c = self.channels
        return y[..., :c] + bias[:c], y[..., c:] + bias[c:]


class ResBlock(nn.Module):
    """Residual block: GN-SiLU-conv, FiLM from the time embedding, GN-SiLU-dropout-conv, skip.

    ``resample`` ("up", "down" or None) resamples both paths inside the block (BigGAN/EDM style).
    The second convolution starts at zero, so a fresh block is the identity (or its 1x1 skip).
    """

    out_channels: int
    dropout: float = 0.0
    norm_groups: int = 32
    resample: str | None = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(_group_norm(x.shape[-1], self.norm_groups, dtype=self.dtype, name="norm_in")(x))
        h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv_in")(h)
        scale, shift = FiLM(self.out_channels, dtype=self.dtype, name="film")(nn.silu(emb))
        h = (
            _group_norm(self.out_channels, self.norm_groups, dtype=self.dtype, name="norm_out")(h)
            * (1.0 + scale[:, None, None, :])
            + shift[:, None, None, :]
        )
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
        h = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype, name="conv_out")(
            h
        )
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class SelfAttention(nn.Module):
    """Residual multi-head self-attention over all pixels (pre-GroupNorm, zero-initialised output).

    Heads: ``head_channels`` channels each when given (EDM), else ``num_heads`` (guided-diffusion).
    """

    num_heads: int = 4
    head_channels: int | None = None
    norm_groups: int = 32
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        heads = channels // self.head_channels if self.head_channels else self.num_heads
        if heads < 1 or channels % heads:
            raise ValueError(
                f"attention over {channels} channels cannot be split into {heads} heads"
            )
        width_per_head = channels // heads
        h = _group_norm(channels, self.norm_groups, dtype=self.dtype, name="norm")(x)
        qkv = nn.Dense(3 * channels, dtype=self.dtype, name="qkv")(h.reshape(batch, height * width, channels))
        # heads-major (B, 3H, T, c) once, so that both products are plain batched matmuls over
        # (B, H) with no transposes of the (T, T) weights (measured faster on XLA:CPU, docs/results.md)
        qkv = qkv.reshape(batch, height * width, 3 * heads, width_per_head).transpose(0, 2, 1, 3)
        q, k, v = jnp.split(qkv, 3, axis=1)
        logits = jnp.einsum("bhqc,bhkc->bhqk", q * (1.0 / math.sqrt(width_per_head)), k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkc->bhqc", weights, v).transpose(0, 2, 1, 3)
        out = nn.Dense(channels, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj")(
            out.reshape(batch, height * width, channels)
        )
        return x + out.reshape(x.shape)


class Decouple(nn.Module):
    """DDM's "decouple" block opening each decoder: a 3x3 conv, then a sigmoid spatial gate.

    The gate is computed from the channel mean and max at each pixel by a 7x7 conv (the official
    module's exact layer sizes are not specified in docs/math.md §8; this is spd_jax's reading).
    """

    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name="conv")(h)
        pooled = jnp.concatenate([h.mean(-1, keepdims=True), h.max(-1, keepdims=True)], axis=-1)
        return h * nn.sigmoid(nn.Conv(1, (7, 7), dtype=self.dtype, name="gate")(pooled))


class HyperAdapter(nn.Module):
    """SMD's per-pixel hypernetwork f_phi (docs/math.md §8), applied to features h given the latent z.

    Per pixel: u_l = A_l z + c_l (d -> d), M_l = u_l u_l^T + softplus(s_l) I, h' = P_in h,
    h' <- M_L ... M_1 h', output h + P_out h'. The default computes M_l h' = u_l (u_l . h') +
    softplus(s_l) h' and never forms a d x d matrix; ``materialize=True`` builds every M_l
    explicitly (the official code's form, kept as a slow reference for tests). Both forms use the
    same parameters. A_l starts with variance 1/d^2 so that |u_l|^2 ~ |z|^2 / d, and P_out starts
    at zero so that a fresh adapter is the identity.
    """

    latent_dim: int
    depth: int = 2
    materialize: bool = False
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, h: jax.Array, z: jax.Array) -> jax.Array:
        if z.shape[:-1] != h.shape[:-1] or z.shape[-1] != self.latent_dim:
            raise ValueError(
                f"latent z must have shape {h.shape[:-1] + (self.latent_dim,)} to match the features; "
                f"got {z.shape}"
            )
        hp = nn.Dense(self.latent_dim, dtype=self.dtype, name="proj_in")(h)
        u_init = nn.initializers.variance_scaling(1.0 / self.latent_dim, "fan_in", "normal")
        for layer in range(self.depth):
            u = nn.Dense(self.latent_dim, kernel_init=u_init, dtype=self.dtype, name=f"u_{layer}")(z)
            gain = nn.softplus(self.param(f"log_scale_{layer}", nn.initializers.zeros, ()))
            if self.materialize:
                eye = jnp.eye(self.latent_dim, dtype=hp.dtype)
                matrix = u[..., :, None] * u[..., None, :] + gain * eye
                hp = jnp.einsum("...ij,...j->...i", matrix, hp)
            else:
                hp = u * jnp.sum(u * hp, axis=-1, keepdims=True) + gain * hp
        return h + nn.Dense(h.shape[-1], kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj_out")(hp)


class TimeEmbedding(nn.Module):
    """t in [0, 1] (B,) -> (B, 4 * base) through the time label, a sinusoid and a 2-layer MLP."""

    base_channels: int
    kind: str = "linear"
    scale: float = 1000.0
    num_levels: int | None = None
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        label = time_label(t, self.kind, self.scale, self.num_levels)
        emb = sinusoidal_embedding(label, self.base_channels)
        emb = nn.silu(nn.Dense(4 * self.base_channels, dtype=self.dtype, name="dense_0")(emb))
        return nn.Dense(4 * self.base_channels, dtype=self.dtype, name="dense_1")(emb)


class Encoder(nn.Module):
    """Input conv, then per level ``num_res_blocks`` blocks (+ attention) and a 2x down-sampling.

    Returns the bottleneck features and every intermediate feature map (the skip connections).
    """

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    head_channels: int | None
    dropout: float
    norm_groups: int
    resample: str
    input_kernel: int
    hyper_dim: int | None
    hyper_depth: int
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, x, emb, latent, train: bool):
        k = self.input_kernel
        h = nn.Conv(self.base_channels * self.channel_mult[0], (k, k), dtype=self.dtype, name="conv_in")(x)
        if self.hyper_dim is not None:
            h = HyperAdapter(self.hyper_dim, self.hyper_depth, dtype=self.dtype, name="hyper_in")(h, latent)
        skips = [h]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = ResBlock(
                    self.base_channels * mult,
                    self.dropout,
                    self.norm_groups,
                    dtype=self.dtype, name=f"level{level}_block{i}",
                )(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = SelfAttention(
                        self.num_heads,
                        self.head_channels,
                        self.norm_groups,
                        dtype=self.dtype, name=f"level{level}_attn{i}",
                    )(h)
                skips.append(h)
            if level != last:
                name = f"level{level}_down"
                if self.resample == "resblock":
                    h = ResBlock(h.shape[-1], self.dropout, self.norm_groups, "down", dtype=self.dtype, name=name)(
                        h, emb, train
                    )
                else:
                    h = nn.Conv(
                        h.shape[-1], (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=name
                    )(h)
                skips.append(h)
        return h, tuple(skips)


class Decoder(nn.Module):
    """Optional decouple block, middle block (res-attn-res), up path mirroring the encoder, head.

    The head is GroupNorm, SiLU and a 3x3 conv to ``out_channels`` (zero-initialised unless
    ``zero_output_init=False``). With ``hyper_dim`` set, SMD's second hypernetwork site sits after
    the last residual block, before the head.
    """

    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    head_channels: int | None
    dropout: float
    norm_groups: int
    resample: str
    out_channels: int
    decouple: bool
    mid_attention: bool
    zero_output_init: bool
    hyper_dim: int | None
    hyper_depth: int
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, h, skips, emb, latent, train: bool):
        skips = list(skips)
        if self.decouple:
            h = Decouple(dtype=self.dtype, name="decouple")(h)
        width = h.shape[-1]
        h = ResBlock(width, self.dropout, self.norm_groups, dtype=self.dtype, name="mid_block0")(h, emb, train)
        if self.mid_attention:
            h = SelfAttention(
                self.num_heads, self.head_channels, self.norm_groups, dtype=self.dtype, name="mid_attn"
            )(h)
        h = ResBlock(width, self.dropout, self.norm_groups, dtype=self.dtype, name="mid_block1")(h, emb, train)
        for level in reversed(range(len(self.channel_mult))):
            channels = self.base_channels * self.channel_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResBlock(
                    channels, self.dropout, self.norm_groups, dtype=self.dtype, name=f"level{level}_block{i}"
                )(h, emb, train)
                if h.shape[1] in self.attention_resolutions:
                    h = SelfAttention(
                        self.num_heads,
                        self.head_channels,
                        self.norm_groups,
                        dtype=self.dtype, name=f"level{level}_attn{i}",
                    )(h)
            if level:
                name = f"level{level}_up"
                if self.resample == "resblock":
                    h = ResBlock(channels, self.dropout, self.norm_groups, "up", dtype=self.dtype, name=name)(
                        h, emb, train
                    )
                else:
                    h = nn.Conv(channels, (3, 3), dtype=self.dtype, name=name)(_resample(h, "up"))
        if self.hyper_dim is not None:
            h = HyperAdapter(self.hyper_dim, self.hyper_depth, dtype=self.dtype, name="hyper_out")(h, latent)
        h = nn.silu(_group_norm(h.shape[-1], self.norm_groups, dtype=self.dtype, name="norm_out")(h))
        init = nn.initializers.zeros if self.zero_output_init else nn.linear.default_kernel_init
        return nn.Conv(self.out_channels, (3, 3), kernel_init=init, dtype=self.dtype, name="conv_out")(h)


class UNet(nn.Module):
    """ADM-style U-Net: ``apply(variables, x, t, cond=None, latent=None, train=False)``.

    Args (module fields):
      base_channels: channels at the first level (guided-diffusion ``model_channels``).
      channel_mult: per-level channel multipliers; level l runs at H / 2^l pixels.
      num_res_blocks: residual blocks per encoder level (the decoder has one more).
      attention_resolutions: spatial sizes (pixels) at which self-attention follows each block.
      num_heads / head_channels: attention heads (fixed count, or channels per head when given).
      dropout: dropout rate inside residual blocks (active only with ``train=True``).
      out_channels: output channels per decoder; None: the channels of ``x``.
      cond_channels: channels of the conditioning image concatenated to ``x`` (0: none).
      resample: "conv" (strided conv / nearest + conv) or "resblock" (resampling residual blocks).
      num_decoders: 1, or 2 for DDM's (c, eps) dual head sharing one encoder.
      first_output_mult: the first decoder outputs this many times ``out_channels`` (2 for DDM's
        linear-attenuation head, whose first decoder predicts (a, C)).
      decouple: open each decoder with DDM's decouple block.
      mid_attention: self-attention in the middle block.
      norm_groups: largest GroupNorm group count (fewer for narrow layers, see
        :func:`norm_groups_for`).
      input_kernel: kernel size of the input conv (3 in ADM, 7 in the SMD code's U-Net).
      zero_output_init: start the output conv at zero (the network initially outputs 0).
      time_embedding, time_scale, time_levels: the time label, see :func:`time_label`.
      hyper_dim, hyper_depth: SMD hypernetwork latent size d and depth L (None: no hypernetwork).

    Call args: x (B, H, W, C) pixel space; t (B,) continuous time in [0, 1]; cond (B, H, W,
    cond_channels) or None; latent (B, H, W, hyper_dim) SMD latent z (required iff hyper_dim).
    Returns (B, H, W, out_channels), or a tuple with one such array per decoder when
    ``num_decoders == 2``.
    """

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (16, 8)
    num_heads: int = 4
    head_channels: int | None = None
    dropout: float = 0.0
    out_channels: int | None = None
    cond_channels: int = 0
    resample: str = "conv"
    num_decoders: int = 1
    first_output_mult: int = 1
    decouple: bool = False
    mid_attention: bool = True
    norm_groups: int = 32
    input_kernel: int = 3
    zero_output_init: bool = True
    time_embedding: str = "linear"
    time_scale: float = 1000.0
    time_levels: int | None = None
    hyper_dim: int | None = None
    hyper_depth: int = 2
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def _check_inputs(self, x, t, cond, latent) -> None:
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, H, W, C); got {x.shape}")
        if jnp.shape(t) != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) to match x; got {jnp.shape(t)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1:3]} must be divisible by {factor} for {len(self.channel_mult)} levels"
            )
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(
                f"unknown resample {self.resample!r}; expected one of {RESAMPLE_MODES}"
            )
        if self.num_decoders not in (1, 2):
            raise ValueError(f"num_decoders must be 1 or 2; got {self.num_decoders}")
        if self.cond_channels:
            if cond is None or cond.shape != x.shape[:3] + (self.cond_channels,):
                got = None if cond is None else cond.shape
                raise ValueError(
                    f"this U-Net needs cond of shape {x.shape[:3] + (self.cond_channels,)}; got {got}"
                )
        elif cond is not None:
            raise ValueError("cond was given but the U-Net was built with cond_channels=0")
        if (self.hyper_dim is None) != (latent is None):
            raise ValueError(
                "latent must be given exactly when the U-Net has a hypernetwork (hyper_dim)"
            )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        latent: jax.Array | None = None,
        train: bool = False,
    ):
        self._check_inputs(x, t, cond, latent)
        emb = TimeEmbedding(
            self.base_channels,
            self.time_embedding,
            self.time_scale,
            self.time_levels,
            dtype=self.dtype, name="time_embed",
        )(t)
        inputs = x if cond is None else jnp.concatenate([x, cond.astype(x.dtype)], axis=-1)
        shared = dict(
            base_channels=self.base_channels,
            channel_mult=tuple(self.channel_mult),
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=tuple(self.attention_resolutions),
            num_heads=self.num_heads,
            head_channels=self.head_channels,
            dropout=self.dropout,
            norm_groups=self.norm_groups,
            resample=self.resample,
            hyper_dim=self.hyper_dim,
            hyper_depth=self.hyper_depth,
        )
        h, skips = Encoder(input_kernel=self.input_kernel, dtype=self.dtype, name="encoder", **shared)(
            inputs, emb, latent, train
        )
        outputs = tuple(
            Decoder(
                out_channels=(self.out_channels or x.shape[-1]) * (self.first_output_mult if i == 0 else 1),
                decouple=self.decouple,
                mid_attention=self.mid_attention,
                zero_output_init=self.zero_output_init,
                dtype=self.dtype, name=f"decoder_{i}",
                **shared,
            )(h, skips, emb, latent, train)
            for i in range(self.num_decoders)
        )
        outputs = tuple(o.astype(jnp.float32) for o in outputs)  # losses and samplers work in float32
        return outputs[0] if self.num_decoders == 1 else outputs
