"""What PnP records and when (METHOD.md section 9).

Layers. The reference records, in SD1.5's decoder (diffusers names -> the host's):
- the residual branch (second conv's output, before the skip add) of up_blocks[1].resnets[0]
  and [1] and up_blocks[2].resnets[0] = output_blocks 3.0, 4.0 and 6.0;
- the self-attention queries and keys of up_blocks[1].attentions[1, 2], up_blocks[2].
  attentions[0, 1, 2] and up_blocks[3].attentions[0] = output 4, 5, 6, 7, 8, 9 (index 0).
They are found here by position (decoder level u, 0 = lowest resolution, and block r within
it), so a UNet of the same family with fewer blocks per level (the test models) gets the
blocks at those positions that it has.

What is stored for the queries and keys is the attention layer's input (norm1(x), "n"):
the layer's own to_q and to_k make the source's q and k from it at injection, bit for bit
the ones the source call computed, at half the memory of storing q and k.

Steps. Sampling step i (descending schedule, i = 0 at the top timestep) injects, for
i < inject_step:
- `reference` (the official code): the record of the inversion call ONE schedule step lower
  than the step's timestep (step 0 at t = 981 gets the call at t = 961 for 50 steps);
- `aligned`: the record of the call at the step's own timestep. Under the next-step
  inversion scheme that call exists (it evaluates the UNet at t on the latent one level
  lower). Under the official scheme each call evaluates the latent at its own level, so the
  call at t is the source's own state at t; the top timestep is never evaluated there, so
  recording for step 0 adds one UNet call on the inverted latent at the top timestep
  (its output unused: the inverted latent is unchanged).
Inversion calls are named by the ascending schedule index k of the sigma they evaluate
(official: k = 1 .. steps - 1, plus `steps` for that extra call; next-step: k = 1 .. steps).
"""
from __future__ import annotations

from dataclasses import dataclass

ALIGNMENTS = ("reference", "aligned")

# (decoder level u, block r in that level): the reference's layers, see the module docstring
RESIDUAL_AT = ((1, 0), (1, 1), (2, 0))
ATTN1_AT = ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0))


@dataclass(frozen=True)
class Target:
    kind: str        # "residual" (a ResBlock's residual branch) or "attn1" (a self-attention's input)
    name: str        # record name: "residual:output_blocks.3.0" / "attn1:output.4.0"
    block: int       # output block id
    level: int       # how many times the latent grid is halved there
    channels: int

    @property
    def module(self) -> str:
        """The ResBlock's path under the diffusion model (residual targets)."""
        return f"output_blocks.{self.block}.0"

    @property
    def attn_key(self) -> tuple[str, int, int]:
        """The host's (block, number, transformer index) key of the attention layer."""
        return ("output", self.block, 0)


def output_block_id(num_res_blocks, u: int, r: int) -> int | None:
    """The output block id of decoder level u (0 = lowest resolution), block r, or None when
    the UNet has no such block. num_res_blocks: per encoder level, as the UNet stores it."""
    levels = len(num_res_blocks)
    if not 0 <= u < levels:
        return None
    per = [int(num_res_blocks[levels - 1 - v]) + 1 for v in range(levels)]  # blocks per decoder level
    if not 0 <= r < per[u]:
        return None
    return sum(per[:u]) + r


def targets_for(diffusion_model) -> tuple[Target, ...]:
    """The PnP layers this UNet has (duck-typed on the host's module attributes)."""
    nrb = getattr(diffusion_model, "num_res_blocks", None)
    blocks = getattr(diffusion_model, "output_blocks", None)
    if nrb is None or blocks is None:
        return ()
    levels = len(nrb)
    out = []
    for kind, positions in (("residual", RESIDUAL_AT), ("attn1", ATTN1_AT)):
        for u, r in positions:
            i = output_block_id(nrb, u, r)
            if i is None or i >= len(blocks):
                continue
            block = blocks[i]
            if kind == "residual":
                res = block[0]
                if not hasattr(res, "skip_connection") or not hasattr(res, "out_layers"):
                    continue
                out.append(Target(kind, f"residual:output_blocks.{i}.0", i, levels - 1 - u, int(res.out_channels)))
            else:
                tb = next((m for m in block if hasattr(m, "transformer_blocks")), None)
                if tb is None or len(tb.transformer_blocks) == 0 or getattr(tb.transformer_blocks[0], "attn1", None) is None:
                    continue
                q = tb.transformer_blocks[0].attn1.to_q
                out.append(Target(kind, f"attn1:output.{i}.0", i, levels - 1 - u, int(q.in_features)))
    return tuple(out)


def sd15_targets() -> tuple[Target, ...]:
    """The targets of SD1.5's UNet (320 channels x (1, 2, 4, 4), two res blocks per level,
    attention in decoder levels 1-3), without building it: for size figures."""
    nrb, mult = (2, 2, 2, 2), (1, 2, 4, 4)
    out = []
    for kind, positions in (("residual", RESIDUAL_AT), ("attn1", ATTN1_AT)):
        for u, r in positions:
            i = output_block_id(nrb, u, r)
            name = f"residual:output_blocks.{i}.0" if kind == "residual" else f"attn1:output.{i}.0"
            out.append(Target(kind, name, i, 3 - u, 320 * mult[3 - u]))
    return tuple(out)


def grid_at(latent_hw, level: int) -> tuple[int, int]:
    """The token grid after `level` halvings (the UNet's stride-2 convs round up)."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def values_per_frame(targets, latent_hw) -> int:
    """Values recorded per frame, step and branch (residual: C x h x w; attn1: h*w x C)."""
    total = 0
    for t in targets:
        h, w = grid_at(latent_hw, t.level)
        total += t.channels * h * w
    return total


def max_pnp_steps(steps: int, alignment: str) -> int:
    """How many sampling steps can get a record: the reference alignment never has one for
    the last step (its record would be the call below t = 1)."""
    check_alignment(alignment)
    return steps - 1 if alignment == "reference" else steps


def check_alignment(alignment: str) -> None:
    if alignment not in ALIGNMENTS:
        raise ValueError(f"pnp_alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")


def record_plan(steps: int, alignment: str, pnp_steps: int) -> dict[int, int]:
    """{ascending schedule index k of the inversion call's sigma: the sampling step its
    record feeds}. Sampling step i evaluates the ascending index steps - i."""
    limit = max_pnp_steps(steps, alignment)
    if not 0 <= pnp_steps <= limit:
        raise ValueError(f"pnp_steps is {pnp_steps} but {steps} steps with the {alignment} alignment have records "
                         f"for at most {limit} sampling steps")
    lower = 1 if alignment == "reference" else 0
    return {steps - lower - i: i for i in range(pnp_steps)}


def needs_top_call(scheme: str, alignment: str, pnp_steps: int) -> bool:
    """The official scheme never evaluates the top timestep: `aligned` records step 0 from
    one extra call there (see the module docstring)."""
    return scheme == "official" and alignment == "aligned" and pnp_steps > 0


__all__ = ["ALIGNMENTS", "RESIDUAL_AT", "ATTN1_AT", "Target", "output_block_id", "targets_for", "sd15_targets",
           "grid_at", "values_per_frame", "max_pnp_steps", "check_alignment", "record_plan", "needs_top_call"]
