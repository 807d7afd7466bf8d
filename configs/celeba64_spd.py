"""SPD on CelebA at 64x64 (140 px center crop, bicubic resize), estimated spectrum, flips; a
(1, 2, 2, 2) U-Net with attention at 16 and 8 px. Needs the prepared TFDS dataset
(``python -m spd_jax.prepare celeb_a --data_dir=D --archive=DIR``)."""

from configs import cifar10_spd


def get_config():
    config = cifar10_spd.get_config()
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.model.dropout = 0.1
    config.train.batch_size = 128
    return config
