"""The smallest `train` settings per method that still export (tests of export and of scoring without torch)."""

TRAIN_ARGS = {
    "draem": ["--image-size", "64", "--set", "draem.steps=20", "--set", "draem.recon_width=8",
              "--set", "draem.disc_width=4", "--set", "draem.recon_levels=3", "--set", "draem.disc_levels=3"],
    "csflow": ["--image-size", "96", "--epochs", "2", "--set", "csflow.hidden_channels=16",
               "--set", "csflow.n_blocks=2", "--set", "csflow.kernel_sizes=[3,5]",
               "--set", "csflow.feature_stage=3"],
}  # fmt: skip
