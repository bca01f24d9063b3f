"""The mixing stage: saliency from the model, in-place Saliency Grafting / SAGE / Mixup / CutMix,
soft targets, and the two-pass training step."""
from .base import MixResult, Mixer, soft_target_cross_entropy
from .baselines import CutMix, Mixup
from .grafting import SaliencyGrafting
from .sage import SAGE
from .saliency import FeatureSaliency, find_feature_layer, gradient_saliency
from .step import StepOutput, TwoPassStep, no_stage

__all__ = ["CutMix", "FeatureSaliency", "MixResult", "Mixer", "Mixup", "SAGE", "SaliencyGrafting",
           "StepOutput", "TwoPassStep", "find_feature_layer", "gradient_saliency",
           "no_stage", "soft_target_cross_entropy"]
