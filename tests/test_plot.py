"""evals/plot.py: loss curves of train.py runs as a PNG, from small log.jsonl files written here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from evals.plot import Axis, draw, main, nice_ticks, panel_axes, panel_boxes, read_runs, run_colours
from harness.runs import RunError


def write_run(folder: Path, lines: list) -> Path:
    """A run folder whose log.jsonl holds `lines` (dicts as JSON, strings as they are)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                                              for line in lines))
    return folder


def step_record(step: int, harm_nll: float, **more) -> dict:
    """A full step record, as train.py logs one: harm_nll as given, the other terms derived from the step."""
    return {"step": step, "harm_nll": harm_nll, "helpful_nll": 3.0 / (1 + step), "utility_kl": 0.001 * step,
            "total": 3.0 / (1 + step) - 0.5 * harm_nll, "grad_norm": 1.0 + 0.1 * step, "lr": 3e-4, "tokens": 100,
            **more}


def linear_run(folder: Path, first: float, last: float, steps: int = 41) -> Path:
    """harm_nll rising evenly from `first` to `last` over steps 0..steps-1."""
    return write_run(folder, [step_record(s, first + (last - first) * s / (steps - 1)) for s in range(steps)])


def user_error(capsys, argv: list[str]) -> str:
    """main's one line on stderr, checked to be a user error (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("plot: error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------------------------------------------
# The picture


def test_writes_a_png_of_the_requested_size_next_to_the_run(tmp_path, capsys):
    run = linear_run(tmp_path / "textual", 2.0, 12.0)
    out = main([str(run), "--width", "640", "--height", "480"])
    assert out == run / "loss_curves.png" and capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (640, 480)
        image.verify()
    assert not list(run.glob("*.tmp"))  # written under a temporary name, then renamed


def test_two_runs_are_overlaid_each_in_its_own_colour(tmp_path):
    runs = read_runs([linear_run(tmp_path / "textual", 2.0, 12.0), linear_run(tmp_path / "multimodal", 5.0, 30.0)])
    image = draw(runs, 800, 600)
    boxes, colours = panel_boxes(800, 600), run_colours(list(runs))
    assert colours["textual"] != colours["multimodal"]
    left, top, right, bottom = boxes["harm_nll"]
    in_panel = {colour for _, colour in image.crop((left, top, right + 1, bottom + 1)).getcolors(maxcolors=1 << 16)}
    assert colours["textual"] in in_panel and colours["multimodal"] in in_panel


def test_a_run_without_a_quantity_is_absent_from_its_panel_only(tmp_path):
    """sft logs no harm_nll: its colour is in the helpful NLL panel and not in the harmful NLL one."""
    textual = linear_run(tmp_path / "textual", 2.0, 12.0)
    sft = write_run(tmp_path / "sft", [{k: v for k, v in step_record(s, 0.0).items() if k != "harm_nll"}
                                       for s in range(10)])
    runs = read_runs([textual, sft])
    image, boxes, colours = draw(runs, 800, 600), panel_boxes(800, 600), run_colours(list(runs))

    def colours_in(key):
        left, top, right, bottom = boxes[key]
        return {colour for _, colour in image.crop((left, top, right + 1, bottom + 1)).getcolors(maxcolors=1 << 16)}

    assert colours["sft"] not in colours_in("harm_nll") and colours["textual"] in colours_in("harm_nll")
    assert colours["sft"] in colours_in("helpful_nll")


def test_panels_sit_inside_the_picture_without_overlapping(tmp_path):
    boxes = list(panel_boxes(1200, 900).values())
    assert len(boxes) == 6
    for index, (left, top, right, bottom) in enumerate(boxes):
        assert 0 < left < right < 1200 and 0 < top < bottom < 900
        for other in boxes[index + 1:]:
            assert right < other[0] or other[2] < left or bottom < other[1] or other[3] < top


# ---------------------------------------------------------------------------------------------------------------------
# Axes


def test_nice_ticks_by_hand():
    assert nice_ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert nice_ticks(2.0, 12.0) == pytest.approx([2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
    # 299 / 5 = 59.8, nearest nice step 50; ticks only inside the range (300 is past it)
    assert nice_ticks(0.0, 299.0) == pytest.approx([0.0, 50.0, 100.0, 150.0, 200.0, 250.0])
    # the first multiple of 2 at or above -3
    assert nice_ticks(-3.0, 7.0) == pytest.approx([-2.0, 0.0, 2.0, 4.0, 6.0])
    # a learning rate's neighbourhood: 3e-5 / 5 = 6e-6, step 5e-6
    assert nice_ticks(2.85e-4, 3.15e-4) == pytest.approx([2.85e-4, 2.9e-4, 2.95e-4, 3e-4, 3.05e-4, 3.1e-4, 3.15e-4])
    assert nice_ticks(0.0, 1.0, count=2) == pytest.approx([0.0, 0.5, 1.0])
    # the ticks are the decimal values themselves, not sums that drift (3 * 0.1 is 0.30000000000000004)
    assert nice_ticks(0.3, 0.7) == [0.3, 0.4, 0.5, 0.6, 0.7]


def test_axis_maps_data_to_pixels():
    x = Axis(0.0, 40.0, 100.0, 500.0)
    assert [x.to_pixel(v) for v in (0.0, 10.0, 40.0)] == [100.0, 200.0, 500.0]
    y = Axis(2.0, 12.0, 300.0, 100.0)  # y grows upwards, pixels downwards
    assert [y.to_pixel(v) for v in (2.0, 7.0, 12.0)] == [300.0, 200.0, 100.0]


def test_axis_ranges_follow_the_data(tmp_path):
    (x_range, (low, high)) = panel_axes(read_runs([linear_run(tmp_path / "a" / "run", 2.0, 12.0)]))["harm_nll"]
    assert x_range == (0.0, 40.0)
    # contains the data, and wider by less than one tick step (2, for a span of 10) at either end
    assert 0.0 < low <= 2.0 and 12.0 <= high < 14.0

    (_, (low2, high2)) = panel_axes(read_runs([linear_run(tmp_path / "b" / "run", 4.0, 24.0)]))["harm_nll"]
    assert 0.0 < low2 <= 4.0 and 24.0 <= high2 < 28.0  # doubled data, range moved with it (step 4)


def test_a_panel_spans_all_runs_in_it(tmp_path):
    runs = read_runs([linear_run(tmp_path / "low", 2.0, 12.0, steps=41), linear_run(tmp_path / "high", 20.0, 30.0,
                                                                                     steps=101)])
    (x_range, (low, high)) = panel_axes(runs)["harm_nll"]
    assert x_range == (0.0, 100.0)
    assert 0.0 < low <= 2.0 and 30.0 <= high < 35.0


def test_a_constant_gets_a_small_range_around_it(tmp_path):
    (_, (low, high)) = panel_axes(read_runs([linear_run(tmp_path / "run", 2.0, 12.0)]))["lr"]
    assert low < 3e-4 < high and high - 3e-4 == pytest.approx(3e-4 - low) and high - low < 1e-4


# ---------------------------------------------------------------------------------------------------------------------
# What a real log holds


def test_event_lines_skipped_steps_and_missing_numbers_are_tolerated(tmp_path):
    run = write_run(tmp_path / "run", [
        step_record(0, 2.0), step_record(1, 4.0),
        {"event": "resume", "step": 2, "changed": {}},
        step_record(2, 6.0, utility_kl=float("nan")),  # a NaN cannot be placed: left out of its panel
        {"step": 3, "grad_norm": 0.0, "lr": 3e-4, "skipped": "no loss term"},  # a step with no loss term
    ])
    runs = read_runs([run])
    assert [r["step"] for r in runs["run"]] == [0, 1, 2, 3]
    axes = panel_axes(runs)
    assert axes["harm_nll"][0] == (0.0, 2.0) and axes["lr"][0] == (0.0, 3.0)
    assert axes["utility_kl"][0] == (0.0, 1.0)
    main([str(run), "--width", "400", "--height", "300"])
    with Image.open(run / "loss_curves.png") as image:
        assert image.size == (400, 300)


def test_a_quantity_no_run_logged_leaves_its_panel_empty(tmp_path):
    run = write_run(tmp_path / "sft", [{k: v for k, v in step_record(s, 0.0).items() if k != "harm_nll"}
                                       for s in range(5)])
    assert panel_axes(read_runs([run]))["harm_nll"] is None
    main([str(run)])
    assert (run / "loss_curves.png").is_file()


def test_a_single_step_is_drawn_as_a_point(tmp_path):
    run = write_run(tmp_path / "run", [step_record(7, 2.0)])
    (x_low, x_high), _ = panel_axes(read_runs([run]))["harm_nll"]
    assert x_low < 7.0 < x_high
    image, colour = draw(read_runs([run]), 800, 600), run_colours(["run"])["run"]
    left, top, right, bottom = panel_boxes(800, 600)["harm_nll"]
    assert colour in {c for _, c in image.crop((left, top, right + 1, bottom + 1)).getcolors(maxcolors=1 << 16)}


def test_folders_that_share_a_name_are_named_by_their_paths(tmp_path):
    first, second = linear_run(tmp_path / "a" / "textual", 1, 2), linear_run(tmp_path / "b" / "textual", 1, 2)
    other = linear_run(tmp_path / "sft", 1, 2)
    assert list(read_runs([first, second, other])) == [str(first), str(second), "sft"]


# ---------------------------------------------------------------------------------------------------------------------
# The user's errors: one line each, exit status 2


def test_a_missing_folder_or_log_is_named(tmp_path, capsys):
    assert "nowhere: no such run folder" in user_error(capsys, [str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    err = user_error(capsys, [str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert f"{tmp_path / 'empty'}: no log.jsonl" in err


def test_a_log_without_steps_is_named(tmp_path, capsys):
    run = write_run(tmp_path / "run", [{"event": "resume", "step": 0}])
    assert f"{run}: log.jsonl has no step records" in user_error(capsys, [str(run)])


def test_bad_json_is_named_by_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", [step_record(0, 1.0), "{not json"])
    assert f"{run / 'log.jsonl'}:2: not valid JSON" in user_error(capsys, [str(run)])
    with pytest.raises(RunError):
        read_runs([run])


def test_several_runs_need_out(tmp_path, capsys):
    runs = [str(linear_run(tmp_path / name, 1, 2)) for name in ("a", "b")]
    assert "2 runs: name the picture with --out" in user_error(capsys, runs)
    assert not list(tmp_path.rglob("*.png"))


def test_the_same_folder_twice_is_refused(tmp_path, capsys):
    run = str(linear_run(tmp_path / "a", 1, 2))
    assert "given twice" in user_error(capsys, [run, run, "--out", str(tmp_path / "x.png")])


def test_an_existing_picture_is_kept_unless_forced(tmp_path, capsys):
    run = linear_run(tmp_path / "run", 2.0, 12.0)
    out = run / "loss_curves.png"
    out.write_bytes(b"the user's own file")
    assert f"{out} exists: pass --force to replace it" in user_error(capsys, [str(run)])
    assert out.read_bytes() == b"the user's own file"
    main([str(run), "--force"])
    with Image.open(out) as image:
        assert image.format == "PNG"


def test_a_picture_too_small_for_the_panels_is_refused(tmp_path, capsys):
    run = str(linear_run(tmp_path / "run", 1, 2))
    assert "too small for 6 panels" in user_error(capsys, [run, "--width", "120", "--height", "90"])


def test_out_must_be_a_png_in_an_existing_folder(tmp_path, capsys):
    run = str(linear_run(tmp_path / "run", 1, 2))
    assert "name it FILE.png" in user_error(capsys, [run, "--out", str(tmp_path / "curves.jpg")])
    assert "no such folder for --out" in user_error(capsys, [run, "--out", str(tmp_path / "nowhere" / "c.png")])
