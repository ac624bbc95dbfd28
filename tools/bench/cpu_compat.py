"""Lets mlx-lm / mlx-vlm run bf16 MoE checkpoints on MLX's CPU backend, whose gather_mm takes
float32 operands only: expert matmuls widen their operands (exact) and round the product back
to the activations' dtype — what this runtime's own CPU path does. A no-op off the CPU."""
import mlx.core as mx

if mx.default_device() == mx.cpu:
    import mlx_lm.models.switch_layers as lm_switch
    import mlx_vlm.models.switch_layers as vlm_switch

    def _widened(self, x, indices, sorted_indices=False):
        y = mx.gather_mm(
            x.astype(mx.float32),
            self["weight"].astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        ).astype(x.dtype)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    lm_switch.SwitchLinear.__call__ = _widened
    vlm_switch.SwitchLinear.__call__ = _widened
