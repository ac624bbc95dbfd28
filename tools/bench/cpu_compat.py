"""Compatibility shims for the reference side, each changing no result:
- on MLX's CPU backend, whose gather_mm takes float32 operands only, expert matmuls widen
  their operands (exact) and round the product back to the activations' dtype — what this
  runtime's own CPU path does (a no-op off the CPU);
- mlx-lm's quantized expert layer is called without a keyword MLX 0.32.2 lacks (below)."""
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

# mlx-lm 0.32.2's quantized expert layer passes `global_scale=` to gather_qmm, a keyword the
# MLX 0.32.2 binding does not have (on every device). It is always None for affine
# quantization, so leaving it out changes nothing.
if "global_scale" not in (mx.gather_qmm.__doc__ or ""):
    import mlx_lm.models.switch_layers as lm_switch_q

    def _without_global_scale(self, x, indices, sorted_indices=False):
        if self.get("global_scale") is not None:
            raise NotImplementedError("global_scale needs a newer MLX")
        y = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    lm_switch_q.QuantizedSwitchLinear.__call__ = _without_global_scale
