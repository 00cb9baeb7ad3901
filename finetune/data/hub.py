"""Hub datasets: whether the hub is offline, and the commit a dataset resolves to (one quick probe, so a machine
without network fails fast instead of retrying for half a minute). read.py loads them."""

from __future__ import annotations

import functools
from pathlib import Path

from finetune.errors import DataError, first_line


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=None)
def _hub_revision(path: str, revision: str | None) -> str:
    """The commit a hub dataset resolves to; fails fast (one request, short timeout) when the hub is unreachable.

    datasets.load_dataset itself retries for about half a minute before giving up on a machine
    without network, so this probe runs first.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().dataset_info(path, revision=revision, timeout=10).sha or ""
    except GatedRepoError:
        raise DataError(f"Hub dataset '{path}' is gated: accept its terms on the hub and log in "
                        "(`hf auth login` or HF_TOKEN).") from None
    except RevisionNotFoundError:
        raise DataError(f"Hub dataset '{path}' has no revision '{revision}'.") from None
    except RepositoryNotFoundError:
        raise DataError(f"'{path}' is not a local file, directory or glob pattern, nor a dataset on the Hugging Face "
                        f"hub (relative paths are read from the current directory, {Path.cwd()}).") from None
    except Exception as e:  # no network: connection, DNS or timeout errors of the HTTP client
        raise DataError(
            f"Cannot reach the Hugging Face hub to load dataset '{path}' ({first_line(e)}). On a machine without "
            "network, point the recipe at local files (e.g. `finetune train recipe.yaml data.datasets=[] "
            "data.train=path/to/train.jsonl`), or set HF_HUB_OFFLINE=1 to use a copy already in the local "
            "Hugging Face cache."
        ) from None
