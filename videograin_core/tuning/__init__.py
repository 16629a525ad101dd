"""T2S tuning (Video-P2P's optional first stage, VIDEO_P2P.md sections 2 and 3).

This subpackage owns, host-free (no ComfyUI import):
- the temporal attention module of the T2S model (`temporal.TemporalAttention`:
  x <- x + TemporalAttn(LayerNorm(x)) after the feed-forward of a transformer block, every
  spatial token attending over the frames of its own sequence, output projection weight
  and bias zero-initialised so that an untuned module is an exact no-op) and the
  callable that applies it after a transformer block (`temporal.TemporalBlockPatch`);
- the tuned weights as one object (`weights.T2SWeights`: the query-projection deltas of
  attn1/attn2 and the temporal modules), their flat safetensors-ready state dict and its
  validation when loaded again;
- the tuning loop (`tune.tune`: AdamW, constant learning rate, gradient clipping, one
  uniform timestep per step, eps MSE) and the fixed-noise clip loss used to measure it,
  both driven through an `eps_fn` the node builds from the host's model;
- `tune.inference_escape`: the module parameters made trainable-graph safe (clones of
  the inference tensors a host loads weights as), restored afterwards.
The node (nodes/t2s_tune.py) wires these into the host: weight patches for the q deltas,
object patches on the transformer blocks' forward for the temporal modules.
"""
