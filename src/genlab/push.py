"""`genlab push RUN --repo ID`: upload a run's export/ (model card included) to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from genlab.errors import GenlabError
from genlab.model_card import write_model_card
from genlab.run_dir import RunDir

#: Never uploaded: temporary files of an interrupted write (atomic_write's ".name.pid.tmp").
IGNORE = [".*"]
LOGIN = "log in with `huggingface-cli login` (or `hf auth login`, or set HF_TOKEN) using a token with write access"


def push_export(run_dir: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Create `repo_id` if needed and upload RUN/export/ with a fresh model card; returns the repository's URL.

    Raises:
        GenlabError: no export, no login, offline mode, or the Hub refused (the message says which).
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.errors import HTTPError as TransportError  # the HTTP client's own (httpx): no connection

    run = RunDir(run_dir).require()
    write_model_card(run, repo_id=repo_id)  # its snippets now load from the Hub repository
    if get_token() is None:
        raise GenlabError(f"not logged in to the Hugging Face Hub: {LOGIN}, then run this again.")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(run.export), repo_type="model", ignore_patterns=IGNORE,
                          commit_message=message or f"genlab push {run.path.name}")
    except OfflineModeIsEnabled:
        raise GenlabError("HF_HUB_OFFLINE=1 is set, so nothing was uploaded; unset it to push.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            raise GenlabError(f"the Hub refused to write to {repo_id} ({status}): {LOGIN}.") from None
        raise GenlabError(f"the upload to {repo_id} failed: {str(error).splitlines()[0]}") from None
    except (TransportError, OSError) as error:  # no network, DNS, a proxy: the upload never started or broke off
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GenlabError(f"could not reach the Hub to push to {repo_id} ({reason}); check the network "
                          "(or HF_ENDPOINT) and run this again.") from None
    return str(url)
