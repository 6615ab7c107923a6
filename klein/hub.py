"""Models by Hugging Face hub id: `org/name[@revision]`, downloaded into the standard cache.

Only the files the model needs are fetched (`allow_patterns`): from a diffusers repository its
`model_index.json` and the transformer, VAE, text encoder and tokenizer folders (not the BFL single
file beside them, which duplicates the transformer); from an FP8 repository (one
`flux-2-klein-*-fp8.safetensors`, transformer only) that file, with the text encoder, tokenizer and
VAE taken from the matching bf16 repository: the official pairs are known (`FP8_BASES`), any other
is named with `base` (`--base-model`). The cache is `HF_HOME` (default ~/.cache/huggingface), the
token `HF_TOKEN` (or `hf auth login`), `HF_HUB_OFFLINE=1` uses the cache alone and `HF_ENDPOINT`
names another hub. Every failure is a `HubError` saying which repository and what to do.

A download is pinned to the commit the revision resolved to (`Snapshot.commit`), so the replicas
of a served model, each resolving the same source on its own node, read the same files: files in
the cache are shared through its locks, so replicas on one node download each file once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# <org>/<name>[@<revision>]: the hub's id rules (letters, digits, - _ .), one slash
HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,128}))?"
)
DIFFUSERS_FILES = ["model_index.json", "transformer/*", "vae/*", "text_encoder/*", "tokenizer/*"]
BASE_FILES = ["model_index.json", "vae/*", "text_encoder/*", "tokenizer/*"]  # beside an FP8 transformer
FP8_FILES = ["flux-2-klein*fp8*.safetensors", "*.safetensors.index.json", "model_index.json"]
# FP8 repositories (transformer only) -> the bf16 repository their other parts come from
FP8_BASES = {
    "black-forest-labs/FLUX.2-klein-4b-fp8": "black-forest-labs/FLUX.2-klein-4B",
    "black-forest-labs/FLUX.2-klein-9b-fp8": "black-forest-labs/FLUX.2-klein-9B",
    "black-forest-labs/FLUX.2-klein-base-4b-fp8": "black-forest-labs/FLUX.2-klein-base-4B",
    "black-forest-labs/FLUX.2-klein-base-9b-fp8": "black-forest-labs/FLUX.2-klein-base-9B",
}


class HubError(RuntimeError):
    """A model could not be had from the hub (the message says which repository and why)."""


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None  # None: the default branch

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubId | None:
    """`org/name[@revision]` -> HubId; None for anything else, and for an existing local path."""
    if Path(text).expanduser().exists():
        return None
    m = HUB_ID.fullmatch(text)
    return HubId(m["repo"], m["revision"]) if m else None


def is_fp8_repo(repo: str) -> bool:
    return repo in FP8_BASES or repo.lower().endswith("-fp8")


@dataclass(frozen=True)
class Snapshot:
    """A repository's files in the local cache, at one commit."""

    hub_id: HubId
    folder: Path
    commit: str
    patterns: tuple[str, ...]

    def pinned(self) -> HubId:
        return HubId(self.hub_id.repo, self.commit)


def download(hub_id: HubId, patterns: list[str], *, what: str = "model") -> Snapshot:
    """The repository's files matching `patterns`, from the cache or downloaded into it (with a
    progress bar), as a Snapshot; HubError (with the reason) when that cannot be."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    offline = constants.HF_HUB_OFFLINE
    where = f"{what} {hub_id}"
    try:
        folder = Path(
            huggingface_hub.snapshot_download(
                hub_id.repo, revision=hub_id.revision, allow_patterns=patterns, local_files_only=offline
            )
        )
    except errors.LocalEntryNotFoundError:
        if offline:
            raise HubError(
                f"{where} is not in the cache ({_cache()}) and HF_HUB_OFFLINE=1 forbids downloading "
                f"it: download it once with the network on (files {', '.join(patterns)})"
            ) from None
        raise HubError(f"{where}: the hub could not be reached and the files are not in the cache") from None
    except Exception as e:  # the hub's answers, the network failing mid-download, a full disk
        reason = explain(e, hub_id.repo, hub_id.revision) or f"{type(e).__name__}: {e}"
        raise HubError(f"{where}: {reason}") from None
    if not any(folder.rglob("*")):
        raise HubError(f"{where} has none of the files a FLUX.2 [klein] model needs ({', '.join(patterns)})")
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else (hub_id.revision or "")
    return Snapshot(hub_id, folder, commit, tuple(patterns))


def explain(e: BaseException, repo: str, revision: str | None) -> str | None:
    """What one of the hub's answers about a repository means, for a message; None for others."""
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return (
            f"the repository is gated: accept its license at https://huggingface.co/{repo} with your "
            "account, then give your token (HF_TOKEN, or `hf auth login`)"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return "no such repository, or it is private and no token with access was given (HF_TOKEN)"
    if isinstance(e, errors.RevisionNotFoundError):
        return f"revision {revision!r} does not exist"
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return "no such file in the repository"
    return None


def _cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class HubModel:
    """Where a hub model's parts are on this machine."""

    weights: Path  # the diffusers folder (for FP8: the bf16 repository's, without its transformer)
    transformer: Path | None  # the FP8 single file, else None (weights/transformer/)
    snapshots: tuple[Snapshot, ...]


def fetch_model(hub_id: HubId, base: HubId | None = None) -> HubModel:
    """Download (or find in the cache) what a FLUX.2 [klein] model needs from its repository."""
    if base is None and not is_fp8_repo(hub_id.repo):
        snap = download(hub_id, DIFFUSERS_FILES)
        if not (snap.folder / "transformer").is_dir():
            raise HubError(f"model {hub_id} has no transformer/ folder (is it a FLUX.2 [klein] repository?)")
        return HubModel(snap.folder, None, (snap,))
    if base is None:
        known = FP8_BASES.get(hub_id.repo)
        if known is None:
            raise HubError(
                f"model {hub_id} holds only an FP8 transformer: name the bf16 repository its text encoder, "
                "tokenizer and VAE come from (--base-model ORG/NAME, setting `base_model`)"
            )
        base = HubId(known)
    snap = download(hub_id, FP8_FILES)
    files = sorted(p for p in snap.folder.glob("*.safetensors"))
    if not files:
        raise HubError(f"model {hub_id} has no flux-2-klein*fp8*.safetensors file")
    base_snap = download(base, BASE_FILES, what="base model")
    return HubModel(base_snap.folder, files[0], (snap, base_snap))
