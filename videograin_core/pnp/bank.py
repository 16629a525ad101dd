"""The PnP feature bank: the source's records for the sampling steps that will inject them.

Records are kept on the CPU in half precision (float16; a record whose values do not fit
float16's range is kept in float32), one [F, ...] tensor per (sampling step, layer, branch).
Branch 0 is the cond (source prompt), 1 the uncond (empty prompt); when both prompts are the
same conditioning one record serves both (`shared`). The bank knows the schedule, scheme,
alignment, frame count and latent size it was recorded for, and checks them against the
inversion it is used with.
"""
from __future__ import annotations

import json

import torch

from .plan import Target, check_alignment, values_per_frame

BANK_FORMAT = 1
STORE_DTYPE = torch.float16   # records are stored in this precision (tests may change it to float32)


class FeatureBank:
    def __init__(self, *, steps: int, alignment: str, scheme: str, sigmas: torch.Tensor, frames: int,
                 latent_hw, targets, shared: bool, source_index: dict[int, int], dtype=None):
        check_alignment(alignment)
        self.steps = int(steps)                     # sampling steps with records (pnp_steps)
        self.alignment = alignment
        self.scheme = scheme
        self.sigmas = sigmas.detach().to("cpu", torch.float32)  # ascending schedule of the inversion
        self.frames = int(frames)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.targets: tuple[Target, ...] = tuple(targets)
        self.shared = bool(shared)
        self.source_index = {int(s): int(k) for s, k in source_index.items()}  # step -> inversion call's sigma index
        self.dtype = dtype or STORE_DTYPE
        self.records: dict[str, torch.Tensor] = {}

    @staticmethod
    def store_dtype() -> torch.dtype:
        """The precision new banks store in (read when asked, so a test can change it)."""
        return STORE_DTYPE

    # ------------------------------------------------------------ records
    @property
    def branches(self) -> tuple[int, ...]:
        return (0,) if self.shared else (0, 1)

    @staticmethod
    def key(step: int, name: str, branch: int) -> str:
        return f"{int(step)}/{name}/{int(branch)}"

    def put(self, step: int, name: str, branch: int, value: torch.Tensor) -> None:
        v = value.detach()
        stored = v.to("cpu", self.dtype, copy=True)
        if stored.dtype == torch.float16 and not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(v).all()):
            stored = v.to("cpu", torch.float32, copy=True)  # out of float16's range: keep it whole
        self.records[self.key(step, name, branch)] = stored

    def get(self, step: int, name: str, branch: int) -> torch.Tensor | None:
        """The record for `branch` (0 cond, 1 uncond; None for other branches)."""
        if branch not in (0, 1):
            return None
        return self.records.get(self.key(step, name, 0 if self.shared else branch))

    def expected(self) -> list[str]:
        return [self.key(s, t.name, b) for s in range(self.steps) for t in self.targets for b in self.branches]

    def missing(self) -> list[str]:
        return [k for k in self.expected() if k not in self.records]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.records.values())

    def get_ram_usage(self) -> int:  # the host's RAM-pressure cache asks outputs for this
        return self.nbytes

    def bytes_per_frame_step(self) -> int:
        """Stored bytes per frame and injected step at this latent size (both branches
        unless shared), from the layer shapes."""
        return values_per_frame(self.targets, self.latent_hw) * len(self.branches) * torch.empty(0, dtype=self.dtype).element_size()

    # ------------------------------------------------------------ checks
    def check_for(self, latent_shape, sigmas: torch.Tensor, scheme: str) -> None:
        """The bank must have been recorded for this inversion: same schedule (sigmas, so
        step count too), scheme, frame count and latent size. Errors name `inversion`."""
        frames, _, h, w = tuple(latent_shape)
        if frames != self.frames or (h, w) != self.latent_hw:
            raise ValueError(f"inversion: its PnP features were recorded for {self.frames} frames of latent "
                             f"{self.latent_hw[1]}x{self.latent_hw[0]} but the inversion is {frames} frames of "
                             f"{w}x{h}: invert this clip again with pnp_steps set")
        s = sigmas.detach().to("cpu", torch.float32)
        if s.shape != self.sigmas.shape or not torch.equal(s, self.sigmas) or scheme != self.scheme:
            raise ValueError(f"inversion: its PnP features were recorded for another schedule ({self.sigmas.numel() - 1} "
                             f"steps, {self.scheme} scheme) than the inversion's ({s.numel() - 1} steps, {scheme} "
                             f"scheme): invert again with pnp_steps set")

    # ------------------------------------------------------------ storage (the inversion cache)
    def meta(self) -> dict:
        return {"format": BANK_FORMAT, "steps": self.steps, "alignment": self.alignment, "scheme": self.scheme,
                "frames": self.frames, "latent_hw": list(self.latent_hw), "shared": self.shared,
                "source_index": {str(k): v for k, v in self.source_index.items()}, "dtype": str(self.dtype),
                "targets": [[t.kind, t.name, t.block, t.level, t.channels] for t in self.targets]}

    def to_json(self) -> str:
        return json.dumps(self.meta(), sort_keys=True)

    @classmethod
    def from_saved(cls, meta_json: str, sigmas: torch.Tensor, records: dict[str, torch.Tensor]) -> "FeatureBank":
        m = json.loads(meta_json)
        if m.get("format") != BANK_FORMAT:
            raise ValueError(f"feature bank format {m.get('format')} is not {BANK_FORMAT}")
        dtype = getattr(torch, str(m["dtype"]).replace("torch.", ""))
        bank = cls(steps=m["steps"], alignment=m["alignment"], scheme=m["scheme"], sigmas=sigmas, frames=m["frames"],
                   latent_hw=m["latent_hw"], targets=[Target(*t) for t in m["targets"]], shared=m["shared"],
                   source_index={int(k): v for k, v in m["source_index"].items()}, dtype=dtype)
        bank.records = dict(records)
        missing = bank.missing()
        if missing or len(bank.records) != len(bank.expected()):
            raise ValueError(f"feature bank: {len(missing)} records missing, {len(bank.records)} stored")
        return bank

    def __repr__(self) -> str:
        return (f"FeatureBank(steps={self.steps}, alignment={self.alignment!r}, frames={self.frames}, "
                f"latent={self.latent_hw}, layers={len(self.targets)}, shared={self.shared}, "
                f"{self.nbytes / 2**20:.1f} MiB)")


__all__ = ["FeatureBank", "STORE_DTYPE", "BANK_FORMAT"]
