"""Tests for ccclip_widgets.posts: reading, validating and reporting posts tables."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from ccclip_widgets.posts import (
    REJECT_REASONS,
    TABLE_COLUMNS,
    DuplicatePostIdError,
    Posts,
    PostsSchemaError,
    posts_from_records,
    read_posts,
)

HEADER = "post_id,image,text\n"


def _jpeg_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A data folder with images/a.jpg, images/b.jpg, images/c.png."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg_bytes((255, 0, 0)))
    (tmp_path / "images" / "b.jpg").write_bytes(_jpeg_bytes((0, 255, 0)))
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(tmp_path / "images" / "c.png")
    return tmp_path


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def _check_invariant(posts: Posts, n_input: int) -> None:
    """Every input row is either valid or rejected, never both, never lost."""
    rejected = set(posts.rejects["row"].to_list())
    valid = set(posts.table["row"].to_list())
    assert not (rejected & valid)
    assert len(posts.table) + len(rejected) == n_input
    assert valid | rejected == set(range(n_input))
    assert set(posts.rejects["reason"].to_list()) <= set(REJECT_REASONS)


def _reasons(posts: Posts) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for row, reason in posts.rejects.select("row", "reason").iter_rows():
        out.setdefault(row, set()).add(reason)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sources


def test_csv_basic_schema(root: Path) -> None:
    csv_path = _write(
        root / "posts.csv",
        "post_id,image,text,caption_kind,likes,lang,author\n"
        "007,images/a.jpg,A red square,descriptive,3,en,ann\n"
        '8,images/b.jpg,"So green, wow",commentative,5,fr,bob\n',
    )
    posts = read_posts(csv_path)
    table = posts.table
    assert table.columns == [*TABLE_COLUMNS, "lang", "caption_kind", "likes", "author"]
    assert table.schema["post_id"] == pl.String
    assert table.schema["image_bytes"] == pl.Binary
    assert table.schema["row"] == pl.Int64
    assert table.schema["likes"] == pl.Int64  # metadata typed per whole column
    assert table["post_id"].to_list() == ["007", "8"]  # leading zeros kept
    assert table["row"].to_list() == [0, 1]
    assert table["image"].to_list() == ["images/a.jpg", "images/b.jpg"]
    assert table["image_path"].to_list() == [str((root / "images" / n).resolve()) for n in ("a.jpg", "b.jpg")]
    assert table["image_bytes"].null_count() == 2
    assert table["text"].to_list() == ["A red square", "So green, wow"]
    assert all(len(k) == 32 for k in table["image_key"].to_list() + table["text_key"].to_list())
    assert table["image_key"].n_unique() == 2
    assert posts.image_root == root.resolve()
    assert posts.source == str(csv_path)
    assert posts.rejects.height == 0
    assert posts.rejects.schema == {
        "post_id": pl.String,
        "row": pl.Int64,
        "column": pl.String,
        "reason": pl.String,
        "detail": pl.String,
    }


def test_text_key_depends_only_on_text(root: Path) -> None:
    posts = posts_from_records(
        [
            {"post_id": "1", "image": "images/a.jpg", "text": "same"},
            {"post_id": "2", "image": "images/b.jpg", "text": "same"},
            {"post_id": "3", "image": "images/a.jpg", "text": "other"},
        ],
        image_root=root,
    )
    keys = posts.table["text_key"].to_list()
    assert keys[0] == keys[1] != keys[2]
    image_keys = posts.table["image_key"].to_list()
    assert image_keys[0] == image_keys[2] != image_keys[1]


def test_image_key_changes_when_file_changes(root: Path) -> None:
    records = [{"post_id": "1", "image": "images/a.jpg", "text": "t"}]
    before = posts_from_records(records, image_root=root).table["image_key"][0]
    path = root / "images" / "a.jpg"
    path.write_bytes(_jpeg_bytes((1, 2, 3), size=(20, 20)))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    after = posts_from_records(records, image_root=root).table["image_key"][0]
    assert before != after


@pytest.fixture
def frame(root: Path) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "post_id": ["p1", "p2", "p3"],
            "image": ["images/a.jpg", "images/b.jpg", "images/c.png"],
            "text": ["one", "two", "three"],
            "score": [0.5, 1.5, 2.5],
        }
    )


def _core(posts: Posts) -> list[tuple]:
    return posts.table.select("post_id", "image", "image_path", "text", "image_key", "text_key", "row").rows()


def test_all_sources_agree(root: Path, frame: pl.DataFrame) -> None:
    pytest.importorskip("pandas")
    from_frame = read_posts(frame, root)
    frame.write_parquet(root / "posts.parquet")
    frame.write_csv(root / "posts.csv")
    frame.write_csv(root / "posts.tsv", separator="\t")
    frame.write_ndjson(root / "posts.jsonl")
    (root / "posts.json").write_text(json.dumps(frame.to_dicts()))
    sources = [
        root / "posts.parquet",
        root / "posts.csv",
        root / "posts.tsv",
        root / "posts.jsonl",
        root / "posts.json",
        str(root / "posts.csv"),
        frame.lazy(),
        frame.to_pandas(),
        frame.to_dicts(),
    ]
    for source in sources:
        image_root = None if isinstance(source, (str, Path)) else root
        posts = read_posts(source, image_root)
        assert _core(posts) == _core(from_frame), source
        assert posts.table["score"].to_list() == [0.5, 1.5, 2.5], source
        assert posts.table.columns == [*TABLE_COLUMNS, "score"]


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown file type"):
        read_posts(_write(tmp_path / "posts.xlsx", "x"))
    with pytest.raises(FileNotFoundError):
        read_posts(tmp_path / "nope.csv")
    with pytest.raises(TypeError):
        read_posts(42)  # type: ignore[arg-type]


def test_missing_required_columns(root: Path) -> None:
    with pytest.raises(PostsSchemaError) as err:
        read_posts(_write(root / "posts.csv", "id,image,caption\n1,images/a.jpg,hi\n"))
    message = str(err.value)
    assert "'post_id'" in message and "'text'" in message  # expected
    assert "['id', 'image', 'caption']" in message  # present
    assert isinstance(err.value, ValueError)


def test_column_mapping(root: Path) -> None:
    csv_path = _write(root / "posts.csv", "id,picture,caption,extra\n1,images/a.jpg,hi,x\n")
    posts = read_posts(csv_path, id_column="id", image_column="picture", text_column="caption")
    assert posts.table.columns == [*TABLE_COLUMNS, "extra"]
    assert posts.table.row(0, named=True)["text"] == "hi"


def test_column_mapping_conflict(root: Path) -> None:
    with pytest.raises(PostsSchemaError, match="'text' exists"):
        read_posts(
            _write(root / "posts.csv", "post_id,image,text,caption\n1,images/a.jpg,a,b\n"),
            text_column="caption",
        )


def test_header_only_csv_gives_empty_table(root: Path) -> None:
    posts = read_posts(_write(root / "posts.csv", "post_id,image,text,likes\n"))
    assert len(posts) == 0
    assert posts.table.columns[: len(TABLE_COLUMNS)] == list(TABLE_COLUMNS)
    assert posts.n_rejected == 0


def test_empty_csv_file(root: Path) -> None:
    with pytest.raises(PostsSchemaError, match="empty"):
        read_posts(_write(root / "posts.csv", ""))


def test_pandas_ids_and_missing_values(root: Path) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {
            "post_id": [12, float("nan"), 14],  # ints with a gap become floats in pandas
            "image": ["images/a.jpg", "images/b.jpg", None],
            "text": ["a", "b", "c"],
        }
    )
    posts = read_posts(df, root)
    assert posts.table["post_id"].to_list() == ["12"]
    assert _reasons(posts) == {1: {"missing_post_id"}, 2: {"missing_image"}}
    _check_invariant(posts, 3)


def test_bom_and_crlf(root: Path) -> None:
    csv_path = _write(root / "posts.csv", b"\xef\xbb\xbfpost_id,image,text\r\n1,images/a.jpg,hi\r\n")
    posts = read_posts(csv_path)
    assert posts.table.select("post_id", "text").rows() == [("1", "hi")]


# ----------------------------------------------------------------------------------------------------------------
# Text problems


def test_invalid_utf8_row_in_the_middle(root: Path) -> None:
    lines = [HEADER.encode()]
    for i in range(5):
        text = b"caf\xe9 au lait" if i == 2 else f"post {i}".encode()
        lines.append(f"id{i},images/a.jpg,".encode() + text + b"\n")
    data = b"".join(lines)
    posts = read_posts(_write(root / "posts.csv", data))
    assert posts.table["post_id"].to_list() == ["id0", "id1", "id3", "id4"]
    assert posts.table["row"].to_list() == [0, 1, 3, 4]
    rejects = posts.rejects.row(0, named=True)
    assert rejects["row"] == 2
    assert rejects["reason"] == "undecodable_text"
    assert rejects["post_id"] == "id2"
    assert rejects["column"] == "text"
    offset = data.index(b"\xe9")
    assert f"byte offset {offset}" in rejects["detail"]
    assert "line 4" in rejects["detail"]
    _check_invariant(posts, 5)


def test_real_replacement_character_is_kept(root: Path) -> None:
    posts = read_posts(_write(root / "posts.csv", HEADER + "1,images/a.jpg,broken \ufffd glyph\n"))
    assert posts.table["text"].to_list() == ["broken \ufffd glyph"]


def test_other_encoding(root: Path) -> None:
    data = (HEADER + "1,images/a.jpg,café\n").encode("latin-1")
    posts = read_posts(_write(root / "posts.csv", data), encoding="latin-1")
    assert posts.table["text"].to_list() == ["café"]


def test_undecodable_header(root: Path) -> None:
    with pytest.raises(PostsSchemaError, match="header"):
        read_posts(_write(root / "posts.csv", b"post_id,image,t\xffext\n1,images/a.jpg,x\n"))


def test_blank_and_null_text(root: Path) -> None:
    posts = read_posts(
        _write(root / "posts.csv", HEADER + '1,images/a.jpg,ok\n2,images/a.jpg,\n3,images/a.jpg,"   "\n')
    )
    assert posts.table["post_id"].to_list() == ["1"]
    assert _reasons(posts) == {1: {"empty_text"}, 2: {"empty_text"}}
    _check_invariant(posts, 3)


def test_multiline_quoted_text(root: Path) -> None:
    posts = read_posts(
        _write(root / "posts.csv", HEADER + '1,images/a.jpg,"line one\nline two"\n2,images/b.jpg,x\n')
    )
    assert posts.table["text"].to_list() == ["line one\nline two", "x"]
    assert posts.table["row"].to_list() == [0, 1]


def test_malformed_csv_row(root: Path) -> None:
    posts = read_posts(
        _write(root / "posts.csv", HEADER + "1,images/a.jpg,ok\n2,images/a.jpg,too,many\n3,x\n")
    )
    assert posts.table["post_id"].to_list() == ["1"]
    assert _reasons(posts) == {1: {"malformed_row"}, 2: {"malformed_row"}}
    assert "expected 3 fields, found 4" in posts.rejects["detail"][0]
    _check_invariant(posts, 3)


def test_jsonl_bad_lines(root: Path) -> None:
    data = (
        b'{"post_id": 1, "image": "images/a.jpg", "text": "ok", "tags": ["x"]}\n'
        b"\n"
        b"{not json\n"
        b'{"post_id": 3, "image": "images/a.jpg", "text": "caf\xe9"}\n'
        b"[1, 2]\n"
        b'{"post_id": 5, "image": "images/b.jpg", "text": "fine"}\n'
    )
    posts = read_posts(_write(root / "posts.jsonl", data))
    assert posts.table["post_id"].to_list() == ["1", "5"]  # ints cast to strings
    assert posts.table["row"].to_list() == [0, 4]  # blank lines do not count as rows
    assert posts.table["tags"].to_list() == [["x"], None]
    assert _reasons(posts) == {1: {"malformed_row"}, 2: {"undecodable_text"}, 3: {"malformed_row"}}
    undecodable = posts.rejects.filter(pl.col("reason") == "undecodable_text").row(0, named=True)
    assert undecodable["post_id"] == "3"
    assert f"byte offset {data.index(bytes([0xE9]))}" in undecodable["detail"]
    _check_invariant(posts, 5)


def test_binary_text_column(root: Path) -> None:
    frame = pl.DataFrame(
        {"post_id": ["1", "2"], "image": ["images/a.jpg"] * 2, "text": [b"ok", b"caf\xe9"]},
        schema={"post_id": pl.String, "image": pl.String, "text": pl.Binary},
    )
    posts = read_posts(frame, root)
    assert posts.table["text"].to_list() == ["ok"]
    assert _reasons(posts) == {1: {"undecodable_text"}}


# ----------------------------------------------------------------------------------------------------------------
# Ids


def test_duplicate_ids_rejected_after_first(root: Path) -> None:
    body = "a,images/a.jpg,first\nb,images/a.jpg,x\na,images/b.jpg,second\na,images/b.jpg,third\n"
    posts = read_posts(_write(root / "posts.csv", HEADER + body))
    assert posts.table.select("post_id", "text").rows() == [("a", "first"), ("b", "x")]
    dupes = posts.rejects.filter(pl.col("reason") == "duplicate_post_id")
    assert dupes["row"].to_list() == [2, 3]
    assert all("row 0" in d for d in dupes["detail"].to_list())
    _check_invariant(posts, 4)
    keep_first = read_posts(root / "posts.csv", on_duplicate="keep_first")
    assert keep_first.table.equals(posts.table)
    with pytest.raises(DuplicatePostIdError, match="'a'"):
        read_posts(root / "posts.csv", on_duplicate="error")


def test_missing_and_blank_ids(root: Path) -> None:
    posts = posts_from_records(
        [
            {"post_id": None, "image": "images/a.jpg", "text": "x"},
            {"post_id": "  ", "image": "images/a.jpg", "text": "x"},
            {"post_id": 0, "image": "images/a.jpg", "text": "x"},
        ],
        image_root=root,
    )
    assert posts.table["post_id"].to_list() == ["0"]
    assert _reasons(posts) == {0: {"missing_post_id"}, 1: {"missing_post_id"}}


def test_bad_arguments(root: Path, frame: pl.DataFrame) -> None:
    with pytest.raises(ValueError, match="check_images"):
        read_posts(frame, root, check_images="deep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_duplicate"):
        read_posts(frame, root, on_duplicate="merge")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="image_root"):
        read_posts(frame, root / "nowhere")


# ----------------------------------------------------------------------------------------------------------------
# Images


def test_missing_image_file(root: Path) -> None:
    posts = read_posts(_write(root / "posts.csv", HEADER + "1,images/a.jpg,x\n2,images/zzz.jpg,y\n3,,z\n"))
    assert posts.table["post_id"].to_list() == ["1"]
    assert _reasons(posts) == {1: {"missing_image"}, 2: {"missing_image"}}
    assert "zzz.jpg" in posts.rejects["detail"][0]


def test_directory_is_not_an_image(root: Path) -> None:
    posts = read_posts(_write(root / "posts.csv", HEADER + "1,images,x\n"))
    assert _reasons(posts) == {0: {"missing_image"}}


def test_dotdot_escape(root: Path) -> None:
    data = root / "data"
    data.mkdir()
    outside = root / "secret.jpg"
    outside.write_bytes(_jpeg_bytes())
    (data / "in.jpg").write_bytes(_jpeg_bytes())
    posts = read_posts(
        _write(
            data / "posts.csv",
            HEADER + "1,in.jpg,ok\n2,../secret.jpg,x\n3,sub/../../secret.jpg,y\n4,./in.jpg,z\n",
        )
    )
    assert posts.table["post_id"].to_list() == ["1", "4"]
    assert _reasons(posts) == {1: {"outside_image_root"}, 2: {"outside_image_root"}}
    assert "'..'" in posts.rejects["detail"][0]
    allowed = read_posts(data / "posts.csv", allow_outside_root=True)
    assert allowed.table["post_id"].to_list() == ["1", "2", "3", "4"]
    assert allowed.table["image_path"][1] == str(outside.resolve())


def test_absolute_paths(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "x.jpg"
    elsewhere.write_bytes(_jpeg_bytes())
    inside = root / "images" / "a.jpg"
    csv_path = _write(root / "posts.csv", HEADER + f"1,{inside},ok\n2,{elsewhere},no\n")
    posts = read_posts(csv_path)
    assert posts.table["post_id"].to_list() == ["1"]
    assert posts.table["image"].to_list() == [str(inside)]
    assert _reasons(posts) == {1: {"outside_image_root"}}
    assert "absolute path" in posts.rejects["detail"][0]
    # Frames without image_root accept absolute paths anywhere.
    records = [{"post_id": "1", "image": str(elsewhere), "text": "t"}]
    assert len(posts_from_records(records)) == 1
    assert posts_from_records(records, image_root=root).rejects["reason"].to_list() == ["outside_image_root"]


def test_relative_paths_without_root_use_cwd(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    posts = posts_from_records([{"post_id": "1", "image": "images/a.jpg", "text": "t"}])
    assert posts.image_root is None
    assert posts.table["image_path"].to_list() == [str((root / "images" / "a.jpg").resolve())]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinks(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside_dir = tmp_path_factory.mktemp("outside")
    (outside_dir / "o.jpg").write_bytes(_jpeg_bytes())
    try:
        (root / "images" / "link_out.jpg").symlink_to(outside_dir / "o.jpg")
    except OSError:
        pytest.skip("cannot create symlinks here")
    (root / "images" / "link_in.jpg").symlink_to(root / "images" / "a.jpg")
    (root / "dirlink").symlink_to(outside_dir, target_is_directory=True)
    body = (
        "1,images/link_in.jpg,ok\n2,images/link_out.jpg,out\n3,dirlink/o.jpg,out\n4,images/dangling.jpg,x\n"
    )
    (root / "images" / "dangling.jpg").symlink_to(root / "images" / "gone.jpg")
    posts = read_posts(_write(root / "posts.csv", HEADER + body))
    assert posts.table["post_id"].to_list() == ["1"]
    assert posts.table["image_path"][0] == str((root / "images" / "a.jpg").resolve())
    assert _reasons(posts) == {1: {"outside_image_root"}, 2: {"outside_image_root"}, 3: {"missing_image"}}
    assert "symlink" in posts.rejects["detail"][0]
    assert len(read_posts(root / "posts.csv", allow_outside_root=True)) == 3


def test_urls_offline_and_other_schemes(root: Path) -> None:
    """http(s) URLs are downloaded (tests/test_fetch_posts.py); offline they are rejected with a reason, and
    other schemes are refused; file:// URLs are local paths."""
    url = (root / "images" / "a.jpg").resolve().as_uri()
    posts = posts_from_records(
        [
            {"post_id": "1", "image": "https://images.example.invalid/x.jpg", "text": "t"},
            {"post_id": "2", "image": "http://images.example.invalid/y.jpg", "text": "t"},
            {"post_id": "3", "image": url, "text": "file URLs are local paths"},
            {"post_id": "4", "image": "ftp://images.example.invalid/z.jpg", "text": "t"},
            {"post_id": "5", "image": "data:image/png;base64,iVBORw0KGgo=", "text": "t"},
        ],
        image_root=root,
        network=False,
    )
    _check_invariant(posts, 5)
    assert posts.table["post_id"].to_list() == ["3"]
    assert _reasons(posts) == {
        0: {"network_disabled"},
        1: {"network_disabled"},
        3: {"unsupported_url_scheme"},
        4: {"unsupported_url_scheme"},
    }
    details = posts.rejects["detail"].to_list()
    assert "https://images.example.invalid/x.jpg" in details[0] and "network" in details[0]
    assert "ftp://" in details[2] and "data: URL" in details[3]


def test_bytes_images(root: Path) -> None:
    good = _jpeg_bytes()
    frame = pl.DataFrame(
        {
            "post_id": ["1", "2", "3", "4"],
            "image": [good, b"", b"garbage bytes", None],
            "text": ["a", "b", "c", "d"],
        },
        schema={"post_id": pl.String, "image": pl.Binary, "text": pl.String},
    )
    posts = read_posts(frame)
    assert posts.table["image"].to_list() == [f"<bytes:{len(good)}>"]
    assert posts.table["image_bytes"].to_list() == [good]
    assert posts.table["image_path"].to_list() == [None]
    assert _reasons(posts) == {1: {"empty_image"}, 2: {"unsupported_image"}, 3: {"missing_image"}}
    same = posts_from_records([{"post_id": "9", "image": bytearray(good), "text": "z"}])
    assert same.table["image_key"][0] == posts.table["image_key"][0]  # keyed by content


def test_mixed_paths_and_bytes_in_records(root: Path) -> None:
    posts = posts_from_records(
        [
            {"post_id": "1", "image": "images/a.jpg", "text": "path"},
            {"post_id": "2", "image": _jpeg_bytes(), "text": "bytes"},
            {"post_id": "3", "image": Path("images/b.jpg"), "text": "pathlib"},
            {"post_id": "4", "image": 12345, "text": "number"},
        ],
        image_root=root,
    )
    assert posts.table["post_id"].to_list() == ["1", "2", "3"]
    assert _reasons(posts) == {3: {"bad_image_reference"}}


def test_image_checks(root: Path) -> None:
    images = root / "images"
    (images / "text.jpg").write_text("not an image")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 30)
    full = _jpeg_bytes(size=(200, 200))
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (images / "zero.jpg").write_bytes(b"")
    Image.new("1", (3000, 3000)).save(images / "bomb.png")
    body = (
        "1,images/a.jpg,ok\n2,images/text.jpg,x\n3,images/broken.jpg,x\n"
        "4,images/truncated.jpg,x\n5,images/zero.jpg,x\n6,images/bomb.png,x\n"
    )
    csv_path = _write(root / "posts.csv", HEADER + body)
    header = read_posts(csv_path, max_pixels=1_000_000)
    assert header.table["post_id"].to_list() == ["1", "4"]  # truncation is invisible in the header
    assert _reasons(header) == {
        1: {"unsupported_image"},
        2: {"corrupt_image"},
        4: {"empty_image"},
        5: {"too_large_image"},
    }
    full_check = read_posts(csv_path, check_images="full", max_pixels=1_000_000)
    assert full_check.table["post_id"].to_list() == ["1"]
    assert _reasons(full_check)[3] == {"truncated_image"}
    none = read_posts(csv_path, check_images="none")
    assert none.table["post_id"].to_list() == ["1", "2", "3", "4", "6"]  # existence only
    assert _reasons(none) == {4: {"empty_image"}}  # zero bytes is known without opening the file
    for posts in (header, full_check, none):
        _check_invariant(posts, 6)


def test_thread_pool_keeps_order(root: Path) -> None:
    records = [
        {"post_id": str(i), "image": "images/a.jpg" if i % 7 else "images/missing.jpg", "text": f"t{i}"}
        for i in range(500)
    ]
    parallel = posts_from_records(records, image_root=root, n_workers=8)
    serial = posts_from_records(records, image_root=root, n_workers=1)
    assert parallel.table.equals(serial.table)
    assert parallel.rejects.equals(serial.rejects)
    assert parallel.table["row"].to_list() == [i for i in range(500) if i % 7]
    _check_invariant(parallel, 500)


# ----------------------------------------------------------------------------------------------------------------
# Known and metadata columns


def test_caption_kind_validation(root: Path) -> None:
    body = (
        "1,images/a.jpg,x,descriptive\n2,images/a.jpg,x,commentative\n3,images/a.jpg,x,Descriptive\n"
        "4,images/a.jpg,x,\n5,images/a.jpg,x,sarcastic\n"
    )
    posts = read_posts(_write(root / "posts.csv", "post_id,image,text,caption_kind\n" + body))
    assert posts.table.select("post_id", "caption_kind").rows() == [
        ("1", "descriptive"),
        ("2", "commentative"),
        ("4", None),
    ]
    assert _reasons(posts) == {2: {"bad_caption_kind"}, 4: {"bad_caption_kind"}}
    assert "'sarcastic'" in posts.rejects["detail"][1]


def test_metadata_preserved_in_order(root: Path) -> None:
    frame = pl.DataFrame(
        {
            "zeta": [1, 2],
            "post_id": ["1", "2"],
            "timestamp": ["2024-01-02T03:04:05", "2024-02-03T04:05:06"],
            "image": ["images/a.jpg", "images/b.jpg"],
            "split": ["train", "test"],
            "text": ["a", "b"],
            "alpha": [{"k": 1}, {"k": 2}],
            "lang": ["en", "de"],
        }
    )
    posts = read_posts(frame, root)
    assert posts.table.columns == [*TABLE_COLUMNS, "lang", "split", "timestamp", "zeta", "alpha"]
    assert posts.table.schema["timestamp"] == pl.Datetime
    assert posts.table["alpha"].to_list() == [{"k": 1}, {"k": 2}]
    assert posts.table["zeta"].to_list() == [1, 2]


def test_csv_metadata_types(root: Path) -> None:
    body = "1,images/a.jpg,x,3,0.5,true,hello,2024-05-01\n2,images/b.jpg,y,,1.5,False,007,2024-05-02\n"
    posts = read_posts(_write(root / "posts.csv", "post_id,image,text,n,f,flag,s,timestamp\n" + body))
    schema = posts.table.schema
    assert (schema["n"], schema["f"], schema["flag"], schema["s"]) == (
        pl.Int64,
        pl.Float64,
        pl.Boolean,
        pl.String,
    )
    assert posts.table["n"].to_list() == [3, None]
    assert posts.table["s"].to_list() == ["hello", "007"]
    assert schema["timestamp"] in (pl.Datetime, pl.Date)


def test_derived_columns_recomputed_on_round_trip(root: Path) -> None:
    first = posts_from_records(
        [
            {"post_id": "1", "image": "images/a.jpg", "text": "a", "likes": 1},
            {"post_id": "2", "image": _jpeg_bytes(), "text": "b", "likes": 2},
        ],
        image_root=root,
    )
    again = read_posts(first.table.filter(pl.col("post_id") == "2").vstack(first.table.head(1)), root)
    assert again.table["post_id"].to_list() == ["2", "1"]
    assert again.table["row"].to_list() == [0, 1]
    assert again.table["image_bytes"][0] == first.table["image_bytes"][1]
    assert again.table["image_key"].to_list() == first.table["image_key"].to_list()[::-1]
    assert again.table.columns == first.table.columns


def test_reserved_column_names(root: Path) -> None:
    with pytest.raises(PostsSchemaError, match="'row'"):
        read_posts(_write(root / "posts.csv", "post_id,image,text,row\n1,images/a.jpg,x,5\n"))


# ----------------------------------------------------------------------------------------------------------------
# The Posts object and reporting


@pytest.fixture
def messy(root: Path) -> Posts:
    body = (
        "1,images/a.jpg,fine\n"
        "1,images/b.jpg,duplicate\n"
        "2,images/missing.jpg,\n"  # two reasons: missing image and empty text
        ",images/a.jpg,no id\n"
        "3,../escape.jpg,escape\n"
        "4,images/c.png,also fine\n"
    )
    return read_posts(_write(root / "posts.csv", HEADER + body))


def test_messy_invariant_and_reasons(messy: Posts) -> None:
    _check_invariant(messy, 6)
    assert messy.table["post_id"].to_list() == ["1", "4"]
    assert _reasons(messy) == {
        1: {"duplicate_post_id"},
        2: {"missing_image", "empty_text"},
        3: {"missing_post_id"},
        4: {"outside_image_root"},
    }
    assert len(messy) == 2
    assert messy.n_rejected == 4
    assert messy.reject_counts()["missing_image"] == 1
    assert messy.rejects["row"].to_list() == sorted(messy.rejects["row"].to_list())


def test_warning_logged(root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ccclip_widgets.posts"):
        read_posts(_write(root / "posts.csv", HEADER + "1,images/a.jpg,\n2,images/a.jpg,ok\n"))
    assert any("rejected 1 of 2 rows" in r.message and "empty_text: 1" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ccclip_widgets.posts"):
        read_posts(root / "posts.csv", on_duplicate="reject").filter(pl.col("post_id") == "2")
        read_posts(_write(root / "clean.csv", HEADER + "1,images/a.jpg,ok\n"))
    assert len(caplog.records) == 1


def test_summary_repr_filter_head(messy: Posts) -> None:
    text = messy.summary()
    assert "valid rows:    2" in text and "rejected rows: 4" in text
    assert "missing_image" in text and "outside_image_root" in text
    assert repr(messy).startswith("Posts(2 valid, 4 rejected")
    only_four = messy.filter(pl.col("post_id") == "4")
    assert isinstance(only_four, Posts) and len(only_four) == 1
    assert only_four.rejects.equals(messy.rejects)
    assert len(messy.head(1)) == 1 and messy.head(1).table["post_id"][0] == "1"
    assert messy.image_root is not None


def test_write_rejects(messy: Posts, tmp_path: Path) -> None:
    target = tmp_path / "reports" / "rejects.csv"
    assert messy.write_rejects(target) == target
    with target.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["reason"] for r in rows] == messy.rejects["reason"].to_list()
    assert list(rows[0]) == ["post_id", "row", "column", "reason", "detail"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["rejects.csv"]  # no temp file left
    messy.head(0).write_rejects(target)  # overwriting works
    assert pl.read_csv(target).height == messy.rejects.height


def test_posts_without_rejects_round_trip(root: Path) -> None:
    posts = Posts(table=pl.DataFrame({"post_id": ["x"]}))
    assert posts.n_rejected == 0 and posts.reject_counts() == {}
    assert "rejected rows: 0" in posts.summary()


# ---------------------------------------------------------------------------------------------- hints, bombs
def test_all_absolute_paths_name_the_image_root_that_admits_them(tmp_path):
    from ccclip_testkit import make_shape_posts

    from ccclip_widgets.errors import NoUsablePostsError

    recs = []
    for sub, rows in (("a", slice(0, 3)), ("b", slice(3, 5))):
        for r in make_shape_posts(tmp_path / "pics" / sub)[rows]:
            recs.append(dict(r, image=str((tmp_path / "pics" / sub / r["image"]).resolve())))
    table = tmp_path / "tables" / "posts.csv"
    table.parent.mkdir()
    pl.DataFrame(recs).select("post_id", "image", "text").write_csv(table)
    posts = read_posts(table)
    assert len(posts) == 0 and posts.reject_counts() == {"outside_image_root": 5}
    parent = str((tmp_path / "pics").resolve())
    assert len(posts.hints) == 1 and f"--image-root {parent}" in posts.hints[0]
    assert "hint:" in posts.summary()
    with pytest.raises(NoUsablePostsError, match="--image-root") as info:
        posts.require_usable()
    assert info.value.reject_counts == {"outside_image_root": 5}
    # and that root does admit them
    assert len(read_posts(table, image_root=parent)) == 5


def test_no_hint_when_some_paths_are_fine(tmp_path):
    from ccclip_testkit import make_shape_posts

    recs = make_shape_posts(tmp_path / "imgs")[:3]
    recs[0]["image"] = "/etc/hostname"
    table = tmp_path / "imgs" / "posts.csv"
    pl.DataFrame(recs).select("post_id", "image", "text").write_csv(table)
    posts = read_posts(table)
    assert len(posts) == 2 and posts.hints == ()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (no real pixel data: headers are all PIL reads)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_a_reject_not_a_printed_warning(tmp_path, recwarn):
    from PIL import Image

    assert 10_000 * 10_000 > Image.MAX_IMAGE_PIXELS  # PIL would warn on this size
    (tmp_path / "bomb.png").write_bytes(_png_header(10_000, 10_000))
    table = tmp_path / "posts.csv"
    pl.DataFrame({"post_id": ["b"], "image": ["bomb.png"], "text": ["big"]}).write_csv(table)
    posts = read_posts(table, check_images="header")
    assert posts.reject_counts() == {"too_large_image": 1}
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.warns() as caught:  # and load_image raises the toolkit's error, quietly
        import warnings

        warnings.warn("sentinel", UserWarning, stacklevel=1)
        from ccclip_widgets.images import ImageDecodeError, load_image

        with pytest.raises(ImageDecodeError, match="max_pixels"):
            load_image(tmp_path / "bomb.png")
    assert [str(w.message) for w in caught] == ["sentinel"]
