"""The path report: Fisher lengths of every process and the SPD gain picture (no training)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "path_report"
    config.seed = 0
    config.crops_per_photo = 512  # random 32x32 training crops from each bundled photograph
    config.num_points = 2**16  # polyline points of the Fisher-length integral
    config.deviations = (0.05, 0.1, 0.2)  # docs/math.md §3.5 deviation family around the geodesic
    return config
