"""Plug-and-play feature injection (METHOD.md section 9): decoder features of the source,
recorded during DDIM inversion, replace the edit's own features in the first sampling
steps.

- `plan`    which layers (the SD1.5 ones, found in any UNet of that family by position),
            which inversion call feeds which sampling step (the two alignments), and the
            store's size per frame and step;
- `bank`    `FeatureBank`: the records, half precision on the CPU, only for the steps that
            will be injected; travels on the inversion and in its cache entry;
- `hooks`   the per-run state and the two taps: an object patch on a decoder ResBlock's
            `forward` (residual branch) and an attn1 input patch (the source's q and k).

Plain torch: the nodes install the taps on a cloned model (nodes/pnp_glue.py)."""
