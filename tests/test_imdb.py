"""The IMDb loader: the shared archives, the official layout's three shapes, bad copies, download."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from envs.data.imdb import ARCHIVE_NAME, load_imdb
from envs.data.movielens.errors import DatasetError
from tests.conftest import fedrlhf_cli
from tests.test_movielens_loaders import http_server  # noqa: F401 (fixture)

TREE = {
    "aclImdb/README": b"Large Movie Review Dataset v1.0",
    "aclImdb/train/pos/0_9.txt": b"A fine film.<br />Loved it.",
    "aclImdb/train/pos/1_7.txt": "Très bien.".encode(),
    "aclImdb/train/neg/0_2.txt": b"Dull.",
    "aclImdb/train/unsup/0_0.txt": b"Saw it once.",
    "aclImdb/train/urls_pos.txt": b"http://www.imdb.com/title/tt0000000/usercomments\n",
    "aclImdb/test/pos/0_10.txt": b"Masterpiece.",
    "aclImdb/test/neg/0_1.txt": b"Awful.",
    "aclImdb/test/neg/1_4.txt": b"Meh.",
}
COUNTS = {"train_pos": 2, "train_neg": 1, "test_pos": 1, "test_neg": 2, "unsup": 1}


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tree(root: Path, members: dict[str, bytes]) -> Path:
    for name, data in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_the_shared_archives_hold_the_official_counts(shared_data):
    data = load_imdb(shared_data / "imdb")
    assert data.counts() == {"train_pos": 12500, "train_neg": 12500, "test_pos": 12500, "test_neg": 12500,
                             "unsup": 50000}
    labelled = [r for split in ("train", "test") for r in data.reviews[split]]
    assert all(r.rating >= 7 for r in labelled if r.label == 1) and all(r.rating <= 4 for r in labelled if r.label == 0)
    assert {r.rating for r in data.reviews["unsup"]} == {0}
    assert len({r.text for r in labelled}) == 49582  # the dataset's 418 known duplicate texts
    assert sum("<br />" in r.text for r in labelled) > 20000  # raw text, tags kept


def test_folder_official_archive_and_part_archives_read_alike(tmp_path):
    folder = load_imdb(write_tree(tmp_path / "extracted", TREE))
    inner = load_imdb(tmp_path / "extracted" / "aclImdb")
    (tmp_path / ARCHIVE_NAME).write_bytes(tar_bytes(TREE))
    official = load_imdb(tmp_path / ARCHIVE_NAME)
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "aclImdb_train.tar.gz").write_bytes(tar_bytes({k: v for k, v in TREE.items() if "/test/" not in k}))
    (parts / "aclImdb_test.tar.gz").write_bytes(tar_bytes({k: v for k, v in TREE.items() if "/test/" in k}))
    split = load_imdb(parts)
    for data in (folder, inner, official, split):
        assert data.counts() == COUNTS
        assert data.reviews == folder.reviews
    first = folder.reviews["train"][0]
    assert (first.label, first.review_id, first.rating, first.text) == (1, 0, 9, "A fine film.<br />Loved it.")
    assert folder.reviews["train"][1].text == "Très bien."


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aclImdb/train/pos/2_3.txt": b"x"}, "rating 3 is off the pos range 7–10"),
        ({"aclImdb/test/unsup/0_0.txt": b"x"}, "unlabelled reviews belong under aclImdb/train/unsup"),
        ({"aclImdb/train/neg/5_1.txt": b"caf\xe9"}, "not UTF-8 text (byte offset 3)"),
    ],
)
def test_a_bad_review_is_one_line_naming_it(tmp_path, change, message):
    (tmp_path / "a.tar.gz").write_bytes(tar_bytes({**TREE, **change}))
    with pytest.raises(DatasetError) as err:
        load_imdb(tmp_path / "a.tar.gz")
    text = str(err.value)
    assert message in text and next(iter(change)) in text and "\n" not in text


def test_damaged_incomplete_and_doubled_copies_are_one_line(tmp_path):
    whole = tar_bytes(TREE)
    (tmp_path / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    for name in ("cut.tar.gz", "junk.tar.gz"):
        with pytest.raises(DatasetError, match=f"{name}: not a readable tar archive .* copy or download it again"):
            load_imdb(tmp_path / name)
    (tmp_path / "no_test_neg.tar.gz").write_bytes(tar_bytes({k: v for k, v in TREE.items() if "test/neg" not in k}))
    with pytest.raises(DatasetError, match="no aclImdb/test/neg/ reviews — the copy is incomplete"):
        load_imdb(tmp_path / "no_test_neg.tar.gz")
    twice = tmp_path / "twice"
    twice.mkdir()
    (twice / "a.tar.gz").write_bytes(whole)
    (twice / "b.tar.gz").write_bytes(tar_bytes({"aclImdb/train/pos/0_8.txt": b"again"}))
    with pytest.raises(DatasetError, match="review train/pos/0 is given twice"):
        load_imdb(twice)
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_imdb(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds neither an aclImdb/ tree"):
        load_imdb(tmp_path / "empty")


def test_download_is_checked_and_cached_and_never_implicit(http_server, tmp_path):  # noqa: F811
    body = tar_bytes(TREE)
    http_server.files["/aclImdb_v1.tar.gz"] = body
    url = http_server.url + "/aclImdb_v1.tar.gz"
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="not found in the cache"):
        load_imdb(cache_dir=cache, url=url)
    assert http_server.requests == []
    with pytest.raises(DatasetError, match="sha256 checksum mismatch"):
        load_imdb(cache_dir=cache, download=True, url=url, expected="0" * 64)
    assert list((cache / "imdb").iterdir()) == []  # nothing half-written
    data = load_imdb(cache_dir=cache, download=True, url=url, expected=hashlib.sha256(body).hexdigest())
    assert data.counts() == COUNTS and (cache / "imdb" / ARCHIVE_NAME).read_bytes() == body
    assert load_imdb(cache_dir=cache, url=url).counts() == COUNTS  # from the cache, no request
    assert http_server.requests == ["/aclImdb_v1.tar.gz", "/aclImdb_v1.tar.gz"]


def test_cli_data_info_prints_the_counts_and_fails_in_one_line(tmp_path):
    (tmp_path / ARCHIVE_NAME).write_bytes(tar_bytes(TREE))
    ok = fedrlhf_cli("data", "info", "--dataset", "imdb", "--path", str(tmp_path / ARCHIVE_NAME), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "train / pos" in ok.stdout and "unsup" in ok.stdout
    (tmp_path / "cut.tar.gz").write_bytes(tar_bytes(TREE)[:40])
    bad = fedrlhf_cli("data", "info", "--dataset", "imdb", "--path", str(tmp_path / "cut.tar.gz"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("fedrlhf: error: ") and "cut.tar.gz" in bad.stderr


def test_a_parse_of_archives_is_cached_and_a_changed_archive_is_parsed_again(shared_data, tmp_path):
    import shutil

    from envs.data.imdb import load_imdb

    copy = tmp_path / "imdb"
    shutil.copytree(shared_data / "imdb", copy)
    first = load_imdb(copy, cache_dir=tmp_path / "cache")
    entries = list((tmp_path / "cache" / "parsed").iterdir())
    assert len(entries) == 1 and (entries[0] / "reviews.parquet").is_file()
    again = load_imdb(copy, cache_dir=tmp_path / "cache")
    assert again.reviews == first.reviews and again.counts() == first.counts()
    # A damaged archive has another size: it is parsed (and refused) again, not answered from the cache.
    archive = copy / "aclImdb_test.tar.gz"
    archive.write_bytes(archive.read_bytes()[:100_000])
    with pytest.raises(DatasetError, match="aclImdb_test.tar.gz"):
        load_imdb(copy, cache_dir=tmp_path / "cache")
