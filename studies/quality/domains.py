"""The study's domain corpora: pydoc (built in) and the bundled second corpus, kept back.

``--domain`` takes a short name from :data:`DOMAINS` or a path (a directory of text files, a
``.jsonl`` file or a text file). Each domain keeps its own results and report, so one
domain's study never refuses or mixes with the other's:

- ``pydoc``: CPython's pydoc topics (built in); results in ``docs/quality/``, report
  ``docs/quality.md``;
- ``pgsql``: ``corpora/pgsql_ref.jsonl``; results in ``docs/quality/pgsql/``, report
  ``docs/quality_pgsql.md``.

``pgsql`` is the PostgreSQL 15 SQL command reference (provenance and licence in
``corpora/PGSQL_LICENSE`` and ``corpora/build_pgsql.py``). It is the check corpus: round
defaults are tuned on pydoc only, then confirmed on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOMAINS: dict[str, Path | None] = {
    "pydoc": None,
    "pgsql": HERE / "corpora" / "pgsql_ref.jsonl",
}


@dataclass(frozen=True)
class Domain:
    key: str  # "pydoc", "pgsql", or the path's stem
    path: str | None  # None: the built-in pydoc topics
    # Test passages the study measures (0: all). pgsql's test split has 202 passages; a
    # seeded 96 keep a measurement near pydoc's cost (81).
    test_passages: int | None = None

    @property
    def out(self) -> Path:
        return Path("docs/quality") if self.key == "pydoc" else Path("docs/quality") / self.key

    @property
    def report(self) -> Path:
        return (
            Path("docs/quality.md") if self.key == "pydoc" else Path(f"docs/quality_{self.key}.md")
        )


def resolve(arg: str | None) -> Domain:
    if arg is None or arg == "pydoc":
        return Domain("pydoc", None)
    if arg in DOMAINS:
        path = DOMAINS[arg]
        assert path is not None
        return Domain(arg, str(path), 96 if arg == "pgsql" else None)
    path = Path(arg).expanduser().resolve()
    return Domain(path.stem, str(path))
