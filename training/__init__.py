"""What the trainer uses: the config engine, checkpoints, the process group and reporting."""
