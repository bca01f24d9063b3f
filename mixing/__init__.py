"""The mixing stage: saliency from the model, in-place Saliency Grafting / SAGE / Mixup / CutMix,
soft targets, and the two-pass training step."""
