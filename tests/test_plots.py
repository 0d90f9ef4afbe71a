"""The zoo's figures: each titled with what it shows, the preset, the steps and the hardware, axes labelled, error
bars where there are seeds; timing records carry the load."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.container import ErrorbarContainer

from benchmarks import fft_crossover, harness, nanohead_sweep, npt_losses, toeplitz_recurrent
from model_cards import plot_loss_curve

ENV = {"device": "cpu", "device_name": "Test CPU 9000", "torch_threads": 2, "dtype": "float32", "torch": "2"}
HARDWARE = "Test CPU 9000 (cpu), 2 thread(s)"


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """The figures the plot functions hand to `save_figure` (kept open, not written)."""
    caught: list[Any] = []
    for module in (fft_crossover, nanohead_sweep, npt_losses, toeplitz_recurrent):
        monkeypatch.setattr(module, "save_figure", lambda fig, path, caught=caught: caught.append(fig))
    yield caught
    for fig in caught:
        harness.pyplot().close(fig)


def title(fig: Any) -> str:
    """The figure's title and its axes' titles."""
    return " ".join([fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in fig.axes])


def assert_labelled(fig: Any) -> None:
    """Every axes has an x and a y label."""
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def assert_seeded_figure(figures: list[Any], preset_and_steps: str) -> None:
    """The one figure drawn names the preset, steps and hardware, labels its axes and has error bars on the first."""
    (fig,) = figures
    assert f"{preset_and_steps}, {HARDWARE}" in title(fig)
    assert_labelled(fig)
    assert any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)


def test_figure_title_names_what_preset_steps_and_hardware() -> None:
    assert harness.figure_title("loss", "smoke", 300, ENV) == f"loss\npreset smoke, 300 steps, {HARDWARE}"
    assert harness.figure_title("speed", None, None, ENV) == f"speed\n{HARDWARE}"


def test_environment_records_the_load_and_the_line_shows_it() -> None:
    env = harness.environment(torch.device("cpu"), torch.float32)
    assert env["load_average"][0] >= 0 and env["torch_threads"] >= 1 and env["device_name"]
    assert "1-minute load" in harness.environment_line(env)


def test_nanohead_sweep_plot_has_title_labels_and_error_bars(figures: list[Any]) -> None:
    summary = [{"arm": arm, "proportion": p, "val_bpb_mean": 2.0 + p, "val_bpb_se": 0.01,
                "train_tokens_per_second": 9.0} for arm in ("zero_init", "default") for p in (0.0, 0.4)]
    report = {"summary": summary, "runs": [{"proportion": 0.0, "val_bpb": 2.0}], "parameters": 1000, "preset": "smoke",
              "settings": {"max_steps": 150, "seeds": 2, "nanohead_dim": 4}, "environment": ENV}
    nanohead_sweep.plot(report, "unused.png")
    assert_seeded_figure(figures, "preset smoke, 150 steps")


def test_toeplitz_recurrent_plot_has_title_labels_and_error_bars(figures: list[Any]) -> None:
    quality = [{"window": 8, "state_size": n, "kl": 0.1 / n, "kl_se": 0.001} for n in (4, 8)]
    speed = [{"path": "eager", "decode_mode": mode, "context": c, "decode_step_ms": 1.0}
             for mode in ("exact", "recurrent") for c in (16, 32)]
    report = {"quality": quality, "speed": speed, "settings": {"preset": "smoke", "batch_size": 1, "runs": 5},
              "model": {"steps": 300}, "environment": ENV}
    toeplitz_recurrent.plot(report, "unused.png")
    assert_seeded_figure(figures, "preset smoke, 300 steps")


def test_npt_losses_plots_have_titles_labels_error_bars_and_seed_bands(figures: list[Any]) -> None:
    def run(name: str, seed: int, kl: float) -> dict[str, Any]:
        after = {"kl": kl, "top1": 0.9, "ppl_base": 19.6, "ppl_npt": 20.2, "ppl_drop": 20.8, "recovery": 0.5}
        curve = [{"step": 0, "kl": 0.05, "direct_nmse": 0.7}, {"step": 100, "kl": kl, "direct_nmse": 0.4 + seed / 10}]
        return {"name": name, "seed": seed, "layers": [2], "npt_fields": {}, "after": after, "curve": curve}

    report = {"results": [run(name, seed, 0.02 + seed / 100) for name in ("base", "fixed_invgrad") for seed in (0, 1)],
              "preset": "smoke", "settings": {"steps": 100, "seeds": 2}, "environment": ENV}
    npt_losses.plot(report, Path("unused"))
    ablation, curves = figures
    assert_seeded_figure([ablation], "preset smoke, 100 steps")
    assert "preset smoke, 100 steps, " + HARDWARE in title(curves)
    assert_labelled(curves)
    (line, *_), band = curves.axes[0].lines, curves.axes[0].collections[0]  # the mean and its ± SE band over seeds
    assert list(line.get_ydata()) == pytest.approx([0.05, 0.025])
    vertices = band.get_paths()[0].vertices
    at_100 = vertices[vertices[:, 0] == 100, 1]
    assert (at_100.min(), at_100.max()) == pytest.approx((0.02, 0.03))  # mean 0.025 ± SE 0.005


def test_fft_crossover_plot_names_the_hardware_and_keeps_the_legend_off_the_data(figures: list[Any]) -> None:
    rows = [{"length": n, **{name: 1e-3 * n for name in fft_crossover.SERIES},
             **{f"{name}_timing": {"p10_s": 0.9e-3 * n, "p90_s": 1.2e-3 * n} for name in fft_crossover.SERIES}}
            for n in (64, 128)]
    report = {"rows": rows, "settings": {"hidden_size": 32, "kernel_len": 8, "batch_size": 1}, "environment": ENV}
    fft_crossover.plot(report, "unused.png")
    (fig,) = figures
    assert HARDWARE in title(fig)
    assert_labelled(fig)
    (ax,) = fig.axes
    legend_box = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend_box.x0 >= ax.get_window_extent().x1  # outside the axes, to the right


def test_loss_curve_has_the_title_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plt = harness.pyplot()
    kept: list[Any] = []
    monkeypatch.setattr(plt, "close", kept.append)
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.6}]
    assert plot_loss_curve(history, tmp_path / "loss.png", harness.figure_title("llama training loss", None, 2, ENV))
    (fig,) = kept
    assert "2 steps" in title(fig) and HARDWARE in title(fig)
    assert_labelled(fig)
    monkeypatch.undo()
    plt.close(fig)


def test_a_row_with_one_noisy_timing_is_marked_noisy_with_its_worst_spread() -> None:
    steady = harness.Timing([1.0, 1.0, 1.1, 1.0, 1.0]).summary()
    noisy = harness.Timing([1.0, 1.0, 3.0, 1.0, 4.0]).summary()
    assert harness.worst_spread([steady, steady]) == {"spread_p90_p10": steady["spread_p90_p10"], "noisy": ""}
    row = harness.worst_spread([steady, noisy])
    assert row == {"spread_p90_p10": noisy["spread_p90_p10"], "noisy": "noisy"} and noisy["spread_p90_p10"] > 1.5
    table = harness.format_table([{"length": 8, **row}], [("length", "seq"), ("noisy", "p90/p10 > 1.5")])
    assert table.splitlines()[-1].split() == ["8", "noisy"]
