"""Whether a flow run's name was made up by Prefect (then the flow names the run after its form values) or typed
by the user (then it is kept). A run created over the API without a name gets a coolname slug from the server
(`fair-manul`); the UI's run form pre-fills a Greek letter and a star name (`kappa3-andromedae`)."""
import re
from functools import lru_cache
from importlib import resources

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
