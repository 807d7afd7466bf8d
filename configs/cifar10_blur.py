"""Blurring diffusion (Hoogeboom & Salimans) on CIFAR-10: DCT-basis process with the default
blur schedule (sigma_B,max = 20), eps head, the DDPM U-Net, Adam lr 2e-4, EMA 0.9999, flips."""

from configs import cifar10_ddpm


def get_config():
    config = cifar10_ddpm.get_config()
    config.process.name = "blurring"
    config.process.num_levels = 0
    config.model.time_embedding = "linear"
    config.sample.method = "gradient_estimation"
    config.sample.nfe = 10
    config.sample.clip_x0 = True
    return config
