"""Sampling: RaphaelPipeline (a diffusers DiffusionPipeline) and the pictures of its diffusion paths."""

from .paths import DiffusionPaths, plot_attention_maps, plot_space_paths, plot_time_experts
from .pipeline_raphael import RaphaelPipeline, RaphaelPipelineOutput, default_scheduler, load_vae

__all__ = ["DiffusionPaths", "RaphaelPipeline", "RaphaelPipelineOutput", "default_scheduler", "load_vae",
           "plot_attention_maps", "plot_space_paths", "plot_time_experts"]
