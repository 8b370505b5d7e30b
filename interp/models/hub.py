"""Hugging Face Hub ids as model sources: 'org/name' (or 'hf://org/name', 'org/name@rev').

    source = hub.resolve("HuggingFaceTB/SmolLM2-135M", revision="main")
    source.path       # the local snapshot folder (the Hub cache)
    source.revision   # the commit it resolved to: pin it to rerun on the same weights

Files come through `huggingface_hub` (`snapshot_download`), so its cache (`HF_HOME`,
`HF_HUB_CACHE`), offline mode (`HF_HUB_OFFLINE=1`: the cache only) and token (`HF_TOKEN`, for
gated and private repositories) apply as in transformers. Only what loading needs is fetched:
config, safetensors weights and index, tokenizer files, chat template. A repository with PyTorch
`.bin` weights only is refused (interp reads safetensors, never pickles).

A string is a Hub id when it is not an existing local path, has no URL scheme and reads
'org/name' (letters, digits, '-', '_', '.'), as transformers decides.
"""

from __future__ import annotations

import dataclasses
import os
import re

HUB_PREFIX = "hf://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# 'org/name@revision': the form a config's model_path takes to pin a branch, tag or commit.
_WITH_REVISION = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
# What from_pretrained reads from a Hugging Face folder.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",  # Or shards model-0000X-of-0000Y.safetensors with the index:
    "model-*-of-*.safetensors",  # what pretrained.py reads (not consolidated.*, adapters...).
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]


@dataclasses.dataclass(frozen=True)
class HubSource:
    """A resolved Hub model.

    Attributes:
      repo_id: 'org/name'.
      revision: The commit hash the requested revision resolved to.
      path: Local snapshot folder holding the fetched files.
    """

    repo_id: str
    revision: str
    path: str


def is_hub_id(path: str | os.PathLike) -> bool:
    """True for 'hf://org/name', or 'org/name' that is not an existing local path."""
    text = os.fspath(path)
    if text.startswith(HUB_PREFIX):
        return True
    if "://" in text or os.path.exists(text):
        return False
    return bool(_WITH_REVISION.match(text))


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """('org/name', 'rev') of 'org/name@rev' or 'hf://org/name@rev'; ('org/name', None)
    without '@'."""
    match = _WITH_REVISION.match(hub_id.removeprefix(HUB_PREFIX).strip("/"))
    if not match:
        raise ValueError(f"{hub_id!r} is not a Hub id; expected 'org/name' or 'org/name@rev'.")
    return match.group("repo"), match.group("rev")


def snapshot(repo_id: str, revision: str | None, allow_patterns: list[str]) -> str:
    """`huggingface_hub.snapshot_download` of the files matching `allow_patterns`, its errors
    turned into ones that name the fix; the local snapshot folder.

    Raises:
      FileNotFoundError: the repository or revision does not exist (or is private without a
        token), or offline mode and nothing cached.
      PermissionError: a gated repository without a token that has access.
    """
    import huggingface_hub  # noqa: PLC0415  (only Hub ids need it)
    from huggingface_hub import errors  # noqa: PLC0415

    at = f"{repo_id}@{revision or 'main'}"
    try:
        return huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=allow_patterns
        )
    except errors.GatedRepoError:
        raise PermissionError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} "
            "and set HF_TOKEN to a token of that account."
        ) from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(
            f"{repo_id} has no revision {revision!r}; pass a branch, tag or commit it has."
        ) from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"No Hub repository {repo_id!r} (or it is private: set HF_TOKEN), and no local "
            "path of that name; check the spelling."
        ) from None
    except errors.LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{at} is not in the Hugging Face cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}); fetch it once online "
            f"(`hf download {repo_id}`) or unset HF_HUB_OFFLINE. If it was meant as a local "
            f"path: no file or folder {repo_id!r} exists here ({os.getcwd()})."
        ) from None


def resolve(repo_id: str, revision: str | None = None) -> HubSource:
    """Fetches (or finds in the cache) a Hub model's loading files.

    Args:
      repo_id: 'org/name' or 'hf://org/name', optionally with '@revision'.
      revision: A branch, tag or commit; None: the default branch ('main').

    Returns:
      A `HubSource` with the commit the revision resolved to.

    Raises:
      FileNotFoundError: the repository or revision does not exist (or is private without a
        token), offline mode and nothing cached, or no safetensors weights in it.
      PermissionError: a gated repository without a token that has access.
    """
    repo_id, pinned = split_revision(repo_id)
    if pinned is not None and revision is not None and pinned != revision:
        raise ValueError(f"{repo_id}@{pinned} and revision={revision!r} disagree; give one.")
    revision = revision or pinned
    at = f"{repo_id}@{revision or 'main'}"
    folder = snapshot(repo_id, revision, ALLOW_PATTERNS)
    names = os.listdir(folder)
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(
            f"{at} has no safetensors weights. PyTorch .bin files are not read (they are "
            "pickles): use a revision or copy with safetensors, or convert it (transformers: "
            "save_pretrained(..., safe_serialization=True)). A GGUF repository: download its "
            f".gguf file (`hf download {repo_id} NAME.gguf`) and pass that file's path."
        )
    return HubSource(repo_id, os.path.basename(os.path.normpath(folder)), folder)
