"""The four supported MovieLens releases: their files, encodings and rating scales, and the
columns of the frames the loaders return."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_DATASETS: tuple[str, ...] = ("ml-latest-small", "ml-100k", "ml-1m", "ml-25m")

# (min, max) of each dataset's rating scale; see FORMATS for the step.
RATING_SCALES: dict[str, tuple[float, float]] = {
    "ml-latest-small": (0.5, 5.0),
    "ml-100k": (1.0, 5.0),
    "ml-1m": (1.0, 5.0),
    "ml-25m": (0.5, 5.0),
}

RATING_COLUMNS = ("user", "item", "rating", "timestamp")
GENRE_PREFIX = "genre:"

CSV_RATING_HEADER = ("userId", "movieId", "rating", "timestamp")
CSV_MOVIE_HEADER = ("movieId", "title", "genres")


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "csv" (latest-small, 25m) | "dat" (1m) | "100k"
    ratings_file: str
    movies_file: str
    extra_files: tuple[str, ...]
    step: float
    encoding: str
    pseudo_genre: str | None

    @property
    def files(self) -> tuple[str, ...]:
        return (self.ratings_file, self.movies_file, *self.extra_files)

    @property
    def scale(self) -> tuple[float, float]:
        return RATING_SCALES[self.name]


FORMATS: dict[str, Format] = {
    "ml-latest-small": Format(
        "ml-latest-small", "csv", "ratings.csv", "movies.csv", (), 0.5, "utf-8",
        "(no genres listed)",
    ),
    "ml-25m": Format(
        "ml-25m", "csv", "ratings.csv", "movies.csv", (), 0.5, "utf-8", "(no genres listed)"
    ),
    "ml-1m": Format("ml-1m", "dat", "ratings.dat", "movies.dat", (), 1.0, "latin-1", None),
    "ml-100k": Format(
        "ml-100k", "100k", "u.data", "u.item", ("u.genre",), 1.0, "latin-1", "unknown"
    ),
}
