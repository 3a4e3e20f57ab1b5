"""``ccclip``: one parser, fast help, a broken subcommand named, and every error path ends in its documented
exit code with exactly one line on stderr (the traceback only with ``--debug``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from ccclip_testkit import make_shape_posts

import ccclip_widgets.models
from ccclip_widgets import errors
from ccclip_widgets.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["embed", "finetune", "eval", "demo", "demo build-data", "demo build-model"]


def _one_line(err: str, code_prefix: str = "ccclip") -> str:
    assert err.count("\n") == 1 and err.endswith("\n"), repr(err)
    assert "Traceback" not in err
    assert err.startswith(code_prefix), err
    return err


@pytest.fixture
def posts_csv(tmp_path):
    recs = make_shape_posts(tmp_path / "imgs")[:6]
    path = tmp_path / "imgs" / "posts.csv"
    pl.DataFrame(recs).write_csv(path)
    return path


@pytest.mark.parametrize("sub", ["", *SUBCOMMANDS])
def test_help_of_every_subcommand(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main([*sub.split(), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ccclip {sub}".rstrip())
    if sub in ("embed", "finetune", "eval"):
        for flag in (
            "--model",
            "--out",
            "--image-root",
            "--device",
            "--allow-random",
            "--no-progress",
            "--debug",
        ):
            assert flag in out, (sub, flag)
    if sub == "finetune":
        assert "--lock-text" in out and "--lr" in out  # generated from FineTuneConfig


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from ccclip_widgets.cli import main\n"
        f"for argv in {[[*s.split(), '--help'] for s in ['', *SUBCOMMANDS]]!r}:\n"
        "    try:\n"
        "        main([a for a in argv if a])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "heavy = [m for m in ('torch', 'polars', 'open_clip', 'numpy', 'PIL', 'faiss', 'umap') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_a_broken_subcommand_is_an_error_that_names_it(monkeypatch, capsys, posts_csv):
    monkeypatch.setitem(sys.modules, "ccclip_widgets.cli.eval", None)  # import of it now fails
    assert main(["eval", str(posts_csv), "--model", "demo"]) == 11
    err = _one_line(capsys.readouterr().err)
    assert "'eval' command cannot be loaded" in err
    # it is still listed, and the others still work
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "eval" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["embed", "--help"])


def test_every_command_is_listed_and_importable():
    from ccclip_widgets.cli import build_parser

    parser = build_parser()  # imports every subcommand module; would raise CommandImportError
    assert set(COMMANDS) == {"embed", "finetune", "eval", "demo"}
    assert parser.prog == "ccclip"


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["nonsense"], "invalid choice"),
        (["embed", "posts.csv"], "--model"),
        (["finetune", "p.csv", "--model", "m", "--out", "o", "--precision", "fp8"], "fp8"),
        (["eval", "p.csv", "--model", "m", "--n-boot", "many"], "many"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, text, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert text in _one_line(capsys.readouterr().err)


def test_missing_posts_file(tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nope.csv"), "--model", "demo", "--out", str(tmp_path / "o")]) == 5
    assert "nope.csv" in _one_line(capsys.readouterr().err, "ccclip embed: error: ")


def test_schema_error(tmp_path, capsys):
    path = tmp_path / "p.csv"
    pl.DataFrame({"post_id": ["1"], "picture": ["a.jpg"]}).write_csv(path)
    assert main(["embed", str(path), "--model", "demo", "--out", str(tmp_path / "o")]) == 5
    _one_line(capsys.readouterr().err, "ccclip embed: error: ")


def test_bad_model_spec(posts_csv, tmp_path, capsys):
    argv = ["embed", str(posts_csv), "--model", "no-such-arch:nothing", "--out", str(tmp_path / "o")]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 6
    _one_line(capsys.readouterr().err, "ccclip embed: error: ")


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.ModelUnavailableError("weights need a download; HF_HUB_OFFLINE=1 is set"), 7),
        (errors.LockTimeout("store.lock is held by pid 12"), 8),
        (errors.IndexIntegrityError("index.faiss\naltered"), 9),
        (errors.DiskFullError(28, "No space left on device"), 10),
        (errors.MissingDependencyError("pip install faiss-cpu"), 11),
        (errors.TrainingDivergedError(3, float("nan"), None, 2), 3),
        (errors.CheckpointIntegrityError("ckpt damaged"), 6),
        (errors.ImageDecodeError("a.jpg", "corrupt", "bad header"), 5),
        (RuntimeError("something nobody planned for"), 1),
    ],
)
def test_each_error_maps_to_its_exit_code_and_one_line(exc, code, posts_csv, tmp_path, monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(ccclip_widgets.models, "load_model", boom)
    argv = ["embed", str(posts_csv), "--model", "demo", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == code
    err = _one_line(capsys.readouterr().err, "ccclip embed: error: ")
    assert errors.exit_code_for(exc) == code
    if code == 1:
        assert "unexpected RuntimeError" in err and "--debug" in err
    # --debug adds the traceback
    assert main([*argv, "--debug"]) == code
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("ccclip embed: error: ")


def test_interrupt_exits_130_with_the_resume_hint(posts_csv, tmp_path, monkeypatch, capsys):
    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ccclip_widgets.models, "load_model", stop)
    assert main(["embed", str(posts_csv), "--model", "demo", "--out", str(tmp_path / "o")]) == 130
    assert "run the same command again" in capsys.readouterr().err


def test_no_usable_row_exits_5_after_writing_rejects(tmp_path, capsys):
    path = tmp_path / "p.csv"
    pl.DataFrame({"post_id": ["1", "2"], "image": ["nope1.jpg", "nope2.jpg"], "text": ["a", "b"]}).write_csv(
        path
    )
    out = tmp_path / "o"
    assert main(["embed", str(path), "--model", "demo", "--out", str(out), "--no-progress"]) == 5
    err = _one_line(capsys.readouterr().err, "ccclip embed: error: no usable post")
    assert "missing_image: 2" in err and "rejects.csv" in err
    assert pl.read_csv(out / "rejects.csv")["reason"].to_list() == ["missing_image"] * 2


def test_python_dash_m_entry_points(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for mod in ("ccclip_widgets.cli", "ccclip_widgets.demo"):
        argv = ["--help"] if mod.endswith("cli") else ["build-model", "--help"]
        run = subprocess.run([sys.executable, "-m", mod, *argv], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("usage: ccclip")
    run = subprocess.run(
        [sys.executable, "-m", "ccclip_widgets.cli", "embed", str(tmp_path / "x.csv"), "--model", "demo",
         "--out", str(tmp_path / "o")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 5 and run.stderr.count("\n") == 1, run.stderr


def test_all_absolute_image_paths_name_the_image_root_flag(tmp_path, capsys):
    recs = make_shape_posts(tmp_path / "pics")[:4]
    for r in recs:
        r["image"] = str((tmp_path / "pics" / r["image"]).resolve())
    table = tmp_path / "tables" / "posts.csv"
    table.parent.mkdir()
    pl.DataFrame(recs).write_csv(table)
    out = tmp_path / "o"
    assert main(["embed", str(table), "--model", "demo", "--out", str(out), "--no-progress"]) == 5
    err = _one_line(capsys.readouterr().err, "ccclip embed: error: no usable post")
    assert f"--image-root {(tmp_path / 'pics').resolve()}" in err and "outside_image_root: 4" in err
    assert (out / "rejects.csv").is_file()


def test_docs_list_every_exit_code():
    codes = {0, *errors.EXIT_CODES.values()}
    for doc in (REPO / "docs" / "cli.md", REPO / "README.md"):
        text = doc.read_text()
        listed = {int(c) for c in __import__("re").findall(r"^\| *(\d+) \|", text, flags=__import__("re").M)}
        assert codes <= listed, (doc.name, codes - listed)
