"""torch.nn modules built on raphael_ext.ops."""

from torch import Tensor, nn

from .ops import sigmoid_focal_loss


class EdgeFocalLoss(nn.Module):
    """Edge-supervision loss of RAPHAEL (SPEC §2.5): focal loss between predicted edge logits and target edge
    maps, applied only to samples whose diffusion timestep is <= t_cutoff (T_c = 500 in the paper); the mean
    runs over the elements of those samples, and a batch with none of them gives 0."""

    def __init__(self, t_cutoff: int = 500, alpha: float = 0.5, gamma: float = 2.0):
        super().__init__()
        self.t_cutoff = t_cutoff
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, edge_logits: Tensor, edge_targets: Tensor, timesteps: Tensor) -> Tensor:
        if timesteps.dim() != 1 or timesteps.shape[0] != edge_logits.shape[0]:
            raise ValueError(
                f"EdgeFocalLoss: timesteps must have shape [B] with B = edge_logits.shape[0] = "
                f"{edge_logits.shape[0]}, got {tuple(timesteps.shape)}"
            )
        sample_mask = timesteps.to(edge_logits.device) <= self.t_cutoff
        return sigmoid_focal_loss(edge_logits, edge_targets, self.alpha, self.gamma, "mean", sample_mask)

    def extra_repr(self) -> str:
        return f"t_cutoff={self.t_cutoff}, alpha={self.alpha}, gamma={self.gamma}"


__all__ = ["EdgeFocalLoss"]
