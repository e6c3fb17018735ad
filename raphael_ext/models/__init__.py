"""RAPHAEL's models as diffusers models: the U-Net, its ControlNet, the OpenCLIP text encoder, and edge detectors."""

from .controlnet import RaphaelControlNet
from .edges import HEDDetector, canny_edges, sobel_edges
from .text_encoder import OpenCLIPTextEncoder, openclip_tokenizer
from .unet import PRESETS, RaphaelUNet, RaphaelUNetOutput

__all__ = ["HEDDetector", "OpenCLIPTextEncoder", "PRESETS", "RaphaelControlNet", "RaphaelUNet", "RaphaelUNetOutput",
           "canny_edges", "openclip_tokenizer", "sobel_edges"]
