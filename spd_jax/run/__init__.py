"""The run layer: the only code besides ``launch.py`` that reads an ml_collections config.

Config checks (:mod:`~spd_jax.run.checks`), builders from config to objects
(:mod:`~spd_jax.run.builders`), training (:mod:`~spd_jax.run.train`), one sampling path for
unconditional and task models (:mod:`~spd_jax.run.sampling`), one evaluation pipeline
(:mod:`~spd_jax.run.evaluate`) and the Fisher path report (:mod:`~spd_jax.run.path_report`).
"""
