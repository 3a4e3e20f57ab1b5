"""FineTune widget state: Start trains and feeds the plots, Stop stops, failures show, re-embedding hands over.

Also: waiting from a notebook (Stop during a wait, a kernel interrupt during ``wait()`` and ``await
wait_async()``), the time-left estimate, the phase shown before the first step, the recall chart's legend.
"""

from __future__ import annotations

import asyncio
import threading
import time

import polars as pl
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")

from ccclip_testkit import make_shape_posts

from ccclip_widgets.embed import embed_posts
from ccclip_widgets.models import load_model
from ccclip_widgets.posts import read_posts
from ccclip_widgets.train import FineTuneConfig
from ccclip_widgets.widgets.finetune import FineTune
from ccclip_widgets.widgets.gap import Gap


@pytest.fixture
def posts(tmp_path):
    recs = make_shape_posts(tmp_path / "imgs")
    recs = [dict(r, split="test" if i % 3 == 2 else "train") for i, r in enumerate(recs)]
    recs += [
        dict(r, post_id=f"c{i:03d}", text=f"this is so me #{i}", caption_kind="commentative")
        for i, r in enumerate(recs[:8])
    ]
    all_posts = read_posts(pl.DataFrame(recs), image_root=tmp_path / "imgs")
    return all_posts.filter(pl.col("split") == "train"), all_posts.filter(pl.col("split") == "test")


def _config(**kw):
    base = {
        "epochs": 1,
        "max_steps": 3,
        "batch_size": 4,
        "lr": 1e-3,
        "num_workers": 0,
        "show_progress": False,
        "augment": False,
        "checkpoint_every_steps": 0,
        "warmup_fraction": 0.0,
    }
    return FineTuneConfig(**{**base, **kw})


def _find(widget, css_class):
    """The first widget under ``widget`` carrying ``css_class`` (as the browser tests find them)."""
    if css_class in getattr(widget, "_dom_classes", ()):
        return widget
    for child in getattr(widget, "children", ()):
        hit = _find(child, css_class)
        if hit is not None:
            return hit
    return None


def test_start_trains_and_feeds_progress_and_plots(tiny_model, posts, tmp_path):
    train, test = posts
    base_fp = tiny_model.fingerprint
    ft = FineTune(tiny_model, train, eval_posts=test, config=_config(), out_dir=tmp_path / "run")
    w = ft.widget
    start = _find(w, "ccclip-ft-start")
    progress = _find(w, "ccclip-ft-progress")
    assert ft.status == "idle" and progress.value == 0
    start.click()  # what the browser's click does
    assert ft.wait(120)
    assert ft.status == "finished", ft.error_html
    assert [h["step"] for h in ft.history] == [1, 2, 3]
    assert progress.value == progress.max == 3
    loss = ft.loss_figure.data[0]
    assert list(loss.x) == [1, 2, 3] and len(loss.y) == 3
    # evaluation at start and at the end: R@k curves per caption kind
    assert [e["step"] for e in ft.eval_history] == [0, 3]
    names = [t.name for t in ft.metrics_figure.data]
    assert "descriptive R@5" in names and "commentative R@5" in names
    assert any(n.startswith("chance R@10") for n in names)  # every group ranked against the same pool
    assert ft.metrics_figure.layout.showlegend is True
    assert all(len(t.x) == 2 for t in ft.metrics_figure.data)
    assert ft.checkpoint == tmp_path / "run" / "final" and (ft.checkpoint / "ccclip.json").is_file()
    assert str(ft.checkpoint) in _find(w, "ccclip-ft-checkpoint").value
    assert _find(w, "ccclip-ft-progress-label").value == "3/3 steps"
    assert tiny_model.fingerprint == base_fp  # the base model is untouched: runs train a copy
    status = next(c for c in w.children if "ccclip-ft-status" in c._dom_classes)
    assert 'data-status="finished"' in status.value and "3/3 steps" in status.value


def test_stop_stops_the_run(tiny_model, posts, tmp_path):
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config(max_steps=40), out_dir=tmp_path / "run")
    ft.on_step(lambda info: ft.stop() if info.step == 2 else None)
    finished = []
    ft.on_finished(finished.append)
    ft.start(block=False)
    assert ft.wait(120)
    assert ft.status == "stopped"
    assert 2 <= len(ft.history) < 40
    assert finished and finished[0].stopped == "user"
    assert ft.checkpoint is not None and ft.checkpoint.name.startswith("checkpoint-")
    emb = ft.reembed()  # a stopped run re-embeds from its last checkpoint
    assert emb is not None and emb.model_fingerprint == ft.tuned_model.fingerprint != tiny_model.fingerprint
    assert ft.tuned_model.spec == str(ft.checkpoint)
    # the Stop button is what a user presses; it sets the same event
    ft2 = FineTune(tiny_model, train, config=_config(max_steps=40), out_dir=tmp_path / "run2")
    stop_button = _find(ft2.widget, "ccclip-ft-stop")
    ft2.on_step(lambda info: stop_button.click() if info.step == 1 else None)
    ft2.start()
    assert ft2.wait(120) and ft2.status == "stopped" and len(ft2.history) < 40


def test_bad_settings_show_the_error_panel(tiny_model, posts):
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config())
    w = ft.widget
    error = _find(w, "ccclip-ft-error")
    assert error.layout.display == "none"
    ft.configure(batch_size=1)  # a contrastive batch needs at least 2 pairs
    ft.start()
    assert ft.status == "failed" and isinstance(ft.error, ValueError)
    assert error.layout.display == "block"
    assert "ValueError" in error.value and "batch_size must be at least 2" in error.value
    assert "Hint:" in error.value
    ft.configure(batch_size=4)
    ft.start(block=True)
    assert ft.status == "finished" and error.layout.display == "none"


def test_a_failing_run_shows_its_error(tiny_model, posts, monkeypatch):
    import ccclip_widgets.train.loop as loop

    def broken_loop(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(loop._Trainer, "_loop", broken_loop)
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config())
    ft.start(block=False)
    assert ft.wait(60)
    assert ft.status == "failed"
    html = _find(ft.widget, "ccclip-ft-error").value
    assert "RuntimeError" in html and "device-side assert" in html and "traceback" in html


def test_reembed_hands_new_embeddings_to_a_connected_gap(tiny_model, posts, tmp_path):
    train, test = posts
    store = tmp_path / "store"
    before = embed_posts(test, tiny_model, store=store, show_progress=False, num_workers=0)
    gap = Gap({"before": before}, clip_models={"before": tiny_model}, n_boot=50)
    ft = FineTune(
        tiny_model, train, eval_posts=test, config=_config(max_steps=2), store=store, out_dir=tmp_path / "r"
    )
    gap.connect(ft, name="after")
    got = []
    ft.on_reembedded(lambda emb, model: got.append((emb, model)))
    ft.start(block=True)
    assert ft.status == "finished"
    # live: every evaluation during training fed the Gap view the eval posts embedded by the training model
    assert gap.models == ["before", "after"]
    assert gap.table.filter(pl.col("model") == "after").height > 0
    button = _find(ft.widget, "ccclip-ft-reembed")
    assert not button.disabled
    button.click()
    assert ft.wait(120)
    emb, model = got[0]
    assert emb.post_ids == test.table["post_id"].to_list()
    assert emb.model_fingerprint == load_model(ft.checkpoint).fingerprint != tiny_model.fingerprint
    assert emb.fingerprint != before.fingerprint
    assert ft.embeddings is emb and ft.tuned_model is model
    gap.try_caption("a red square")
    assert set(gap.caption_results) == {"before", "after"}


def test_controls_build_the_config(tiny_model, posts):
    train, _ = posts
    ft = FineTune(tiny_model, train)
    w = ft.widget
    assert ft.config.lr is None and ft.config.resolved_lr == pytest.approx(1e-5)
    assert ft.config.show_progress is False
    trains, unlock, lr = (ft.view.control(k) for k in ("trains", "unlock_blocks", "lr"))
    assert unlock.disabled
    trains.value = "lora"
    assert ft.config.lora is not None and lr.value == pytest.approx(1e-4)
    trains.value = "lock_text"
    assert not unlock.disabled
    unlock.value = 1
    cfg = ft.config
    assert cfg.lock_text and cfg.unlock_last_text_blocks == 1 and not cfg.lock_image and cfg.lora is None
    ft.view.control("epochs").value = 7
    lr.value = 3e-4
    assert ft.config.epochs == 7 and ft.config.lr == pytest.approx(3e-4)
    ft.configure(trains="projections", max_steps=5)
    assert ft.config.train_projections_only and ft.config.max_steps == 5 and trains.value == "projections"
    with pytest.raises(ValueError, match="trains must be one of"):
        ft.configure(trains="everything")
    # both towers locked: the heads-only fast path, shown as its own choice
    trains.value = "heads"
    assert ft.config.lock_image and ft.config.lock_text
    # labels are shown in full beside the controls, not cut by a description width
    row = _find(w, "ccclip-ft-setting-eval-every-steps")
    assert row.children[0].value == "evaluate every N steps (0: each epoch)"


def test_resume_continues_a_stopped_run(tiny_model, posts, tmp_path):
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config(max_steps=4), out_dir=tmp_path / "run")

    def stop_at_two(info):
        if info.step == 2:
            ft.stop()

    ft.on_step(stop_at_two)
    ft.start(block=True)
    assert ft.status == "stopped" and len(ft.history) == 2
    ft.on_step(stop_at_two, remove=True)
    ft.start(block=True, resume=True)
    assert ft.status == "finished" and [h["step"] for h in ft.history] == [1, 2, 3, 4]
    assert ft.checkpoint == tmp_path / "run" / "final"
    ft.start(block=True, resume=True)  # nothing left to resume: shown as an error, not raised
    assert ft.status == "failed" and "no stopped run" in ft.error_html


# ------------------------------------------------------------------------------------------------ waiting
def _slow_steps(ft, seconds=0.05):
    ft.on_step(lambda info: time.sleep(seconds))


def test_stop_during_a_wait_returns_promptly_with_the_result(tiny_model, posts, tmp_path):
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config(max_steps=400), out_dir=tmp_path / "run")
    _slow_steps(ft)
    ft.start()
    while ft.steps_done < 2:
        time.sleep(0.02)
    threading.Timer(0.2, ft.stop).start()  # what a click on Stop does while a cell waits
    t0 = time.monotonic()
    assert ft.wait(60)
    assert time.monotonic() - t0 < 20
    assert ft.status == "stopped" and ft.result is not None and ft.result.stopped == "user"
    assert ft.steps_done < 400


def test_kernel_interrupt_during_wait_stops_and_leaves_the_result(tiny_model, posts, tmp_path, monkeypatch):
    import ccclip_widgets.widgets.finetune as module

    train, test = posts
    ft = FineTune(tiny_model, train, eval_posts=test, config=_config(max_steps=400), out_dir=tmp_path / "run")
    _slow_steps(ft)
    w = ft.widget
    ft.start()
    while ft.steps_done < 2:
        time.sleep(0.02)
    real = module.wait_done
    calls = {"n": 0}

    def interrupted_once(jobs, timeout):
        calls["n"] += 1
        if calls["n"] == 1:  # Ctrl-C / Kernel > Interrupt while the cell blocks in ft.wait()
            assert 'class="ccclip-ft-waiting"' in _find(w, "ccclip-ft-status").value
            assert _find(w, "ccclip-ft-stop").disabled  # clicks cannot arrive while the cell blocks: say so
            raise KeyboardInterrupt
        return real(jobs, timeout)

    monkeypatch.setattr(module, "wait_done", interrupted_once)
    assert ft.wait() is True  # no exception: the notebook goes on with the next cell
    assert ft.status == "stopped" and ft.result is not None and ft.result.stopped == "user"
    assert ft.checkpoint is not None and ft.checkpoint.name.startswith("checkpoint-")
    assert ft.result.summary()  # what notebook 03 prints next
    status = _find(w, "ccclip-ft-status").value
    assert 'data-status="stopped"' in status and "ccclip-ft-waiting" not in status
    assert ft.steps_done < 400 and _find(w, "ccclip-ft-progress").value == ft.steps_done


def test_a_second_interrupt_raises_one_clear_toolkit_error(tiny_model, posts, tmp_path, monkeypatch):
    import ccclip_widgets.widgets.finetune as module
    from ccclip_widgets import CCClipError, TrainingInterruptedError

    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config(max_steps=400), out_dir=tmp_path / "run")
    _slow_steps(ft)
    ft.start()

    def always_interrupted(jobs, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "wait_done", always_interrupted)
    with pytest.raises(TrainingInterruptedError, match="call ft.wait\\(\\) again") as info:
        ft.wait()
    assert isinstance(info.value, CCClipError)
    monkeypatch.undo()
    assert ft.wait(60) and ft.status == "stopped" and ft.result is not None


def test_interrupting_an_awaiting_cell_stops_the_run(tiny_model, posts, tmp_path):
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config(max_steps=400), out_dir=tmp_path / "run")
    _slow_steps(ft)

    async def cell():
        ft.start()
        task = asyncio.ensure_future(ft.wait_async())  # the cell: await ft.wait_async()
        while ft.steps_done < 2:
            await asyncio.sleep(0.02)
        assert not ft.waiting  # an awaiting cell keeps the kernel free: Stop stays usable
        task.cancel()  # what ipykernel does to an awaiting cell on Kernel > Interrupt
        return await task

    assert asyncio.run(cell()) is True
    assert ft.status == "stopped" and ft.result is not None and ft.result.stopped == "user"


def test_eta_and_the_phase_before_the_first_step(tiny_model, posts, tmp_path):
    train, _ = posts
    ft = FineTune(tiny_model, train, config=_config(max_steps=30), out_dir=tmp_path / "run")
    ft.configure(trains="heads")
    messages, etas = [], []
    ft.on_change(lambda parts: messages.append(ft.message) if "status" in parts else None)
    ft.on_step(lambda info: etas.append(ft.eta_s))
    ft.start(block=True)
    assert ft.status == "finished"
    assert any(m.startswith("loading the model") for m in messages)
    assert any("both towers are locked, encoding each image and text once" in m for m in messages)
    assert etas[0] is None and all(e is not None and e >= 0 for e in etas[2:])
    assert any("left" in m for m in messages) and ft.eta_s is None


def test_live_embeddings_are_the_evaluated_vectors(tiny_model, posts, tmp_path, monkeypatch):
    import ccclip_widgets.embed as embed

    train, test = posts
    ft = FineTune(tiny_model, train, eval_posts=test, config=_config(max_steps=2), out_dir=tmp_path / "r")
    evals, live = [], []
    ft.on_eval(evals.append)
    ft.on_live_embeddings(lambda emb, info: live.append(emb))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the panel must not encode the eval posts again")

    monkeypatch.setattr(embed, "encode_images", no_encoding)
    monkeypatch.setattr(embed, "encode_texts", no_encoding)
    ft.start(block=True)
    assert ft.status == "finished" and len(live) == len(evals) == 2
    assert (live[-1].image == evals[-1].vectors.image).all()
    assert live[-1].post_ids == test.table["post_id"].to_list()
