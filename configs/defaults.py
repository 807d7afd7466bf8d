"""Defaults shared by every training config; each experiment file overrides what it changes.

Sizes are in pixels, learning rates per optimiser step, batch sizes global (all devices of all
processes). Every field can be overridden on the command line: ``--config.train.num_steps=500``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.job = "train"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # digits | patches | mixture2d | cifar10 | celeb_a | mnist | fashion_mnist | svhn_cropped
    config.data.tfds_data_dir = ""  # TFDS data_dir of a prepared dataset ("" = TFDS's default)
    config.data.image_size = 0  # resize TFDS images to this size (0 = native size)
    config.data.flip = False  # random horizontal flips
    config.data.crops_per_photo = 512  # patches: random 32x32 training crops per photograph
    config.data.num_threads = 2  # grain reader threads per process (0 = read in the main thread)
    config.data.prefetch = 0  # batches read ahead per process (0 = max(4, num_threads))
    config.data.worker_count = 0  # grain worker processes per process (0 = none)
    config.data.worker_buffer = 2  # batches each worker keeps ready
    config.data.uint8 = False  # ship uint8 images; scaling and flips run on the device (not for digits)
    config.data.seed = 0  # shuffling / flip seed (the embedded test split uses seed 0)

    config.process = ml_collections.ConfigDict()
    config.process.name = "spd"  # see spd_jax.diffusion.processes.PROCESS_NAMES
    config.process.spectrum = "estimate"  # SPD: "estimate" from training data, or the CIFAR-10 "preset"
    config.process.spectrum_images = 10000  # images used for the spectrum estimate
    config.process.per_channel = True  # per-channel spectrum (False: channel-averaged)
    config.process.num_levels = 0  # vp_linear: discrete DDPM table with this T (0 = continuous)

    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters, optimiser, loss stay float32)
    config.model.kind = "unet"  # unet | smd (U-Net with SMD latent network and hypernetworks) | mlp | smd_mlp
    config.model.head = "eps"  # eps | x0 | v | flow | score | ddm_dual | ddm_c
    config.model.base_channels = 64
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = ()  # spatial sizes (pixels) with self-attention
    config.model.num_heads = 4
    config.model.head_channels = 0  # channels per attention head (0 = use num_heads)
    config.model.dropout = 0.0
    config.model.resample = "conv"  # conv | resblock
    config.model.decouple = False  # DDM decouple block at the start of each decoder
    config.model.mid_attention = False
    config.model.norm_groups = 32
    config.model.input_kernel = 3
    config.model.time_embedding = "linear"  # linear (1000 t) | log (log t) | discrete
    config.model.latent_dim = 100  # smd: latent channels per pixel (d)
    config.model.latent_base_channels = 32  # smd, smd_mlp: width of the latent network g_xi
    config.model.mlp_width = 256  # mlp, smd_mlp: hidden width of the denoiser MLP
    config.model.mlp_blocks = 3  # mlp, smd_mlp: residual blocks of the denoiser MLP (g_xi: 2)

    config.loss = ml_collections.ConfigDict()
    config.loss.t_min = 1e-4  # training times t ~ U(t_min, t_max)
    config.loss.t_max = 1.0
    config.loss.ddm_weighting = "ddm_public"  # DDM heads: see spd_jax.losses.DDM_WEIGHTINGS
    config.loss.ddm_rec_weight = 1.0
    config.loss.smd = "single_eta"  # smd models: single_eta (official) | mixture (K-sample log-mean-exp)
    config.loss.smd_samples = 8  # smd mixture: latent samples K per example
    config.loss.smd_step = 0.0  # smd mixture: reverse step in t (0 = one level of a discrete process)
    config.loss.smd_bandwidth = 0.0  # smd mixture: x0-space std tau added to each component (> 0: trains the step to t = 0)

    config.optim = ml_collections.ConfigDict()
    config.optim.learning_rate = 2e-4
    config.optim.warmup_steps = 100
    config.optim.schedule = "constant"  # constant | cosine (to end_factor * lr at train.num_steps)
    config.optim.end_factor = 0.0
    config.optim.weight_decay = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 1.0  # global-norm clipping (0 = off)

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128  # global batch
    config.train.num_steps = 1000
    config.train.steps_per_dispatch = 1  # optimiser steps per jitted call (lax.scan; keep 1 on CPU)
    config.train.ema = 0.999  # with warm-up: min(ema, (1 + n) / (10 + n))
    config.train.log_every = 50
    config.train.sample_every = 0  # sample grid every this many steps (0 = only at the end)
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.fast_compile = False  # compile without XLA backend optimisation (smoke tests)
    # persistent XLA cache: "" = $SPD_JAX_COMPILATION_CACHE or ~/.cache/spd_jax/xla; "off" disables
    config.train.compile_cache_dir = ""
    config.train.max_nonfinite_streak = 20  # stop after this many skipped (non-finite) updates in a row

    config.sample = ml_collections.ConfigDict()
    config.sample.method = "gradient_estimation"  # see spd_jax.diffusion.samplers.METHODS
    config.sample.nfe = 10  # network evaluations (the largest step count within it)
    # time grid: spd_jax.diffusion.grids.GRIDS, "tuned:NAME" (WORKDIR/tuned/NAME.json from --mode=tune) or a
    # JSON path; "" = the method's default
    config.sample.grid = ""
    config.sample.t_max = 1.0 - 1e-3  # first (noisiest) grid level
    config.sample.clip_x0 = True  # clip x0_hat to [-1, 1] (learned pixel-space models, docs/math.md §10)
    config.sample.grid_images = 64  # images in each training sample grid (0 = no grids)
    config.sample.num_samples = 64  # --mode=sample: images written
    config.sample.batch_size = 256  # images per sampler call
    config.sample.seed = 1
    config.sample.upscale = 1  # nearest-neighbour magnification of grid PNGs
    # method knobs, e.g. gamma, eta, kappa, order; on the command line as one dict:
    # --config.sample.options='{"order": 3}'
    config.sample.options = ml_collections.ConfigDict()

    # image-conditioned tasks (spd_jax.run.sampling); name "" = unconditional generation
    config.task = ml_collections.ConfigDict()
    config.task.name = ""  # "" | sr (super-resolution) | inpaint
    config.task.factor = 4  # sr: area down-sampling factor (2 or 4)
    config.task.mask = "box"  # inpaint: box | free_form (per-example random masks)
    config.task.enforce_known = True  # inpaint: re-impose the known pixels at every sampler step
    config.task.inputs = ""  # --mode=sample: comma list of image files ("" = the held-out split)

    config.eval = ml_collections.ConfigDict()  # --mode=eval (see spd_jax.run.evaluate)
    config.eval.checkpoint_step = 0  # checkpoint evaluated (0 = the latest)
    # comma-separated "sampler:NFE" entries; config.sample.grid/options apply to config.sample.method only
    config.eval.settings = ("gradient_estimation:5,gradient_estimation:10,gradient_estimation:20,"
                            "ddim:5,ddim:10,ddim:20")
    config.eval.metrics = ""  # comma list of pixel_fd,swd,classifier,fid,kid ("" = per-dataset default)
    config.eval.num_samples = 0  # samples per setting (0 = 50,000 with FID/KID, else 1000)
    config.eval.allow_small_sample = False  # FID/KID with < 50,000 samples (stamped as an override)
    config.eval.inception_weights = ""  # converted Inception .npz; enables FID by default on 32 px+ RGB sets
    config.eval.reference_split = "test"  # held-out split for the weights-free metrics
    config.eval.fid_reference_split = "train"  # reference split of FID/KID (the papers' protocol)
    config.eval.floor = True  # also score real training images against the reference (the floor)
    config.eval.name = ""  # results under WORKDIR/eval/<name> ("" = step_<checkpoint step>)
    config.eval.batch_size = 0  # images per sampler call (0 = config.sample.batch_size)
    config.eval.seed = 0  # sampling key jax.random.key(seed); also seeds SWD directions and subsets
    config.eval.grid_images = 64  # samples in each setting's grid.png

    config.tune = ml_collections.ConfigDict()  # --mode=tune (see spd_jax.run.tune)
    # robust | nominal: the exact law of the training data's spectrum (no checkpoint needed);
    # teacher: the trained EMA model's own samples, matched to a many-step teacher from the same noise
    config.tune.objective = "robust"
    config.tune.iterations = 0  # Adam iterations (0 = the objective's default: 200 exact law, 300 teacher)
    config.tune.learning_rate = 0.0  # Adam (0 = the objective's default: 0.05 exact law, 0.01 teacher)
    config.tune.start = ""  # warm start: an earlier tuning of the same sampler (name under WORKDIR/tuned or path)
    config.tune.teacher = ""  # teacher objective: "sampler:NFE" ("" = config.sample.method at 50 NFE)
    config.tune.num_examples = 512  # teacher objective: starting states (a quarter held out to pick the best)
    config.tune.batch_size = 64  # teacher objective: examples per Adam step
    config.tune.time_shift = True  # teacher objective: also tune each step's network time shift (samplers.network_times)
    config.tune.seed = 7  # teacher objective: key of the starting states (indices after the eval's)

    # predict-project projection network T_theta (docs/math.md §5.4, §6.6; spd_jax.run.projection):
    # with score_workdir set, config.model is T_theta's own U-Net, trained against the frozen EMA score
    # model of that run (same data and process), and --mode=sample/eval run predict_project with it
    config.projection = ml_collections.ConfigDict()
    config.projection.score_workdir = ""  # workdir of the trained score model ("" = an ordinary run)
    config.projection.num_steps = 10  # sampler steps N T_theta is trained for (dt = 1/N; total NFE 2N)

    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False  # call jax.distributed.initialize (also if JAX_COORDINATOR_ADDRESS is set)
    config.distributed.coordinator_address = ""  # host:port of process 0 ("" = from the environment)
    config.distributed.num_processes = 0  # 0 = from the environment
    config.distributed.process_id = -1  # -1 = from the environment
    return config
