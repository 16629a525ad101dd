"""The pack's own wire types, declared once (their names are stored in saved workflows)."""
from comfy_api.latest import io

LAYOUT = io.Custom("VIDEOGRAIN_LAYOUT")          # videograin_core.prompts.layout.Layout
TRANSFORM = io.Custom("VIDEOGRAIN_TRANSFORM")    # videograin_core.video.frame_transform.FrameTransform
INVERSION = io.Custom("VIDEOGRAIN_INVERSION")    # videograin_core.sampling.ddim.Inversion
TRAJECTORIES = io.Custom("VIDEOGRAIN_TRAJECTORIES")  # videograin_core.trajectories.stage.ClipTrajectories
P2P = io.Custom("VIDEOGRAIN_P2P")                # videograin_core.p2p.control.P2PControl
CAPTURE = io.Custom("VIDEOGRAIN_ATTENTION_CAPTURE")  # videograin_core.capture.recorder.AttentionRecorder
METRICS_CLIP = io.Custom("VIDEOGRAIN_METRICS_CLIP")  # nodes.metrics_clip.MetricsCLIP
