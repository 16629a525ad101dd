"""VideoGrainTrajectoryAttention: adds trajectory attention (METHOD.md section 8) to a model
the ST-Layout Patch prepared, as a stage of the pack's attention runtime: after each
self-attention over all frames at the chosen grids, every token attends along its own flow
path. Returns a patched copy; works in inversion and sampling."""
from __future__ import annotations

from comfy_api.latest import io

from ..videograin_core.attention.runtime import STLayoutRuntime, with_stage
from ..videograin_core.trajectories.stage import RESOLUTIONS, TrajectoryStage
from .st_layout_patch import pack_runtime, per_sequence_shape
from .wire_types import TRAJECTORIES

WRAPPER_KEY = "videograin_trajectory_check"


def has_pack_runtime(model) -> bool:
    """The ST-Layout Patch's runtime, not the bare one an attention capture installs."""
    return isinstance(pack_runtime(model), STLayoutRuntime)


def check_latent(trajectories, latent_shape) -> None:
    """Errors before sampling: the trajectories must be of the latent's clip and size."""
    if len(latent_shape) != 4:
        return
    frames, _, h, w = latent_shape
    th, tw = trajectories.frame_hw
    if frames != trajectories.frames or (th, tw) != (h * 8, w * 8):
        raise ValueError(f"trajectories: they were computed from {trajectories.frames} frames of {tw}x{th} but the "
                         f"video latent is {frames} frames of {w * 8}x{h * 8}: compute them from the same frames the "
                         f"latent is made of (the Video Loader's images)")


class VideoGrainTrajectoryAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="VideoGrainTrajectoryAttention",
            display_name="VideoGrain Trajectory Attention",
            category="VideoGrain",
            description="Temporal consistency (FLATTEN-style, as the VideoGrain reference ships it): after the "
                        "self-attention over all frames, each token attends to the tokens on its own optical-flow "
                        "path. Connect the ST-Layout Patch's model; use the result for inversion and sampling.",
            inputs=[
                io.Model.Input("model", tooltip="The output of VideoGrain ST-Layout Patch"),
                TRAJECTORIES.Input("trajectories", tooltip="VideoGrain Flow Trajectories of the source frames"),
                io.Combo.Input("resolutions", options=list(RESOLUTIONS), default="full",
                               tooltip="Token grids that use it: the full-resolution layers (the reference's "
                                       "default), optionally also 1/2 and 1/4"),
            ],
            outputs=[io.Model.Output("patched_model", display_name="model")],
        )

    @classmethod
    def execute(cls, model, trajectories, resolutions="full") -> io.NodeOutput:
        import comfy.patcher_extension

        if resolutions not in RESOLUTIONS:
            raise ValueError(f"resolutions must be one of {', '.join(RESOLUTIONS)}, got {resolutions!r}")
        if not hasattr(trajectories, "at_grid"):
            raise ValueError("trajectories: expected a VIDEOGRAIN_TRAJECTORIES from VideoGrain Flow Trajectories")
        if not has_pack_runtime(model):
            raise ValueError("model: trajectory attention runs inside VideoGrain's attention runtime: connect the "
                             "model output of VideoGrain ST-Layout Patch here")
        patched = model.clone()
        with_stage(patched.model_options.setdefault("transformer_options", {}),
                   TrajectoryStage(trajectories, RESOLUTIONS[resolutions]))

        def check_before_sampling(executor, noise, *args, **kwargs):
            to = getattr(executor.class_obj, "model_options", {}).get("transformer_options", {})
            check_latent(trajectories, per_sequence_shape(noise.shape, to))
            return executor(noise, *args, **kwargs)

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                     check_before_sampling)
        return io.NodeOutput(patched)


NODES = [VideoGrainTrajectoryAttention]
