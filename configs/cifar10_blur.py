"""Blurring diffusion (Hoogeboom & Salimans) on CIFAR-10: DCT-basis process with the default
blur schedule (sigma_B,max = 20), eps head, the DDPM U-Net, Adam lr 2e-4, EMA 0.9999, flips.

The eps head is the paper's; x0 = (x_t - sigma eps) / alpha_t(k) divides by alpha_t(k) >= 0.001 a_t
at high frequencies, and on digits an eps-head model's samples stay noise at short budgets while an
x0 head works (README, "Quality versus NFE"): consider ``--config.model.head=x0``."""

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
