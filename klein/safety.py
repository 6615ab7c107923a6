"""Content safety: an NSFW image classifier (transformers, loaded from a local folder) scaled by the
request's `safety_tolerance`, and a prompt term filter.

BFL's reference code flags an image when the classifier's "nsfw" score exceeds 0.85
(`Falconsai/nsfw_image_detection`, a ViT). Tolerances follow BFL's API scale, 0 strict ... 5
permissive; 2 is the default and the reference threshold:

    tolerance  0     1     2     3     4     5
    flag if    >0.2  >0.5  >0.85 >0.92 >0.97 >0.995
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from klein.image import to_rgb

THRESHOLDS = (0.2, 0.5, 0.85, 0.92, 0.97, 0.995)
DEFAULT_TOLERANCE = 2


def threshold(tolerance: int) -> float:
    if not 0 <= tolerance < len(THRESHOLDS):
        raise ValueError(f"safety_tolerance must be between 0 and {len(THRESHOLDS) - 1}, got {tolerance}")
    return THRESHOLDS[tolerance]


class NSFWClassifier:
    """An image-classification model with an "nsfw" label, from a local transformers folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"safety classifier folder {path} has no config.json")
        self.processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True)
        self.model = self.model.to(device).eval().requires_grad_(False)
        labels = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        if "nsfw" not in labels:
            raise ValueError(f"safety classifier {path} has no 'nsfw' label (labels: {sorted(labels)})")
        self.nsfw = labels["nsfw"]
        self.device = torch.device(device)

    @torch.inference_mode()
    def scores(self, images: list[Image.Image]) -> list[float]:
        """P(nsfw) per image."""
        if not images:
            return []
        inputs = self.processor(images=[to_rgb(im) for im in images], return_tensors="pt").to(self.device)
        probs = self.model(**inputs).logits.float().softmax(-1)
        return probs[:, self.nsfw].tolist()

    def flagged(self, images: list[Image.Image], tolerance: int) -> list[bool]:
        limit = threshold(tolerance)
        return [s > limit for s in self.scores(images)]


class PromptFilter:
    """Whole-word, case-insensitive blocklist; a term may hold spaces ("some phrase")."""

    def __init__(self, terms: Iterable[str] = ()):
        words = sorted({t.strip().lower() for t in terms if t.strip()}, key=len, reverse=True)
        self.pattern = (
            re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE) if words else None
        )

    @classmethod
    def from_file(cls, path: str | Path, extra: Iterable[str] = ()) -> PromptFilter:
        lines = Path(path).read_text().splitlines()
        return cls([*extra, *(ln for ln in lines if not ln.strip().startswith("#"))])

    def match(self, prompt: str) -> str | None:
        """The first blocked term found, or None."""
        if self.pattern is None:
            return None
        m = self.pattern.search(prompt)
        return m.group(0).lower() if m else None
