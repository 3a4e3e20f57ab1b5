"""Tests of the offline demo data builder on a tiny synthetic openclipart tree (no Debian package needed)."""

from __future__ import annotations

import csv
import random
import struct
import zlib
from pathlib import Path
from xml.sax.saxutils import escape

import polars as pl
import pytest
from PIL import Image, ImageDraw

from ccclip_widgets.demo import data as demo_data
from ccclip_widgets.demo.__main__ import main as demo_main
from ccclip_widgets.demo.data import POST_COLUMNS, CaptionError, build_demo_data, read_svg_metadata

# -- a synthetic openclipart tree -----------------------------------------------------------------------------
SVG_TEMPLATE = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     width="200" height="200">
  <metadata>
    <rdf:RDF>
      <cc:Work rdf:about="">
        <dc:title>{title}</dc:title>
        <dc:description>{description}</dc:description>
        <dc:subject>
          <rdf:Bag>
{keywords}
          </rdf:Bag>
        </dc:subject>
        <dc:creator>
          <cc:Agent>
            <dc:title>{creator}</dc:title>
          </cc:Agent>
        </dc:creator>
        <cc:license rdf:resource="http://web.resource.org/cc/PublicDomain"/>
      </cc:Work>
    </rdf:RDF>
  </metadata>
  <rect width="10" height="10"/>
</svg>
"""

WORDS = [
    "apple", "banana", "cherry", "dolphin", "eagle", "falcon", "giraffe", "hammer", "igloo", "jacket",
    "kettle", "lemon", "mango", "needle", "octopus", "parrot", "quilt", "rabbit", "saddle", "tiger",
    "umbrella", "violin", "walrus", "yacht",
]  # fmt: skip


def drawing(seed: int, size: tuple[int, int] = (200, 200)) -> Image.Image:
    """A drawing that differs clearly from the drawings of other seeds (random polygons on transparency)."""
    rng = random.Random(seed)
    img = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(6):
        pts = [(rng.randrange(w), rng.randrange(h)) for _ in range(4)]
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256), 255)
        draw.polygon(pts, fill=color, outline=(0, 0, 0, 255))
    return img


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG header that claims a huge image: Pillow refuses it on open, before reading any pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Tree:
    """Writes SVG + PNG pairs in the Debian packages' layout."""

    def __init__(self, root: Path) -> None:
        self.png = root / "png"
        self.svg = root / "svg"

    def add(
        self,
        rel: str,
        title: str,
        image: Image.Image | bytes | None,
        description: str = "",
        keywords: tuple[str, ...] = ("thing",),
        creator: str = "Test Artist",
    ) -> None:
        svg = self.svg / f"{rel}.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        kws = "\n".join(f"            <rdf:li>{escape(k)}</rdf:li>" for k in keywords)
        svg.write_text(
            SVG_TEMPLATE.format(
                title=escape(title), description=escape(description), keywords=kws, creator=escape(creator)
            ),
            encoding="utf-8",
        )
        if image is None:
            return
        png = self.png / f"{rel}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            png.write_bytes(image)
        else:
            image.save(png)

    def link(self, rel: str, target: str) -> None:
        for root, ext in ((self.svg, "svg"), (self.png, "png")):
            path = root / f"{rel}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(root / f"{target}.{ext}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    t = Tree(tmp_path_factory.mktemp("openclipart"))
    topics = ["animals", "food", "tools"]
    for i, word in enumerate(WORDS):
        t.add(
            f"{topics[i % 3]}/{word}_test_artist_01", word.title(), drawing(i), keywords=(topics[i % 3], word)
        )
    # junk that the filters must catch, one reason each
    t.add("tools/rotate_cw", "Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", drawing(100))
    t.add("tools/contact", "drawn by someone@example.com", drawing(101))
    t.add("tools/converted", "EPS converted from aiga", drawing(102))
    t.add("animals/empty_page", "Ghost", Image.new("RGBA", (300, 300), (0, 0, 0, 0)))
    t.add("animals/huge", "Whale", bomb_png())
    t.add("animals/no_png", "Unicorn", None)
    t.add("food/albero", "Albero", drawing(103), keywords=(), creator="Solo Artist")
    banner = Image.new("RGBA", (600, 60), (0, 0, 0, 0))
    ImageDraw.Draw(banner).rectangle((5, 5, 595, 55), fill=(200, 30, 30, 255))
    t.add("tools/banner", "Banner", banner)
    t.add("tools/broken", "Broken", drawing(104))
    (t.svg / "tools/broken.svg").write_text("<svg><metadata><dc:title>oops</metadata>", encoding="utf-8")
    # duplicates: a colour variant (same title, same drawing), the same file filed twice, a copy
    variant = drawing(0).copy()
    ImageDraw.Draw(variant).rectangle((99, 99, 101, 101), fill=(255, 255, 255, 255))
    t.add("animals/apple_test_artist_02", "Apple (Colour)", variant, keywords=("animals", "apple"))
    t.link("food/fruit/apple_again", "animals/apple_test_artist_01")
    t.add("food/copy_of_banana", "Yellow Curved Fruit", drawing(1))
    # a third, different drawing titled like two others: the group keeps at most two
    t.add("tools/cherry_test_artist_02", "Cherry", drawing(200), keywords=("tools", "cherry"))
    t.add("tools/cherry_test_artist_03", "Cherry", drawing(201), keywords=("tools", "cherry"))
    # text that is cleaned rather than dropped
    t.add("food/zebra_test_artist_01", "Zebra_Crossing2", drawing(105), description="jean@example.com")
    t.add("food/aiga_coffee_shop1", "AIGA_Symbol_Signs", drawing(106), description="EPS converted from x.org")
    return t


def build(tree: Tree, root: Path, **kwargs) -> dict:
    kwargs.setdefault("allow_missing_captions", True)
    return build_demo_data(
        out_dir=root / "demo",
        standin_dir=root / "standin",
        png_root=tree.png,
        svg_root=tree.svg,
        n_demo=kwargs.pop("n_demo", 10),
        seed=kwargs.pop("seed", 0),
        install_missing=False,
        captions_dir=kwargs.pop("captions_dir", root / "captions"),
        workers=1,
        **kwargs,
    )


@pytest.fixture(scope="module")
def built(tree: Tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("built")
    (root / "captions").mkdir()
    return root, build(tree, root)


# -- tests ----------------------------------------------------------------------------------------------------
def test_metadata_is_read_from_the_rdf_block(tree: Tree) -> None:
    meta = read_svg_metadata(tree.svg / "animals/apple_test_artist_01.svg")
    assert meta == {
        "title": "Apple",
        "description": "",
        "creator": "Test Artist",
        "keywords": ("animals", "apple"),
    }


def test_every_filter_reason_is_counted(built: tuple[Path, dict]) -> None:
    _, summary = built
    dropped = summary["dropped"]
    expected = {
        "generic_collection_title": 1,
        "email_in_title": 1,
        "conversion_note_in_title": 1,
        "blank_image": 1,
        "decompression_bomb": 1,
        "missing_png": 1,
        "uninformative_text": 1,
        "extreme_aspect_ratio": 1,
        "metadata_unreadable": 1,
        "symlink_duplicate": 1,
        "exact_duplicate": 1,
        "near_duplicate": 2,  # the apple colour variant and the third cherry
    }
    assert dropped == expected
    assert summary["source_files"] == summary["dropped_total"] + summary["good_images"]
    assert summary["good_images"] == len(WORDS) + 3  # + one more cherry, the zebra crossing, the coffee shop
    assert summary["text_notes"]["description_email"] == 1
    assert summary["text_notes"]["description_conversion_note"] == 1


def test_pools_are_disjoint_and_split_by_group(built: tuple[Path, dict]) -> None:
    root, summary = built
    demo = pl.read_parquet(root / "demo/posts.parquet")
    standin = pl.read_parquet(root / "standin/posts.parquet")
    assert summary["demo_images"] == demo["image_id"].n_unique() == 10
    # the stand-in pool (gentler text filter) holds no demo test image; demo train images may be in it
    assert summary["standin_images"] == standin.height == standin["image_id"].n_unique()
    test_ids = set(demo.filter(pl.col("split") == "test")["image_id"])
    assert test_ids and not test_ids & set(standin["image_id"])
    assert set(standin["split"]) <= {"train", "test"}  # test = held out from the stand-in's training
    assert set(demo["split"]) == {"train", "test"}
    assert summary["demo_test_images"] == demo.filter(pl.col("split") == "test")["image_id"].n_unique()
    # the two cherries (one near-duplicate group) are in the same pool, and in the same split
    cherries = demo.filter(pl.col("title") == "Cherry")
    assert cherries.height in (0, 2)
    assert cherries["split"].n_unique() <= 1
    if cherries.height and cherries["split"][0] == "test":
        assert standin.filter(pl.col("title") == "Cherry").height == 0


def test_posts_tables_have_the_documented_columns(built: tuple[Path, dict]) -> None:
    root, _ = built
    for pool in ("demo", "standin"):
        posts = pl.read_parquet(root / pool / "posts.parquet")
        assert tuple(posts.columns) == POST_COLUMNS
        assert all(dtype == pl.String for dtype in posts.dtypes)
        assert posts["post_id"].is_unique().all()
        assert set(posts["caption_kind"]) == {"descriptive"}
        assert set(posts["lang"]) == {"en"}
        assert set(posts["license"]) == {"public domain (openclipart)"}
        assert (posts["post_id"] == posts["image_id"] + "-desc-en").all()
        for row in posts.iter_rows(named=True):
            assert row["image"] == f"images/{row['image_id']}.webp"
            assert (root / pool / row["image"]).is_file()
            assert row["source"].startswith("png/") and row["source"].endswith(".png")
            assert row["text"].startswith(("A clip art image of ", "An icon of ")) and row["text"].endswith(
                "."
            )
        assert len(list((root / pool / "images").iterdir())) == posts["image_id"].n_unique()
        assert (root / pool / "posts.parquet").stat().st_mode & 0o777 == 0o644


def test_captions_are_cleaned(built: tuple[Path, dict]) -> None:
    root, _ = built
    posts = pl.concat([pl.read_parquet(root / p / "posts.parquet") for p in ("demo", "standin")])
    by_title = {r["title"]: r for r in posts.iter_rows(named=True)}
    assert "Zebra Crossing" in by_title  # underscores and trailing number removed
    assert "@" not in by_title["Zebra Crossing"]["text"]
    assert by_title["coffee shop"]["text"] == "A clip art image of coffee shop; keywords: thing."
    assert by_title["Dolphin"]["text"] == "A clip art image of Dolphin; keywords: animals."
    assert all("_" not in t and "http" not in t for t in posts["text"])


def test_thumbnails_are_small_rgb_webp(built: tuple[Path, dict]) -> None:
    root, summary = built
    for path in (root / "demo/images").iterdir():
        with Image.open(path) as img:
            assert img.format == "WEBP"
            assert img.mode == "RGB"
            assert max(img.size) == 160
    assert summary["demo_bytes"] < 200_000


def test_selection_is_deterministic_and_pinned_by_the_worklist(
    tree: Tree, built: tuple[Path, dict], tmp_path: Path
) -> None:
    root, first = built
    (tmp_path / "captions").mkdir()
    again = build(tree, tmp_path, pin_to_worklist=False)
    assert again["selection"] == "computed"
    a = (root / "captions/worklist.csv").read_text(encoding="utf-8")
    b = (tmp_path / "captions/worklist.csv").read_text(encoding="utf-8")
    assert a == b
    assert pl.read_parquet(root / "demo/posts.parquet").equals(
        pl.read_parquet(tmp_path / "demo/posts.parquet")
    )
    # another seed computes another selection, but an existing worklist wins
    pinned = build(tree, tmp_path, seed=1)
    assert pinned["selection"] == "worklist"
    assert (tmp_path / "captions/worklist.csv").read_text(encoding="utf-8") == a
    other = build(tree, tmp_path, seed=1, pin_to_worklist=False)
    assert other["selection"] == "computed"
    assert (tmp_path / "captions/worklist.csv").read_text(encoding="utf-8") != a


def test_worklist_lists_the_demo_images(built: tuple[Path, dict]) -> None:
    root, _ = built
    with (root / "captions/worklist.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image_id", "split", "title", "description", "keywords", "descriptive_caption"]
    ids = [r["image_id"] for r in rows]
    assert ids == sorted(ids)
    demo = pl.read_parquet(root / "demo/posts.parquet")
    assert set(ids) == set(demo["image_id"])


def test_commentative_captions_are_joined_and_checked(
    tree: Tree, built: tuple[Path, dict], tmp_path: Path
) -> None:
    root, _ = built
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "worklist.csv").write_bytes((root / "captions/worklist.csv").read_bytes())
    with (root / "captions/worklist.csv").open(encoding="utf-8", newline="") as f:
        ids = [r["image_id"] for r in csv.DictReader(f)]
    with (captions / "commentative_001.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "lang", "text"])
        w.writerow([ids[0], "en", "Finally got one of these, love it!"])
        w.writerow([ids[0], "en", "Second thought: still love it."])
        w.writerow([ids[1], "uk", "Нарешті вихідні!"])
        w.writerow(["oc-0000000000", "en", "nobody knows this picture"])
    with pytest.raises(CaptionError) as err:
        build(tree, tmp_path, allow_missing_captions=False)
    assert err.value.unknown == ["oc-0000000000"]
    assert set(err.value.missing) == set(ids[2:])
    summary = build(tree, tmp_path)
    assert summary["demo_commentative_posts"] == {"en": 2, "uk": 1}
    assert summary["unknown_caption_ids"] == ["oc-0000000000"]
    posts = pl.read_parquet(tmp_path / "demo/posts.parquet")
    com = posts.filter(pl.col("caption_kind") == "commentative")
    assert sorted(com["post_id"]) == sorted([f"{ids[0]}-com-en", f"{ids[0]}-com-en-2", f"{ids[1]}-com-uk"])
    assert posts.filter(pl.col("caption_kind") == "descriptive").height == 10
    split = dict(zip(posts["post_id"], posts["split"], strict=True))
    assert split[f"{ids[0]}-com-en"] == split[f"{ids[0]}-desc-en"]


def test_missing_package_gives_an_install_hint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        demo_data.ensure_openclipart(tmp_path / "png", tmp_path / "svg", install_missing=False)


def test_cli(tree: Tree, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_main(["build-model", "--standin-dir", str(tmp_path / "nowhere")]) == 5  # input missing
    assert "build-data" in capsys.readouterr().err
    args = ["build-data", "--out", str(tmp_path / "demo"), "--standin-dir", str(tmp_path / "standin")]
    args += ["--png-root", str(tree.png), "--svg-root", str(tree.svg), "--captions-dir", str(tmp_path)]
    args += ["--n-demo", "6", "--no-install", "--workers", "1"]
    assert demo_main(args) == 5  # no captions yet: CaptionError, an input-data error
    assert "no commentative caption" in capsys.readouterr().err
    assert demo_main([*args, "--allow-missing-captions"]) == 0
    out = capsys.readouterr().out
    assert "demo: 6 images" in out
    assert (tmp_path / "worklist.csv").is_file()
    # the stand-in model builder encodes the pool's captions with e5, trains the image tower with
    # tools/train_standin.py and writes a loadable, partial checkpoint
    model_dir = tmp_path / "model"
    build = ["build-model", "--standin-dir", str(tmp_path / "standin"), "--out", str(model_dir)]
    assert demo_main([*build, "--grid", "1:1e-3:0"]) == 0
    import json

    from ccclip_widgets.models import load_model

    meta = json.loads((model_dir / "ccclip.json").read_text())
    assert meta["partial"] and meta["provenance"]["command"].endswith("build-model")
    assert load_model(model_dir, device="cpu").embed_dim == 256


def test_standin_pool_leaves_out_demo_test_and_reserved_images(
    tree: Tree, built: tuple[Path, dict], tmp_path: Path
) -> None:
    from ccclip_widgets.demo.standin import build_standin_pool

    root, _ = built
    worklist = pl.read_csv(root / "captions" / "worklist.csv")
    test_ids = set(worklist.filter(pl.col("split") == "test")["image_id"])
    assert test_ids
    reserved = tmp_path / "reserved.txt"
    reserved.write_text("# kept for evaluation\nfood/hammer_test_artist_01.png\n", encoding="utf-8")
    summary = build_standin_pool(
        tmp_path / "standin",
        worklist_path=root / "captions" / "worklist.csv",
        reserved_path=reserved,
        png_root=tree.png,
        svg_root=tree.svg,
        workers=1,
        install_missing=False,
        exclude_validation=False,
    )
    posts = pl.read_parquet(tmp_path / "standin" / "posts.parquet")
    ids = set(posts["image_id"])
    assert not ids & test_ids  # no demo test image (nor its look-alikes)
    assert not posts.filter(pl.col("text").str.contains("Hammer")).height  # the reserved image
    assert summary["excluded"]["reserved_group"] >= 1
    assert summary["excluded"]["demo_test_or_validation_group"] >= len(test_ids)
    # the decode step counts what it drops: the bomb, the blank page and the pixel-identical copy
    assert summary["dropped"]["decompression_bomb"] == 1
    assert summary["dropped"]["blank_image"] == 1
    assert summary["dropped"]["exact_duplicate"] == 1
    assert summary["standin_images"] == len(ids) == posts.height
    assert summary["train_images"] + summary["heldout_images"] == summary["standin_images"]
