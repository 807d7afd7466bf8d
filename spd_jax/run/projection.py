"""Projection runs: the predict-project network T_theta trained and sampled from a config
(docs/math.md §5.4, §6.6).

A config with ``config.projection.score_workdir`` set is a projection run. ``config.model`` is then
T_theta's own U-Net (its zero-initialised output layer makes the untrained T = 0, plain
Euler-Maruyama); the score model is the EMA checkpoint of that workdir, restored with its own
training config (read from the checkpoint) and frozen: it is a constant of the loss, never an
optimiser parameter, so the projection run's checkpoints hold T_theta alone. Data and process must
be the score model's (:func:`score_config` checks them); the spectrum is the score checkpoint's.

Training pairs follow :func:`spd_jax.losses.make_projection_loss` with dt = 1/N, N =
``config.projection.num_steps``: x_t ~ q(x_t | x_0) with t ~ U(dt, ``config.sample.t_max``), one
predict step of the frozen score model, target the forward mean at t' = t - dt (so t' covers the
sampler's levels down to 0).

Sampling (``--mode=sample`` / ``--mode=eval`` of the projection workdir) runs ``predict_project``
with projection = T_theta (:func:`spd_jax.models.heads.model_projection`): N score calls (``nfe``)
plus N projection calls (``aux_nfe``), a total of 2N, the surrogate's count. Other samplers in an
eval's settings sample the score model alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ml_collections
from etils import epath

from spd_jax import losses, training
from spd_jax.models.heads import model_denoiser
from spd_jax.run import builders
from spd_jax.run.checks import ConfigError
from spd_jax.training import checkpoint

#: the fields a projection run must share with its score model (None = the whole block)
SHARED_FIELDS = {"data": ("name", "image_size"), "process": None}


def is_projection_run(config) -> bool:
    """Whether ``config`` trains (or samples with) a projection network."""
    block = config.get("projection", None)
    return block is not None and bool(block.score_workdir)


def _read_meta(workdir: str) -> tuple[dict, dict]:
    """(arrays, meta) of the latest checkpoint of the score run in ``workdir``."""
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    missing = (f"config.projection.score_workdir = {workdir!r} holds no checkpoints ({ckpt_dir}): train the score "
               "model there first")
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(missing)
    ckpt = checkpoint.Checkpointer(ckpt_dir, 1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(missing)
        return ckpt.restore_meta(step)
    finally:
        ckpt.close()


def score_config(config) -> ml_collections.ConfigDict:
    """The score model's training config, read from the latest checkpoint in
    ``config.projection.score_workdir``; raises FileNotFoundError naming the path when there is none
    and :class:`ConfigError` when data or process differ from ``config``'s."""
    workdir = str(config.projection.score_workdir)
    _, meta = _read_meta(workdir)
    saved = meta.get("config")
    if not saved:
        raise ConfigError(f"the checkpoint in config.projection.score_workdir = {workdir!r} holds no config")
    score = ml_collections.ConfigDict(saved)
    if is_projection_run(score):
        raise ConfigError(f"config.projection.score_workdir = {workdir!r} is itself a projection run; name the "
                          "score model's workdir")
    for block, fields in SHARED_FIELDS.items():
        mine, theirs = config[block].to_dict(), score[block].to_dict()
        for field in fields or mine:
            if mine.get(field) != theirs.get(field):
                raise ConfigError(f"config.{block}.{field} = {mine.get(field)!r} differs from the score model's "
                                  f"{theirs.get(field)!r} in {workdir}: a projection network is trained on the "
                                  "score model's data and process")
    return score


class Score(NamedTuple):
    """The frozen score model of a projection run."""

    restored: builders.Restored  # EMA parameters, model, process, image shape
    head: str  # its prediction head
    workdir: str
    spectrum: Any  # its checkpoint's spectrum (float64), which defines the process


def restore_score(config) -> Score:
    """The EMA score model of ``config.projection.score_workdir`` (latest checkpoint)."""
    score = score_config(config)
    workdir = str(config.projection.score_workdir)
    restored = builders.restore_ema(score, workdir)
    arrays, _ = _read_meta(workdir)
    return Score(restored, str(score.model.head), workdir, arrays["spectrum"])


def build_loss(config, model, score: Score) -> training.LossFn:
    """T_theta's loss (:func:`spd_jax.losses.make_projection_loss`) against the frozen score model."""
    s = score.restored
    denoiser = model_denoiser(s.model, s.variables, s.process, score.head)
    return losses.make_projection_loss(model, s.process, denoiser, num_steps=int(config.projection.num_steps),
                                       t_min=0.0, t_max=float(config.sample.t_max))


class SamplingParts(NamedTuple):
    """What the samplers of a run need: for a projection run the score model with variables
    {"score": its EMA params, "projection": T_theta's}, else the run's own model."""

    restored: builders.Restored
    head: str
    projection_model: Any  # T_theta's module, or None
    score: Score | None


def sampling_parts(config, restored: builders.Restored) -> SamplingParts:
    """The sampling view of a restored run (see :class:`SamplingParts`)."""
    if not is_projection_run(config):
        return SamplingParts(restored, str(config.model.head), None, None)
    score = restore_score(config)
    s = score.restored
    if tuple(s.shape) != tuple(restored.shape):
        raise ConfigError(f"the projection network was trained on {restored.shape} images, the score model in "
                          f"{score.workdir} on {s.shape}")
    variables = {"score": s.variables, "projection": restored.variables}
    return SamplingParts(restored._replace(variables=variables, model=s.model, process=s.process), score.head,
                         restored.model, score)


def check_resume(config, meta: dict, where: str) -> None:
    """Raise :class:`ConfigError` when a projection run resumes with another step count N than its
    checkpoint ``meta`` was trained for (T_theta's dt = 1/N would change mid-run)."""
    saved = ((meta.get("config") or {}).get("projection") or {}).get("num_steps")
    if is_projection_run(config) and saved is not None and saved != config.projection.num_steps:
        raise ConfigError(f"config.projection.num_steps = {config.projection.num_steps} differs from the checkpoint's "
                          f"{saved} in {where}: the projection network is trained for one step count; use a new workdir")
