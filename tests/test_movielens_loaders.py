"""MovieLens loaders: real data, official layouts, download, parsed cache and malformed files."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import threading
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from envs.data import (
    OFFICIAL_SHA256,
    SUPPORTED_DATASETS,
    DatasetError,
    MovieLensData,
    default_cache_dir,
    describe,
    load_movielens,
)
from envs.data import movielens as ml
from envs.data.movielens import diagnostics

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

MOVIES_CSV = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '2,"American President, The (1995)",Comedy|Drama|Romance\n'
    "3,Untitled Project,(no genres listed)\n"
)
RATINGS_CSV = (
    "userId,movieId,rating,timestamp\n"
    "1,1,4.0,964982703\n"
    "1,2,3.5,964981247\n"
    "2,3,0.5,1445714994\n"
    "2,1,5.0,1445714990\n"
)


def write_files(folder: Path, files: dict[str, str | bytes], encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        data = text if isinstance(text, bytes) else text.encode(encoding)
        (folder / name).write_bytes(data)
    return folder


def csv_dataset(root: Path, ratings: str = RATINGS_CSV, movies: str = MOVIES_CSV) -> Path:
    return write_files(root / "ml-latest-small", {"ratings.csv": ratings, "movies.csv": movies})


def zip_folder(folder: Path, dest: Path, prefix: str, files: list[str] | None = None) -> Path:
    names = files if files is not None else sorted(p.name for p in folder.iterdir() if p.is_file())
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.write(folder / name, f"{prefix}{name}")
    return dest


def assert_same(a: MovieLensData, b: MovieLensData) -> None:
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    pd.testing.assert_frame_equal(a.movies, b.movies)
    assert a.genre_names == b.genre_names
    assert a.name == b.name


def assert_schema(data: MovieLensData) -> None:
    r, m = data.ratings, data.movies
    assert list(r.columns) == ["user", "item", "rating", "timestamp"]
    assert [str(t) for t in r.dtypes] == ["int64", "int64", "float32", "int64"]
    assert isinstance(r.index, pd.RangeIndex)
    order = np.lexsort((r["item"].to_numpy(), r["timestamp"].to_numpy(), r["user"].to_numpy()))
    assert np.array_equal(order, np.arange(len(r))), "ratings not sorted by (user, timestamp, item)"
    assert list(m.columns[:3]) == ["item", "title", "year"]
    assert m["item"].dtype == np.int64
    assert pd.api.types.is_string_dtype(m["title"])
    assert m["year"].dtype == np.float32
    assert list(m.columns[3:]) == [f"genre:{g}" for g in data.genre_names]
    assert all(m[c].dtype == np.uint8 for c in m.columns[3:])
    assert m["item"].is_unique
    assert r["item"].isin(m["item"]).all()


def parsed_entries(cache: Path) -> list[Path]:
    parsed = cache / "parsed"
    if not parsed.exists():
        return []
    return sorted(p for p in parsed.iterdir() if not p.name.startswith("."))


def load_error(name: str, path: Path, cache: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_movielens(name, path, cache_dir=cache)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# real data (shared folder)
# ---------------------------------------------------------------------------------------------


def test_latest_small_from_folder(shared_data: Path, tmp_path: Path) -> None:
    data = load_movielens("ml-latest-small", shared_data / "ml-latest-small", cache_dir=tmp_path)
    assert_schema(data)
    r = data.ratings
    assert len(r) == 100_836
    assert r["user"].nunique() == 610
    assert len(data.movies) == 9_742
    assert float(r["rating"].min()) == 0.5 and float(r["rating"].max()) == 5.0
    assert set(np.unique(r["rating"] * 2)) <= set(range(1, 11))
    assert {"Action", "Comedy", "Drama"} <= set(data.genre_names)
    assert "(no genres listed)" not in data.genre_names
    toy = data.movies.set_index("item").loc[1]
    assert toy["title"] == "Toy Story (1995)" and toy["year"] == 1995
    assert toy["genre:Animation"] == 1 and toy["genre:Drama"] == 0
    assert data.source == str(shared_data / "ml-latest-small")
    assert data.rating_scale == (0.5, 5.0)


def test_100k_from_folder(shared_data: Path, tmp_path: Path) -> None:
    data = load_movielens("ml-100k", shared_data / "ml-100k", cache_dir=tmp_path)
    assert_schema(data)
    r = data.ratings
    assert len(r) == 100_000
    assert r["user"].nunique() == 943
    assert len(data.movies) == 1_682
    assert set(np.unique(r["rating"])) == {1.0, 2.0, 3.0, 4.0, 5.0}
    genre_file = (shared_data / "ml-100k" / "u.genre").read_text(encoding="latin-1").split()
    from_file = [line.rsplit("|", 1)[0] for line in genre_file if line.strip()]
    assert len(data.genre_names) in (18, 19)
    assert list(data.genre_names) == [g for g in from_file if g != "unknown"]
    assert "Children's" in data.genre_names
    movies = data.movies.set_index("item")
    assert movies.loc[1, "title"] == "Toy Story (1995)" and movies.loc[1, "year"] == 1995
    assert movies.loc[1, "genre:Animation"] == 1 and movies.loc[1, "genre:Action"] == 0
    assert movies.loc[2, "genre:Action"] == 1  # GoldenEye
    assert np.isnan(movies.loc[267, "year"])  # the "unknown" movie has neither a year nor a date
    assert data.rating_scale == (1.0, 5.0)


def test_folder_containing_a_dataset_subfolder(shared_data: Path, tmp_path: Path) -> None:
    direct = load_movielens("ml-100k", shared_data / "ml-100k", cache_dir=tmp_path)
    parent = load_movielens("ml-100k", shared_data, cache_dir=tmp_path)
    assert_same(direct, parent)


@pytest.mark.parametrize("name", ["ml-latest-small", "ml-100k"])
def test_zip_gives_identical_frames(shared_data: Path, tmp_path: Path, name: str) -> None:
    archive = zip_folder(shared_data / name, tmp_path / f"{name}.zip", f"{name}/")
    from_zip = load_movielens(name, archive, cache_dir=tmp_path / "c1")
    from_folder = load_movielens(name, shared_data / name, cache_dir=tmp_path / "c2")
    assert_same(from_zip, from_folder)
    assert from_zip.source == str(archive)


@pytest.mark.parametrize("name", ["ml-latest-small", "ml-100k"])
def test_second_load_reads_parquet_cache(
    shared_data: Path, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_movielens(name, shared_data / name, cache_dir=tmp_path)
    entries = parsed_entries(tmp_path)
    assert len(entries) == 1 and entries[0].name.startswith(f"{name}-")
    assert (entries[0] / "ratings.parquet").is_file() and (entries[0] / "movies.parquet").is_file()

    def no_parse(*args, **kwargs):
        raise AssertionError("the text files were parsed again")

    monkeypatch.setattr(ml, "_parse", no_parse)
    second = load_movielens(name, shared_data / name, cache_dir=tmp_path)
    assert_same(first, second)
    assert second.source == first.source


def test_describe_latest_small(shared_data: Path, tmp_path: Path) -> None:
    info = describe(load_movielens("ml-latest-small", shared_data, cache_dir=tmp_path))
    assert info["users"] == 610
    assert info["items"] == 9_742
    assert info["rated_items"] == 9_724
    assert info["ratings"] == 100_836
    assert (info["rating_min"], info["rating_max"]) == (0.5, 5.0)
    assert info["first_date"] == "1996-03-29" and info["last_date"] == "2018-09-24"
    assert 8_200 < info["span_days"] < 8_220
    assert info["ratings_per_user_min"] == 20
    assert info["ratings_per_user_max"] == 2_698
    assert 20 <= info["ratings_per_user_median"] <= 2_698


@pytest.mark.parametrize(
    ("kind", "replacement", "expected"),
    [
        ("out_of_range", "{u},{m},5.5,{t}", ["rating 5.5 is out of range", "0.5 to 5"]),
        ("unknown_movie", "{u},987654321,4.0,{t}", ["movie id 987654321 is not in", "movies.csv"]),
        ("non_numeric", "{u},{m},four,{t}", ["rating 'four'", "not a number"]),
        ("non_integer_ts", "{u},{m},4.0,{t}.5", ["timestamp", "not an integer"]),
        ("header", "userId,movieId,rating,timestamp", ["duplicate header line"]),
        ("fields", "{u},{m},4.0", ["expected 4 comma-separated fields", "found 3"]),
    ],
)
def test_error_line_in_real_sized_file(
    shared_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    replacement: str,
    expected: list[str],
) -> None:
    """Problems are located by vectorised checks, not by a line-by-line scan of the whole file;
    the reported line must be exact."""
    folder = tmp_path / "ml-latest-small"
    folder.mkdir()
    shutil.copy(shared_data / "ml-latest-small" / "movies.csv", folder / "movies.csv")
    lines = (shared_data / "ml-latest-small" / "ratings.csv").read_text().splitlines()
    target = 60_001  # 1-based line number, header = line 1
    user, movie, _, ts = lines[target - 1].split(",")
    lines[target - 1] = replacement.format(u=user, m=movie, t=ts)
    lines.insert(10, "")  # a blank line earlier in the file still counts as a line
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    def no_scan(*args, **kwargs):
        raise AssertionError("fell back to the line-by-line scan")

    monkeypatch.setattr(diagnostics, "scan_ratings", no_scan)
    message = load_error("ml-latest-small", folder, tmp_path / "cache")
    assert str(folder / "ratings.csv") in message
    assert f"line {target + 1}:" in message
    for text in expected:
        assert text in message, message
    assert parsed_entries(tmp_path / "cache") == []


# ---------------------------------------------------------------------------------------------
# official layouts written by the tests: ml-1m and ml-25m
# ---------------------------------------------------------------------------------------------

ML1M_MOVIES = (
    "1::Toy Story (1995)::Animation|Children's|Comedy\n"
    "2::Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)::Comedy|Romance\n"
    "3::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi\n"
)
ML1M_RATINGS = (
    "1::3::5::978300760\n"
    "1::1::3::978300760\n"
    "1::2::4::978300019\n"
    "2::2::1::978298413\n"
)


def test_ml1m_official_layout(tmp_path: Path) -> None:
    folder = write_files(
        tmp_path / "ml-1m",
        {"ratings.dat": ML1M_RATINGS, "movies.dat": ML1M_MOVIES},
        encoding="latin-1",
    )
    assert "Amélie".encode("latin-1") in (folder / "movies.dat").read_bytes()
    data = load_movielens("ml-1m", folder, cache_dir=tmp_path / "cache")
    assert_schema(data)
    assert data.ratings.values.tolist() == [
        [1, 2, 4, 978300019],
        [1, 1, 3, 978300760],
        [1, 3, 5, 978300760],
        [2, 2, 1, 978298413],
    ]
    movies = data.movies.set_index("item")
    assert movies.loc[2, "title"] == "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"
    assert movies.loc[2, "year"] == 2001
    assert movies.loc[3, "title"] == "Star Wars: Episode IV - A New Hope (1977)"
    assert data.genre_names == (
        "Action", "Adventure", "Animation", "Children's", "Comedy", "Fantasy", "Romance", "Sci-Fi",
    )
    assert movies.loc[2, "genre:Romance"] == 1 and movies.loc[2, "genre:Action"] == 0
    assert data.rating_scale == (1.0, 5.0)

    archive = zip_folder(folder, tmp_path / "ml-1m.zip", "ml-1m/")
    assert_same(data, load_movielens("ml-1m", archive, cache_dir=tmp_path / "cache2"))


ML25M_MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\n'
    '209171,"Women of Devil\'s Island, The (1962)",Action|Adventure|Drama\n'
    "209157,We (2018),Drama\n"
    "209163,Bad Poems (2018),Comedy|Drama\n"
    "209169,A Girl Thing (2001),(no genres listed)\n"
    "171749,Death Note: Desu nôto (2006–2007),(no genres listed)\n"
    "208939,Klaus,Adventure|Animation|Children|Comedy\n"
)
ML25M_RATINGS = (
    "userId,movieId,rating,timestamp\n"
    "1,1,3.5,1147880044\n"
    "1,11,0.5,1147868817\n"
    "162541,209171,5.0,1240953372\n"
    "162541,209157,4.5,1240951792\n"
    "3,208939,2.5,1566090000\n"
    "3,171749,1.0,1566090000\n"
)


def test_ml25m_official_layout(tmp_path: Path) -> None:
    folder = write_files(
        tmp_path / "ml-25m", {"ratings.csv": ML25M_RATINGS, "movies.csv": ML25M_MOVIES}
    )
    data = load_movielens("ml-25m", folder, cache_dir=tmp_path / "cache")
    assert_schema(data)
    r = data.ratings
    assert r["user"].tolist() == [1, 1, 3, 3, 162541, 162541]
    assert r["item"].tolist() == [11, 1, 171749, 208939, 209157, 209171]
    assert r["rating"].tolist() == [0.5, 3.5, 1.0, 2.5, 4.5, 5.0]
    movies = data.movies.set_index("item")
    assert movies.loc[11, "title"] == "American President, The (1995)"
    assert movies.loc[209171, "title"] == "Women of Devil's Island, The (1962)"
    assert movies.loc[171749, "year"] == 2006
    assert np.isnan(movies.loc[208939, "year"])
    assert movies.loc[209169, [c for c in movies.columns if c.startswith("genre:")]].sum() == 0
    assert "(no genres listed)" not in data.genre_names
    assert data.genre_names == tuple(sorted(data.genre_names))
    assert list(data.movies["item"]) == [1, 11, 209171, 209157, 209163, 209169, 171749, 208939]

    archive = zip_folder(folder, tmp_path / "ml-25m.zip", "ml-25m/")
    assert_same(data, load_movielens("ml-25m", archive, cache_dir=tmp_path / "cache2"))
    assert_same(data, load_movielens("ml-25m", tmp_path, cache_dir=tmp_path / "cache3"))


def test_edited_file_is_parsed_again(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path)
    cache = tmp_path / "cache"
    first = load_movielens("ml-latest-small", folder, cache_dir=cache)
    assert first.ratings["rating"].tolist() == [3.5, 4.0, 5.0, 0.5]
    ratings = folder / "ratings.csv"
    before = ratings.stat()
    ratings.write_text(RATINGS_CSV.replace("1,2,3.5,", "1,2,2.0,"))
    os.utime(ratings, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    second = load_movielens("ml-latest-small", folder, cache_dir=cache)
    assert second.ratings["rating"].tolist() == [2.0, 4.0, 5.0, 0.5]
    assert len(parsed_entries(cache)) == 2


def test_corrupt_parquet_cache_is_a_cache_miss(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path)
    cache = tmp_path / "cache"
    first = load_movielens("ml-latest-small", folder, cache_dir=cache)
    (entry,) = parsed_entries(cache)
    (entry / "ratings.parquet").write_bytes(b"not parquet")
    second = load_movielens("ml-latest-small", folder, cache_dir=cache)
    assert_same(first, second)
    pd.read_parquet(entry / "ratings.parquet")  # rewritten


# ---------------------------------------------------------------------------------------------
# sources, download and the loopback server
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k_zip(shared_data: Path) -> bytes:
    """ml-100k.zip in the official layout (ml-100k/u.data ...), built from the shared folder."""
    buf = io.BytesIO()
    folder = shared_data / "ml-100k"
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            if p.is_file():
                zf.write(p, f"ml-100k/{p.name}")
    return buf.getvalue()


@pytest.fixture
def http_server(monkeypatch: pytest.MonkeyPatch):
    """A loopback HTTP server serving ``files`` (path -> bytes); records the requested paths."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop() -> None:
        if not stopped:
            stopped.append(True)
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)

    yield SimpleNamespace(
        files=files, requests=requests, url=f"http://127.0.0.1:{server.server_port}", stop=stop
    )
    stop()


def cache_leftovers(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_download_verifies_extracts_and_caches(
    http_server, ml100k_zip: bytes, shared_data: Path, tmp_path: Path
) -> None:
    http_server.files["/ml-100k.zip"] = ml100k_zip
    sha = hashlib.sha256(ml100k_zip).hexdigest()
    url = http_server.url + "/ml-100k.zip"
    cache = tmp_path / "cache"
    data = load_movielens("ml-100k", cache_dir=cache, download=True, url=url, sha256=sha)
    assert http_server.requests == ["/ml-100k.zip"]
    assert data.source == url
    assert len(data.ratings) == 100_000
    assert_same(data, load_movielens("ml-100k", shared_data / "ml-100k", cache_dir=tmp_path / "c2"))
    extracted = cache / "movielens" / "ml-100k"
    assert (extracted / "u.data").read_bytes() == (shared_data / "ml-100k" / "u.data").read_bytes()
    assert sorted(p.name for p in (cache / "movielens").iterdir()) == ["ml-100k"]  # no temp files

    http_server.stop()
    again = load_movielens("ml-100k", cache_dir=cache, download=True, url=url, sha256=sha)
    assert_same(data, again)
    assert again.source == str(extracted)
    assert http_server.requests == ["/ml-100k.zip"]
    # the extracted copy is found without download=True too
    assert_same(data, load_movielens("ml-100k", cache_dir=cache))


def test_download_wrong_checksum_leaves_nothing(
    http_server, ml100k_zip: bytes, tmp_path: Path
) -> None:
    http_server.files["/ml-100k.zip"] = ml100k_zip
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="checksum") as info:
        load_movielens(
            "ml-100k", cache_dir=cache, download=True, url=http_server.url + "/ml-100k.zip",
            sha256="0" * 64,
        )
    assert "0" * 64 in str(info.value) and hashlib.sha256(ml100k_zip).hexdigest() in str(info.value)
    assert http_server.requests == ["/ml-100k.zip"]
    assert cache_leftovers(cache) == []
    assert not (cache / "movielens" / "ml-100k").exists()


def test_download_checks_the_official_checksum_by_default(
    http_server, ml100k_zip: bytes, tmp_path: Path
) -> None:
    # The zip built by the tests is not byte-identical to the official archive.
    http_server.files["/ml-100k.zip"] = ml100k_zip
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="checksum") as info:
        load_movielens(
            "ml-100k", cache_dir=cache, download=True, url=http_server.url + "/ml-100k.zip"
        )
    assert OFFICIAL_SHA256["ml-100k"] in str(info.value)
    assert cache_leftovers(cache) == []


def test_download_truncated_archive(http_server, ml100k_zip: bytes, tmp_path: Path) -> None:
    half = ml100k_zip[: len(ml100k_zip) // 2]
    http_server.files["/ml-100k.zip"] = half
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="not a valid zip archive") as info:
        load_movielens(
            "ml-100k", cache_dir=cache, download=True, url=http_server.url + "/ml-100k.zip",
            sha256=hashlib.sha256(half).hexdigest(),
        )
    assert "/ml-100k.zip" in str(info.value)
    assert cache_leftovers(cache) == []
    assert not (cache / "movielens" / "ml-100k").exists()


def test_download_http_error(http_server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="HTTP 404"):
        load_movielens("ml-1m", cache_dir=cache, download=True, url=http_server.url + "/nope.zip")
    assert cache_leftovers(cache) == []


def test_not_found_without_download_never_downloads(
    http_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download without download=True")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as info:
        load_movielens("ml-25m", cache_dir=cache, url=http_server.url + "/ml-25m.zip")
    message = str(info.value)
    assert "--path" in message and "--download" in message
    assert str(cache / "movielens" / "ml-25m") in message
    assert http_server.requests == []
    (cache / "movielens" / "ml-25m").mkdir(parents=True)
    (cache / "movielens" / "ml-25m" / "movies.csv").write_text(ML25M_MOVIES)
    with pytest.raises(DatasetError, match=r"that folder lacks ratings\.csv"):
        load_movielens("ml-25m", cache_dir=cache)


def test_zip_in_cache_dir_is_used(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path / "src")
    cache = tmp_path / "cache"
    (cache / "movielens").mkdir(parents=True)
    zip_folder(folder, cache / "movielens" / "ml-latest-small.zip", "ml-latest-small/")
    data = load_movielens("ml-latest-small", cache_dir=cache)
    assert len(data.ratings) == 4


def test_zip_path_checked_against_given_sha256(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path / "src")
    archive = zip_folder(folder, tmp_path / "ml-latest-small.zip", "ml-latest-small/")
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    data = load_movielens("ml-latest-small", archive, cache_dir=tmp_path, sha256=good)
    assert len(data.ratings) == 4
    with pytest.raises(DatasetError, match="checksum"):
        load_movielens("ml-latest-small", archive, cache_dir=tmp_path, sha256="f" * 64)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDRLHF_CACHE", str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"
    monkeypatch.delenv("FEDRLHF_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "fedrlhf"


def test_unknown_dataset_and_missing_path(tmp_path: Path) -> None:
    assert SUPPORTED_DATASETS == ("ml-latest-small", "ml-100k", "ml-1m", "ml-25m")
    with pytest.raises(DatasetError, match="ml-20m"):
        load_movielens("ml-20m", tmp_path)
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_movielens("ml-100k", tmp_path / "missing", cache_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"missing u\.data, u\.item, u\.genre"):
        load_movielens("ml-100k", tmp_path, cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# malformed files: every message names the file and the line or column
# ---------------------------------------------------------------------------------------------

R_HEAD = "userId,movieId,rating,timestamp\n"


@pytest.mark.parametrize(
    ("ratings", "expected"),
    [
        pytest.param(
            "userId,movieId,timestamp\n1,1,964982703\n",
            ["line 1", "missing column(s) rating", "columns found: userId, movieId, timestamp"],
            id="missing-column",
        ),
        pytest.param(
            "1,1,4.0,964982703\n1,2,3.5,964981247\n",
            [
                "line 1",
                "missing column(s) userId, movieId, rating, timestamp",
                "header line seems to be missing",
            ],
            id="no-header",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,abc,964981247\n",
            ["line 3", "rating 'abc'", "not a number"],
            id="non-numeric-rating",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,,964981247\n",
            ["line 3", "rating ''", "not a number"],
            id="empty-rating",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,7.5,964981247\n",
            ["line 3", "rating 7.5", "out of range", "0.5 to 5 in steps of 0.5"],
            id="rating-too-high",
        ),
        pytest.param(
            R_HEAD + "1,1,0,964982703\n",
            ["line 2", "rating 0 is out of range", "0.5 to 5"],
            id="rating-zero",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,3.25,964981247\n",
            ["line 3", "rating 3.25", "steps of 0.5"],
            id="not-half-star",
        ),
        pytest.param("", ["the file is empty"], id="empty-file"),
        pytest.param(R_HEAD, ["has no ratings"], id="header-only"),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,3.5,964981247\n" + R_HEAD + "2,3,0.5,1445714994\n",
            ["line 4", "duplicate header line"],
            id="duplicate-header",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n\n\n2,99,4.0,964981247\n",
            ["line 5", "movie id 99 is not in", "movies.csv"],
            id="unknown-movie",
        ),
        pytest.param(
            R_HEAD + "u1,1,4.0,964982703\n",
            ["line 2", "user id 'u1'", "column userId", "not an integer"],
            id="non-integer-user",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2.5,4.0,964982703\n",
            ["line 3", "movie id '2.5'", "column movieId", "not an integer"],
            id="non-integer-movie",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,4.0,2018-09-24\n",
            ["line 3", "timestamp '2018-09-24'", "column timestamp", "not an integer"],
            id="non-integer-timestamp",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,4.0\n",
            ["line 3", "expected 4 comma-separated fields", "found 3"],
            id="too-few-fields",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703,9\n",
            ["line 2", "expected 4 comma-separated fields", "found 5"],
            id="too-many-fields",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n1,2,4.0\n2,3,x,1\n",
            ["line 3", "found 3"],
            id="field-count-before-bad-value",
        ),
        pytest.param(
            R_HEAD + "1,1,4.0,964982703\n2,3,x,1\n1,2,4.0\n",
            ["line 3", "rating 'x'"],
            id="bad-value-before-field-count",
        ),
        pytest.param(
            R_HEAD + '1,1,4.0,964982703\n1,"2,4.0,964981247\n2,3,0.5,1445714994\n',
            ["line 3", "movie id '\"2'", "not an integer"],
            id="unbalanced-quote",
        ),
    ],
)
def test_malformed_ratings_csv(tmp_path: Path, ratings: str, expected: list[str]) -> None:
    folder = csv_dataset(tmp_path, ratings=ratings)
    cache = tmp_path / "cache"
    message = load_error("ml-latest-small", folder, cache)
    assert str(folder / "ratings.csv") in message
    for text in expected:
        assert text in message, message
    assert parsed_entries(cache) == []


@pytest.mark.parametrize(
    ("movies", "expected"),
    [
        pytest.param(
            "movieId,genres\n1,Comedy\n",
            ["line 1", "missing column(s) title", "columns found: movieId, genres"],
            id="missing-column",
        ),
        pytest.param("", ["the file is empty"], id="empty-file"),
        pytest.param(
            MOVIES_CSV + "x4,Heat (1995),Action\n",
            ["line 5", "movie id 'x4'", "not an integer"],
            id="non-integer-id",
        ),
        pytest.param(
            MOVIES_CSV + "2,Heat (1995),Action\n",
            ["line 5", "movie id 2 appears again", "first on line 3"],
            id="duplicate-id",
        ),
        pytest.param(
            MOVIES_CSV + "4,Heat (1995)\n",
            ["line 5", "expected 3 comma-separated fields", "found 2"],
            id="too-few-fields",
        ),
        pytest.param(
            MOVIES_CSV + "movieId,title,genres\n",
            ["line 5", "duplicate header line"],
            id="duplicate-header",
        ),
    ],
)
def test_malformed_movies_csv(tmp_path: Path, movies: str, expected: list[str]) -> None:
    folder = csv_dataset(tmp_path, movies=movies)
    message = load_error("ml-latest-small", folder, tmp_path / "cache")
    assert str(folder / "movies.csv") in message
    for text in expected:
        assert text in message, message


U_GENRE = "unknown|0\nAction|1\nComedy|2\n\n"
U_ITEM = (
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|0|0|1\n"
    "2|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?GoldenEye%20(1995)|0|1|0\n"
    "3|Un été (x)|01-Jan-1996||http://us.imdb.com/|1|0|0\n"
)
U_DATA = "1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t3\t1\t878542960\n"


def test_ml100k_fixture_and_year_fallback(tmp_path: Path) -> None:
    folder = write_files(
        tmp_path / "ml-100k", {"u.data": U_DATA, "u.item": U_ITEM, "u.genre": U_GENRE}, "latin-1"
    )
    data = load_movielens("ml-100k", folder, cache_dir=tmp_path / "cache")
    assert_schema(data)
    assert data.genre_names == ("Action", "Comedy")
    assert data.movies["title"].tolist() == ["Toy Story (1995)", "GoldenEye (1995)", "Un été (x)"]
    assert data.movies["year"].tolist() == [1995, 1995, 1996]  # 1996 from the release date
    assert data.movies["genre:Comedy"].tolist() == [1, 0, 0]


@pytest.mark.parametrize(
    ("files", "bad_file", "expected"),
    [
        pytest.param(
            {"u.data": U_DATA + "2\t1\t6\t878542960\n"},
            "u.data", ["line 4", "rating 6 is out of range", "whole numbers 1 to 5"], id="rating-6",
        ),
        pytest.param(
            {"u.data": U_DATA + "2\t1\t3.5\t878542960\n"},
            "u.data",
            ["line 4", "rating 3.5 is out of range", "whole numbers 1 to 5"],
            id="half-star",
        ),
        pytest.param(
            {"u.data": U_DATA + "2\t1\t3\n"},
            "u.data", ["line 4", "expected 4 tab-separated fields", "found 3"], id="too-few-fields",
        ),
        pytest.param(
            {"u.data": "user\titem\trating\ttimestamp\n" + U_DATA},
            "u.data", ["line 1", "user id 'user'", "not an integer"], id="header-in-headerless",
        ),
        pytest.param(
            {"u.data": U_DATA + "2\t7\t3\t878542960\n"},
            "u.data", ["line 4", "movie id 7 is not in", "u.item"], id="unknown-movie",
        ),
        pytest.param({"u.data": ""}, "u.data", ["the file is empty"], id="empty"),
        pytest.param(
            {"u.item": U_ITEM + "4|Heat (1995)|01-Jan-1995||url|0|1\n"},
            "u.item", ["line 4", "expected 8 '|'-separated fields", "found 7"], id="item-fields",
        ),
        pytest.param(
            {"u.item": U_ITEM + "4|Heat (1995)|01-Jan-1995||url|0|2|0\n"},
            "u.item", ["line 4", "genre flag '2'", "column 7", "(Action)"], id="item-flag",
        ),
        pytest.param(
            {"u.genre": "unknown|0\nAction|x\n"},
            "u.genre", ["line 2", "genre index 'x'"], id="genre-index",
        ),
    ],
)
def test_malformed_ml100k(
    tmp_path: Path, files: dict[str, str], bad_file: str, expected: list[str]
) -> None:
    content = {"u.data": U_DATA, "u.item": U_ITEM, "u.genre": U_GENRE, **files}
    folder = write_files(tmp_path / "ml-100k", content, "latin-1")
    message = load_error("ml-100k", folder, tmp_path / "cache")
    assert str(folder / bad_file) in message
    for text in expected:
        assert text in message, message


@pytest.mark.parametrize(
    ("files", "bad_file", "expected"),
    [
        pytest.param(
            {"ratings.dat": ML1M_RATINGS + "2::1::4.5::978298413\n"},
            "ratings.dat", ["line 5", "rating 4.5 is out of range"], id="half-star",
        ),
        pytest.param(
            {"ratings.dat": ML1M_RATINGS + "2::x::4::978298413\n"},
            "ratings.dat", ["line 5", "movie id 'x'", "column MovieID"], id="non-integer-movie",
        ),
        pytest.param(
            {"ratings.dat": ML1M_RATINGS + "2::1:4::978298413\n"},
            "ratings.dat", ["line 5", "expected 4 fields separated by '::'", "found 3"],
            id="single-colon",
        ),
        pytest.param(
            {"ratings.dat": ML1M_RATINGS + "2::1::4::978298413::7\n"},
            "ratings.dat", ["line 5", "found 5"], id="too-many-fields",
        ),
        pytest.param(
            {"movies.dat": ML1M_MOVIES + "4::Heat (1995)\n"},
            "movies.dat", ["line 4", "expected 3 fields separated by '::'", "found 2"],
            id="movie-fields",
        ),
    ],
)
def test_malformed_ml1m(
    tmp_path: Path, files: dict[str, str], bad_file: str, expected: list[str]
) -> None:
    content = {"ratings.dat": ML1M_RATINGS, "movies.dat": ML1M_MOVIES, **files}
    folder = write_files(tmp_path / "ml-1m", content, "latin-1")
    message = load_error("ml-1m", folder, tmp_path / "cache")
    assert str(folder / bad_file) in message
    for text in expected:
        assert text in message, message


def test_invalid_utf8_in_ratings(tmp_path: Path) -> None:
    ratings = (R_HEAD + "1,1,4.0,964982703\n1,2,4.0,9649812\xff7\n").encode("latin-1")
    folder = write_files(
        tmp_path / "ml-latest-small", {"ratings.csv": ratings, "movies.csv": MOVIES_CSV}
    )
    message = load_error("ml-latest-small", folder, tmp_path / "cache")
    assert str(folder / "ratings.csv") in message and "line 3" in message, message


def test_error_inside_zip_names_member_and_line(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path / "src", ratings=R_HEAD + "1,1,4.0,964982703\n1,2,9,1\n")
    archive = zip_folder(folder, tmp_path / "ml-latest-small.zip", "ml-latest-small/")
    message = load_error("ml-latest-small", archive, tmp_path / "cache")
    assert f"{archive}:ml-latest-small/ratings.csv: line 3: rating 9 is out of range" in message


def test_truncated_zip_path(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path / "src")
    archive = zip_folder(folder, tmp_path / "ml-latest-small.zip", "ml-latest-small/")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    message = load_error("ml-latest-small", archive, tmp_path / "cache")
    assert str(archive) in message and "not a valid zip archive (truncated or corrupt)" in message


def test_corrupt_zip_member(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path / "src")
    archive = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(folder / "movies.csv", "ml-latest-small/movies.csv")
        zf.write(folder / "ratings.csv", "ml-latest-small/ratings.csv")
    raw = bytearray(archive.read_bytes())
    pos = raw.find(b"964982703")
    raw[pos] = ord("8")  # still a valid number: only the CRC can tell
    archive.write_bytes(bytes(raw))
    message = load_error("ml-latest-small", archive, tmp_path / "cache")
    assert str(archive) in message and "truncated or corrupt" in message
    assert parsed_entries(tmp_path / "cache") == []


def test_zip_without_dataset_members(tmp_path: Path) -> None:
    folder = csv_dataset(tmp_path / "src")
    archive = zip_folder(folder, tmp_path / "x.zip", "ml-latest-small/", files=["movies.csv"])
    message = load_error("ml-latest-small", archive, tmp_path / "cache")
    assert str(archive) in message and "missing ml-latest-small/ratings.csv" in message


# ---------------------------------------------------------------------------------------------
# files cut short: every official file ends with a line break, so a last line without one is an
# error naming the file and that line -- never rows parsed from a number cut short
# ---------------------------------------------------------------------------------------------

CUT_SHORT = "was cut short; re-extract or re-download the dataset"


def assert_cut_short(message: str, shown: str, line: int) -> None:
    assert f"{shown}: line {line}: the file ends inside this line" in message, message
    assert CUT_SHORT in message, message


ML100K_FILES = {"u.data": U_DATA, "u.item": U_ITEM, "u.genre": U_GENRE}
ML1M_FILES = {"ratings.dat": ML1M_RATINGS, "movies.dat": ML1M_MOVIES}
CSV_FILES = {"ratings.csv": RATINGS_CSV, "movies.csv": MOVIES_CSV}
DATASET_FILES = {"ml-latest-small": CSV_FILES, "ml-100k": ML100K_FILES, "ml-1m": ML1M_FILES}


def small_dataset(root: Path, name: str, changed: dict[str, str | bytes] | None = None) -> Path:
    """The small fixture of ``name`` in its official layout and encoding, ``changed`` replacing
    some of its files."""
    encoding = "utf-8" if name == "ml-latest-small" else "latin-1"
    return write_files(root / name, {**DATASET_FILES[name], **(changed or {})}, encoding)


@pytest.mark.parametrize(
    "path",
    [
        "ml-latest-small/ratings.csv",
        "ml-latest-small/movies.csv",
        "ml-100k/u.data",
        "ml-100k/u.item",
        "ml-100k/u.genre",
    ],
)
def test_official_files_end_with_a_line_break(shared_data: Path, path: str) -> None:
    """What the check relies on: a complete official file never ends inside a line."""
    with open(shared_data / path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        assert f.read(1) == b"\n"


@pytest.mark.parametrize(
    ("name", "fname", "cut"),
    [
        pytest.param("ml-latest-small", "ratings.csv", 1, id="csv-final-line-break"),
        # the last line is 610,170875,3.0,1493846415
        pytest.param("ml-latest-small", "ratings.csv", 5, id="csv-timestamp-to-149384"),
        pytest.param(
            "ml-latest-small", "ratings.csv", len(".0,1493846415\n"), id="csv-rating-to-3"
        ),
        pytest.param(
            "ml-latest-small", "ratings.csv", len(",3.0,1493846415\n"), id="csv-fewer-fields"
        ),
        pytest.param("ml-latest-small", "movies.csv", 5, id="csv-genre-Comedy-to-Com"),
        pytest.param("ml-100k", "u.data", 1, id="100k-final-line-break"),
        # the last line is 12<tab>203<tab>3<tab>879959583
        pytest.param("ml-100k", "u.data", 5, id="100k-timestamp-to-87995"),
        pytest.param("ml-100k", "u.data", len("3\t879959583\n"), id="100k-before-rating"),
        pytest.param("ml-100k", "u.item", 4, id="100k-item-inside-flags"),
        pytest.param("ml-100k", "u.genre", 2, id="100k-genre-final-lines"),
    ],
)
def test_real_file_cut_short(
    shared_data: Path, tmp_path: Path, name: str, fname: str, cut: int
) -> None:
    folder = tmp_path / name
    folder.mkdir()
    for p in (shared_data / name).iterdir():
        shutil.copyfile(p, folder / p.name)  # not copytree: the shared copies are read-only
    data = (folder / fname).read_bytes()
    (folder / fname).write_bytes(data[:-cut])
    message = load_error(name, folder, tmp_path / "cache")
    last_line = data.count(b"\n") - (1 if fname == "u.genre" else 0)  # u.genre ends "\n\n"
    assert_cut_short(message, str(folder / fname), last_line)
    assert parsed_entries(tmp_path / "cache") == []


@pytest.mark.parametrize(
    ("name", "fname", "text", "line"),
    [
        pytest.param(
            "ml-latest-small", "ratings.csv", RATINGS_CSV + "2,1,5.0,149348", 6,
            id="csv-inside-timestamp",
        ),
        pytest.param(
            "ml-latest-small", "ratings.csv", RATINGS_CSV + "1,3,2.", 6, id="csv-inside-rating"
        ),
        pytest.param(
            "ml-latest-small", "ratings.csv", RATINGS_CSV + "1,3", 6, id="csv-fewer-fields"
        ),
        pytest.param(
            "ml-latest-small", "ratings.csv", RATINGS_CSV.rstrip("\n"), 5,
            id="csv-ratings-no-final-line-break",
        ),
        pytest.param(
            "ml-latest-small", "ratings.csv", "userId,movieId,rat", 1, id="csv-inside-header"
        ),
        pytest.param(
            "ml-latest-small", "movies.csv", MOVIES_CSV + "4,Heat (19", 5,
            id="csv-movies-inside-title",
        ),
        pytest.param(
            "ml-latest-small", "movies.csv", MOVIES_CSV + '4,"Heat, Th', 5,
            id="csv-movies-inside-quoted-title",
        ),
        pytest.param(
            "ml-latest-small", "movies.csv", MOVIES_CSV + "4,Heat (1995),Act", 5,
            id="csv-movies-inside-genres",
        ),
        pytest.param(
            "ml-latest-small", "movies.csv", MOVIES_CSV.encode() + "4,Amélie".encode()[:-1], 5,
            id="csv-movies-inside-utf8-character",
        ),
        pytest.param(
            "ml-latest-small", "movies.csv", MOVIES_CSV.rstrip("\n"), 4,
            id="csv-movies-no-final-line-break",
        ),
        pytest.param("ml-100k", "u.data", U_DATA + "196\t1\t3\t88", 4, id="100k-inside-timestamp"),
        pytest.param("ml-100k", "u.data", U_DATA + "196\t1\t", 4, id="100k-before-rating"),
        pytest.param(
            "ml-100k", "u.data", U_DATA.rstrip("\n"), 3, id="100k-data-no-final-line-break"
        ),
        pytest.param(
            "ml-100k", "u.item", U_ITEM + "4|Heat (1995)|01-Jan-1995||url|0|1", 4,
            id="100k-item-inside-flags",
        ),
        pytest.param(
            "ml-100k", "u.item", U_ITEM.rstrip("\n"), 3, id="100k-item-no-final-line-break"
        ),
        pytest.param("ml-100k", "u.genre", "unknown|0\nAction|1\nComedy|2", 3, id="100k-genre"),
        pytest.param(
            "ml-1m", "ratings.dat", ML1M_RATINGS + "2::1::4::97829", 5, id="1m-inside-timestamp"
        ),
        pytest.param(
            "ml-1m", "movies.dat", ML1M_MOVIES + "4::Heat (1995)::Act", 4,
            id="1m-movies-inside-genres",
        ),
    ],
)
def test_file_cut_short(
    tmp_path: Path, name: str, fname: str, text: str | bytes, line: int
) -> None:
    folder = small_dataset(tmp_path, name, {fname: text})
    message = load_error(name, folder, tmp_path / "cache")
    assert_cut_short(message, str(folder / fname), line)
    assert parsed_entries(tmp_path / "cache") == []


def test_final_line_with_fewer_fields_and_a_line_break(tmp_path: Path) -> None:
    """A cut that happens to end on a line break cannot be told from a complete file; the short
    line is still an error naming the file and line."""
    folder = small_dataset(tmp_path, "ml-100k", {"u.data": U_DATA + "2\t1\n"})
    message = load_error("ml-100k", folder, tmp_path / "cache")
    assert f"{folder / 'u.data'}: line 4: expected 4 tab-separated fields" in message


@pytest.mark.parametrize(
    ("name", "fname", "cut_line"),
    [("ml-latest-small", "ratings.csv", 5), ("ml-100k", "u.data", 3)],
)
def test_cached_parse_is_not_reused_for_a_cut_file(
    tmp_path: Path, name: str, fname: str, cut_line: int
) -> None:
    folder = small_dataset(tmp_path, name)
    cache = tmp_path / "cache"
    load_movielens(name, folder, cache_dir=cache)
    assert len(parsed_entries(cache)) == 1
    path = folder / fname
    before = path.stat()
    path.write_bytes(path.read_bytes()[:-3])
    # Same mtime as the good file: the size alone must change the cache key.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    message = load_error(name, folder, cache)
    assert_cut_short(message, str(path), cut_line)
    assert len(parsed_entries(cache)) == 1


@pytest.mark.parametrize(
    ("name", "fname", "text", "line"),
    [
        pytest.param(
            "ml-latest-small", "ratings.csv", RATINGS_CSV + "2,1,5.0,149348", 6, id="csv-ratings"
        ),
        pytest.param(
            "ml-latest-small", "movies.csv", MOVIES_CSV + "4,Heat (19", 5, id="csv-movies"
        ),
        pytest.param("ml-100k", "u.data", U_DATA + "196\t1\t3\t88", 4, id="100k-data"),
        pytest.param("ml-100k", "u.item", U_ITEM[:-10], 3, id="100k-item"),
    ],
)
def test_cut_file_inside_zip_names_the_member(
    tmp_path: Path, name: str, fname: str, text: str, line: int
) -> None:
    """A complete archive of a file that was already cut short when it was zipped."""
    folder = small_dataset(tmp_path / "src", name, {fname: text})
    archive = zip_folder(folder, tmp_path / f"{name}.zip", f"{name}/")
    message = load_error(name, archive, tmp_path / "cache")
    assert_cut_short(message, f"{archive}:{name}/{fname}", line)


def cut_zip_member(archive: Path, member: str) -> None:
    """Halve ``member``'s compressed data as the archive records it (local header and central
    directory sizes), like a member whose data was cut short; the archive itself stays readable."""
    raw = bytearray(archive.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as zf:
        info = zf.getinfo(member)
    half = info.compress_size // 2
    struct.pack_into("<I", raw, info.header_offset + 18, half)  # local header: compressed size
    name = member.encode()
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46 : entry + 46 + len(name)] != name:
        entry = raw.find(b"PK\x01\x02", entry + 1)
    struct.pack_into("<I", raw, entry + 20, half)  # central directory: compressed size
    archive.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("name", "fname"),
    [
        ("ml-latest-small", "ratings.csv"),
        ("ml-latest-small", "movies.csv"),
        ("ml-100k", "u.data"),
        ("ml-100k", "u.item"),
    ],
)
def test_truncated_zip_member(shared_data: Path, tmp_path: Path, name: str, fname: str) -> None:
    archive = zip_folder(shared_data / name, tmp_path / f"{name}.zip", f"{name}/")
    cut_zip_member(archive, f"{name}/{fname}")
    message = load_error(name, archive, tmp_path / "cache")
    assert f"{archive}:{name}/{fname}: not a valid zip archive (truncated or corrupt)" in message
    assert "re-download" in message
    assert parsed_entries(tmp_path / "cache") == []


@pytest.mark.parametrize("name", ["ml-latest-small", "ml-100k"])
def test_zip_archive_cut_short(tmp_path: Path, name: str) -> None:
    folder = small_dataset(tmp_path / "src", name)
    archive = zip_folder(folder, tmp_path / f"{name}.zip", f"{name}/")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) - 30])  # the end of the central directory is gone
    message = load_error(name, archive, tmp_path / "cache")
    assert f"{archive}: not a valid zip archive (truncated or corrupt)" in message
    assert "re-download" in message
