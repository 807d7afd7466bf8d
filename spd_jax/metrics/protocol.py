"""The FID protocol spd_jax reports against, and its stamp on every evaluation report."""

from __future__ import annotations

#: Samples required for an FID comparable with published numbers.
FID_NUM_SAMPLES = 50_000

PROTOCOL = (
    f"FID protocol: pytorch-fid InceptionV3 pool3 (2048-d) features of {FID_NUM_SAMPLES:,} samples, one seed "
    "per sample (the noise of example i at step j is normal(fold_in(fold_in(key, i), j))), EMA weights, the "
    "stated sampler and NFE, the stated last step, samples quantised to 8 bits, against the statistics of the "
    "stated reference split."
)


class SmallSampleError(ValueError):
    """FID or KID was requested with fewer than :data:`FID_NUM_SAMPLES` samples and no override."""


def protocol_stamp(*, num_samples: int, inception: bool, allow_small_sample: bool, seed: int, weights: str,
                   last_step: str, reference: dict, fid_reference: dict | None) -> dict:
    """The protocol block of a report.

    Raises :class:`SmallSampleError` when ``inception`` metrics (FID/KID) are requested with
    fewer than 50,000 samples unless ``allow_small_sample``; the override is then stamped.
    """
    if not inception:
        status = "not applicable: no FID/KID requested"
    elif num_samples >= FID_NUM_SAMPLES:
        status = "met"
    elif allow_small_sample:
        status = (f"OVERRIDE: {num_samples} samples < {FID_NUM_SAMPLES} (allow_small_sample); FID/KID are not "
                  "comparable with published values")
    else:
        raise SmallSampleError(
            f"FID/KID need {FID_NUM_SAMPLES} samples by protocol; got num_samples={num_samples}. Pass "
            "allow_small_sample=True (launch: --config.eval.allow_small_sample=True) to run anyway; the "
            "report is then stamped as an override."
        )
    return {
        "protocol": PROTOCOL,
        "fid_status": status,
        "required_num_samples": FID_NUM_SAMPLES,
        "num_samples": int(num_samples),
        "small_sample_override": bool(inception and allow_small_sample and num_samples < FID_NUM_SAMPLES),
        "seed": int(seed),
        "per_sample_seeds": True,
        "weights": weights,
        "last_step": last_step,
        "reference": reference,
        "fid_reference": fid_reference,
    }


def format_stamp(stamp: dict) -> str:
    """Human-readable lines of a protocol stamp (printed with every report)."""
    lines = [stamp["protocol"], f"  FID protocol status: {stamp['fid_status']}"]
    for name in ("num_samples", "seed", "weights", "last_step", "reference", "fid_reference"):
        lines.append(f"  {name}: {stamp[name]}")
    return "\n".join(lines)
