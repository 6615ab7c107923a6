"""A generation request, its defaults and its bounds: one place that the CLI and the HTTP API share.

Every rejection is an `InvalidRequest` naming the field and the bound it broke.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, replace

from PIL import Image

from klein.config import ModelSpec

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000  # the text encoder reads the first 512 tokens (template included) anyway
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_ASPECT = 8.0
MAX_LORAS = 3  # adapters per request by default (fal's limit for klein)
LORA_PLACES_LIMIT = 8  # the most a deployment may allow (each place is a gather + two small GEMMs per layer)
# LoRA scales: fal takes 0-4; negative scales subtract a concept (slider LoRAs), so -4..4. Past 4
# in either direction the delta swamps the base weights and images fall apart.
LORA_SCALE = 4.0


class InvalidRequest(ValueError):
    """`field` names the request field; for one of the references, `index` says which."""

    def __init__(self, field: str, message: str, index: int | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.index = index


@dataclass(frozen=True)
class LoraRequest:
    path: str  # what names the adapter: a file path (klein generate) or a registry name / URL (served)
    scale: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    width: int | None = None  # None: the first reference's processed size, else the model default
    height: int | None = None
    seed: int = 0
    steps: int | None = None  # None: the variant's default
    guidance: float | None = None  # None: the variant's default; distilled models take only 1 (none)
    references: tuple[Image.Image, ...] = ()
    loras: tuple[LoraRequest, ...] = ()
    mask: Image.Image | None = None  # inpainting: white repaints references[0] (klein.inpaint)
    strength: float | None = None  # with a mask: how far into the schedule to start (default 0.8)

    @property
    def run_steps(self) -> int:
        """The steps that run (see `steps_run`)."""
        return steps_run(self.steps, self.strength if self.mask is not None else None)

    @property
    def megapixels(self) -> float:
        return (self.width or 0) * (self.height or 0) / 1e6


def reference_size(width: int, height: int, max_pixels: int, multiple: int) -> tuple[int, int]:
    """Size a reference is processed to: scaled down to at most `max_pixels` (LANCZOS), then
    centre-cropped to a multiple of `multiple` (diffusers Flux2KleinPipeline step 4)."""
    if width * height > max_pixels:
        s = math.sqrt(max_pixels / (width * height))
        width, height = int(width * s), int(height * s)
    return width // multiple * multiple, height // multiple * multiple


def within_side(width: int, height: int, max_side: int, multiple: int) -> tuple[int, int]:
    """A size scaled down, its aspect kept, until neither side is over `max_side`; each side then
    floored to a multiple of `multiple` (the size an output takes from a reference of up to 8:1,
    whose 1 MP size can be 2896x362)."""
    if max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(multiple, int(width * s) // multiple * multiple), max(
        multiple, int(height * s) // multiple * multiple
    )


DEFAULT_STRENGTH = 0.8  # inpainting (klein.inpaint): diffusers' default
SOURCE_MAX_PIXELS = 1024 * 1024  # a larger source is scaled down first (diffusers, step 3)


def source_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The size a source image is repainted at (and the output's): scaled down to at most 1 MP,
    then each side floored to a multiple of `multiple` (resized, not cropped)."""
    if width * height > SOURCE_MAX_PIXELS:
        s = math.sqrt(SOURCE_MAX_PIXELS / (width * height))
        width, height = int(width * s), int(height * s)
    return width // multiple * multiple, height // multiple * multiple


def start_step(steps: int, strength: float | None) -> int:
    """The index in the schedule sampling starts from (diffusers `get_timesteps`); 0 without a
    strength (not inpainting)."""
    return 0 if strength is None else int(max(steps - min(steps * strength, steps), 0))


def steps_run(steps: int, strength: float | None) -> int:
    """The steps that run: all of them, or an inpainting's last `strength` part of the schedule."""
    return steps - start_step(steps, strength)


def check_text(text: str, field: str) -> None:
    """Printable text only: control characters (tab and newlines aside) and unpaired surrogates
    (which cannot be encoded as UTF-8) are refused, naming the first one and where it is."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\t\n\r":
            raise InvalidRequest(field, f"control character U+{ord(ch):04X} at position {i} is not allowed")


def check_reference(image: Image.Image, field: str, index: int | None = None) -> None:
    w, h = image.size
    if min(w, h) < MIN_REFERENCE_SIDE:
        msg = f"image is {w}x{h}; both sides must be at least {MIN_REFERENCE_SIDE} px"
        raise InvalidRequest(field, msg, index)
    if max(w / h, h / w) > MAX_REFERENCE_ASPECT:
        msg = f"image is {w}x{h}; aspect ratio must be at most {MAX_REFERENCE_ASPECT:g}:1"
        raise InvalidRequest(field, msg, index)


def check_loras(loras: tuple[LoraRequest, ...], max_loras: int = MAX_LORAS) -> None:
    if len(loras) > max_loras:
        raise InvalidRequest("loras", f"at most {max_loras} adapters per request, got {len(loras)}")
    for i, lora in enumerate(loras):
        if not isinstance(lora.path, str) or not lora.path.strip():
            raise InvalidRequest(f"loras[{i}].path", "must name an adapter", i)
        if not -LORA_SCALE <= lora.scale <= LORA_SCALE:
            raise InvalidRequest(
                f"loras[{i}].scale",
                f"must be between {-LORA_SCALE:g} and {LORA_SCALE:g}, got {lora.scale:g}",
                i,
            )


def validate(spec: ModelSpec, req: GenerationRequest, max_loras: int = MAX_LORAS) -> GenerationRequest:
    """Check `req` against the model's bounds and fill in the defaults; returns a complete request."""
    if not isinstance(req.prompt, str):
        raise InvalidRequest("prompt", "must be a string")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            "prompt", f"must be at most {MAX_PROMPT_CHARS} characters, got {len(req.prompt)}"
        )
    check_text(req.prompt, "prompt")
    if not req.prompt.strip() and not req.references:
        raise InvalidRequest("prompt", "must not be empty or blank without an input image")
    if len(req.references) > spec.max_references:
        raise InvalidRequest(
            "references", f"at most {spec.max_references} reference images, got {len(req.references)}"
        )
    for i, image in enumerate(req.references):
        check_reference(image, f"references[{i}]", i)
    check_loras(req.loras, max_loras)
    if not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be between 0 and {MAX_SEED}, got {req.seed}")

    width, height = req.width, req.height
    strength = _check_inpaint(spec, req)
    if req.mask is not None:  # the output is the source's size
        sw, sh = source_size(*req.references[0].size, spec.multiple)
        if max(sw, sh) > spec.max_side:
            w, h = req.references[0].size
            raise InvalidRequest(
                "references[0]",
                f"image is {w}x{h}; an inpainting source is repainted at its size scaled to 1 MP, "
                f"{sw}x{sh}, over the {spec.max_side} px side limit (crop it to at most 4:1)",
                0,
            )
        for name, value, wanted in (("width", width, sw), ("height", height, sh)):
            if value is not None and value != wanted:
                raise InvalidRequest(
                    name, f"an inpainted image has its source's size, {sw}x{sh}; got {value}"
                )
        width, height = sw, sh
    if req.references and (width is None or height is None):
        rw, rh = reference_size(*req.references[0].size, spec.reference_max_pixels, spec.multiple)
        rw, rh = within_side(rw, rh, spec.max_side, spec.multiple)
        width, height = rw if width is None else width, rh if height is None else height
    width = spec.default_size if width is None else width  # 0 is a size (refused below), not "unset"
    height = spec.default_size if height is None else height
    for name, value in (("width", width), ("height", height)):
        if value % spec.multiple:
            raise InvalidRequest(name, f"must be a multiple of {spec.multiple}, got {value}")
        if not spec.min_side <= value <= spec.max_side:
            raise InvalidRequest(name, f"must be between {spec.min_side} and {spec.max_side}, got {value}")
    if width * height > spec.max_pixels:
        raise InvalidRequest(
            "width", f"width x height must be at most {spec.max_pixels / 1e6:g} MP, got {width}x{height}"
        )

    s = spec.sampling
    steps = s.steps if req.steps is None else req.steps
    if not 1 <= steps <= s.max_steps:
        raise InvalidRequest("steps", f"must be between 1 and {s.max_steps}, got {steps}")
    guidance = req.guidance
    if not s.cfg:
        # 1.0 is "no guidance" (the model card's own diffusers call passes guidance_scale=1.0)
        if guidance is not None and guidance != 1.0:
            raise InvalidRequest(
                "guidance",
                f"{spec.name} is guidance-distilled: guidance must be 1 or unset, got {guidance:g}",
            )
        guidance = None
    else:
        if guidance is None:
            guidance = s.inpaint_guidance if req.mask is not None and s.inpaint_guidance else s.guidance
        if not s.min_guidance <= guidance <= s.max_guidance:
            raise InvalidRequest(
                "guidance", f"must be between {s.min_guidance:g} and {s.max_guidance:g}, got {guidance:g}"
            )
    if req.mask is not None and start_step(steps, strength) >= steps:
        raise InvalidRequest("strength", f"{strength:g} of {steps} steps leaves none to run; raise it")
    return replace(req, width=width, height=height, steps=steps, guidance=guidance, strength=strength)


def _check_inpaint(spec: ModelSpec, req: GenerationRequest) -> float | None:
    """The mask against its source, and the strength (its default with a mask)."""
    if req.mask is None:
        if req.strength is not None:
            raise InvalidRequest("strength", "only with a mask (inpainting)")
        return None
    if not req.references:
        raise InvalidRequest("mask", "needs an image to repaint")
    (w, h), (mw, mh) = req.references[0].size, req.mask.size
    if (mw, mh) != (w, h):
        raise InvalidRequest("mask", f"must be the size of the image, {w}x{h}; got {mw}x{mh}")
    strength = DEFAULT_STRENGTH if req.strength is None else req.strength
    if not 0 < strength <= 1:
        raise InvalidRequest("strength", f"must be more than 0 and at most 1, got {strength:g}")
    return strength
