"""How a flow run is named and tagged, in Prefect and on its MLflow parent run, and whether it is being cancelled.

Whether a flow run's name was made up by Prefect (then the flow names the run after its form values) or typed
by the user (then it is kept). A run created over the API without a name gets a coolname slug from the server
(`fair-manul`); the UI's run form pre-fills a Greek letter and a star name (`kappa3-andromedae`)."""
import re
from functools import lru_cache
from importlib import resources

from prefect.runtime import flow_run

GREEK = "alpha|beta|gamma|delta|epsilon|zeta|eta|theta|iota|kappa|lambda|mu|nu|xi|omicron|pi|rho|sigma|tau|upsilon|" \
        "phi|chi|psi|omega"
UI_NAME = re.compile(rf"(?:{GREEK})\d*-[a-z]+(?:-[a-z]+)?")


@lru_cache(maxsize=1)
def _slug_words() -> frozenset[str]:
    """Every word of the server's slugs (coolname's word lists; comments and option lines skipped)."""
    words: set[str] = set()
    for file in resources.files("coolname.data").iterdir():
        if file.name.endswith(".txt"):
            words.update(w for w in file.read_text().split() if re.fullmatch(r"[a-z]+", w))
    return frozenset(words)


def made_up(name: str | None) -> bool:
    """True for no name, the server's two-word slug, or the UI's pre-filled name."""
    if not name or UI_NAME.fullmatch(name):
        return True
    words = name.split("-")
    return len(words) == 2 and all(w in _slug_words() for w in words)


def tag_flow_run(profile: str, profiles: tuple[str, ...]) -> None:
    """Tag this flow run with the profile it runs (not the deployment's default profile)."""
    from prefect.client.orchestration import get_client
    run_id = flow_run.get_id()
    if run_id:
        with get_client(sync_client=True) as client:
            tags = [t for t in client.read_flow_run(run_id).tags if t not in profiles]
            client.update_flow_run(run_id, tags=[*tags, profile])


def prefect_tags() -> dict[str, str]:
    """MLflow tags of the parent run that lead back to this Prefect flow run (the note renders as a link)."""
    from prefect.utilities.urls import url_for
    run_id = flow_run.get_id()
    if not run_id:
        return {}
    url = url_for("flow-run", obj_id=run_id)  # the page the UI itself links (runs/flow-run/<id>)
    name = flow_run.get_name() or ""
    tags = {"prefect.flow_run_id": run_id, "prefect.flow_run_name": name, "prefect.flow_run_url": url or "",
            "mlflow.note.content": f"Prefect flow run [{name}]({url})" if url else ""}
    return {k: v for k, v in tags.items() if v}


def cancel_requested() -> bool:
    """Whether this flow run is being cancelled (the UI's Cancel), as opposed to its process being stopped."""
    from prefect.client.orchestration import get_client
    run_id = flow_run.get_id()
    if not run_id:
        return False
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return bool(state and (state.is_cancelling() or state.is_cancelled()))
