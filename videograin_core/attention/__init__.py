"""Attention: the ST-Layout modulated kernel and the all-frames kernel (memory linear in
the frame count), the CPU C kernel behind them, the region terms at each token grid, and
the attention runtime: the one attn1/attn2 function per layer that the pack registers, a
pipeline of stages that reads the published batch layout."""
