"""Build ``pgsql_ref.jsonl``: the PostgreSQL SQL command reference as plain text.

The quality study's second domain corpus (technical reference text that is not pydoc, kept
back for checking: no default is tuned on it). Source: the ``man7`` SQL command pages of
Debian's ``postgresql-client-15`` package (PostgreSQL 15.20 documentation, PostgreSQL
Licence; see ``PGSQL_LICENSE``), rendered with groff to UTF-8 text, one JSON line per page:
``{"name": "ABORT", "text": ...}``. The result is committed, so the study and CI read the
file and need neither PostgreSQL nor groff; this script only documents (and repeats) how it
was made:

    python studies/quality/corpora/build_pgsql.py [--man-dir /usr/share/postgresql/15/man/man7]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MAN_DIR = Path("/usr/share/postgresql/15/man/man7")


def render(page: Path) -> str:
    """One man page as text: paragraphs on one line, the page's common indent removed."""
    source = gzip.decompress(page.read_bytes()) if page.suffix == ".gz" else page.read_bytes()
    out = subprocess.run(
        ["groff", "-t", "-man", "-Tutf8", "-P-cbou", "-rLL=2000n", "-rHY=0"],
        input=source,
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8")
    lines = out.splitlines()
    # Drop the running header (first non-empty line) and footer (last non-empty line).
    body = [ln.rstrip() for ln in lines]
    while body and not body[0].strip():
        body.pop(0)
    body = body[1:]
    while body and not body[-1].strip():
        body.pop()
    body = body[:-1]
    # Section headings are flush left and their bodies indented by 7 columns: remove those
    # 7, keeping the extra indentation of code and lists.
    body = [ln[7:] if ln.startswith(" " * 7) else ln for ln in body]
    text = textwrap.dedent("\n".join(body)).strip()
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.replace("\u2010", "-").replace("\u2019", "'").replace("\u2018", "'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--man-dir", type=Path, default=DEFAULT_MAN_DIR)
    ap.add_argument("--out", type=Path, default=HERE / "pgsql_ref.jsonl")
    args = ap.parse_args()
    pages = sorted(args.man_dir.glob("*.7*"))
    with args.out.open("w", encoding="utf-8") as f:
        for page in pages:
            name = page.name.split(".")[0]
            text = render(page)
            if text:
                f.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
    print(f"{len(pages)} pages -> {args.out}")


if __name__ == "__main__":
    main()
