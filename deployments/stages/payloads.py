"""What travels between the stages (through the Ray object store, never through the ingress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from klein.request import start_step, steps_run


def tokens(width: int, height: int, ref_shapes=()) -> int:
    """Image + reference tokens of a request (one per 16x16 pixels; `ref_shapes` are token grids):
    what a transformer batch is capped by, as memory and time grow with it."""
    return (width // 16) * (height // 16) + sum(h * w for h, w in ref_shapes)


@dataclass(frozen=True)
class PreviewPlan:
    """The steps at which a request's image in progress is previewed, and where each preview goes."""

    steps: tuple[int, ...]
    keys: tuple[str, ...]  # storage key of each step's preview (JPEG), given by the job
    safety_tolerance: int = 2  # previews pass the safety classifier like the final image

    def key(self, step: int) -> str | None:
        return self.keys[self.steps.index(step)] if step in self.steps else None


@dataclass(frozen=True)
class PreviewParams:
    """One preview for the Codec to render and store."""

    job_id: str
    key: str
    grid: tuple[int, int]  # the latent's token grid (h, w)
    safety_tolerance: int = 2


@dataclass(frozen=True)
class DenoiseParams:
    job_id: str
    width: int
    height: int
    seed: int
    steps: int
    guidance: float | None  # None: no CFG (distilled models, or guidance 1)
    ref_shapes: tuple[tuple[int, int], ...] = ()  # token grids (h, w) of the encoded references
    trace: dict[str, str] | None = None  # W3C carrier of the job's span
    since: float | None = None  # when this attempt began (epoch s): cancels are checked once it waited
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters: (versioned key, scale), in order
    attempt: int = 1  # of the job: progress reports name it (a re-run starts again at step 1)
    preview: PreviewPlan | None = None
    strength: float | None = None  # inpainting (the references' first is the source, with a mask)

    @property
    def start(self) -> int | None:
        """An inpainting's first step in the schedule; None when not inpainting."""
        return None if self.strength is None else start_step(self.steps, self.strength)

    @property
    def run_steps(self) -> int:
        return steps_run(self.steps, self.strength)

    @property
    def tokens(self) -> int:
        return tokens(self.width, self.height, self.ref_shapes)

    @property
    def group(self) -> tuple:
        """Requests with equal groups run as one batch of the transformer."""
        return (self.width, self.height, self.steps, self.guidance is not None, self.ref_shapes, self.start)


@dataclass(frozen=True)
class FinishParams:
    job_id: str
    key: str  # storage key of the output image
    output_format: str  # png | jpeg | webp
    prompt: str
    model: str
    seed: int
    return_bytes: bool = False  # the sync API answers with the image itself (b64_json)
    trace: dict[str, str] | None = None
    safety_tolerance: int = 2
    input_keys: tuple[str, ...] = ()  # reference images: C2PA ingredients of an edit


@dataclass(frozen=True)
class FinishResult:
    key: str
    width: int
    height: int
    content_type: str
    size_bytes: int
    data: bytes | None = None


class JobCancelled(Exception):
    """The job was cancelled while a stage was working on it."""


class ContentModerated(Exception):
    """The generated image was flagged by the safety classifier: nothing is stored or billed."""


class RequestModerated(Exception):
    """The prompt or an input image was flagged before any generation."""


@dataclass(frozen=True)
class StepDone:
    """A job's attempt has finished denoising step `step` of `steps`."""

    job_id: str
    attempt: int
    step: int
    steps: int


class ProgressSink(Protocol):
    """Where the FlowTransformer reports its jobs' steps (it knows nothing of where that goes)."""

    async def __call__(self, done: list[StepDone]) -> None: ...


class CancelCheck(Protocol):
    """Which of these jobs their clients cancelled (the FlowTransformer asks between steps)."""

    async def __call__(self, job_ids: list[str]) -> set[str]: ...
