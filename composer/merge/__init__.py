"""Weight merging of checkpoints and LoRAs (issue 5): pure tensor methods in ``methods``."""
