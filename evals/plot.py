"""Loss curves of train.py runs in one PNG: a panel per logged quantity, every run overlaid in its own colour.

    python -m evals.plot runs/textual                                   # -> runs/textual/loss_curves.png
    python -m evals.plot runs/textual runs/multimodal runs/sft --out curves.png --width 1600 --height 1200
    python -m evals.plot runs/textual --force                           # replace an existing loss_curves.png

Panels, each against the optimizer step: total loss, harmful NLL (the term gradient ascent raises), helpful NLL, KL
to the original model on normal data, learning rate, gradient norm (as clip_grad_norm_ measures it, before clipping).
A run's log.jsonl (harness/runs.py) has one JSON record per step. Event lines (a resume) are not steps and are left out;
a skipped step (no loss term in its batches) has only lr and grad_norm, and a baseline may not log every term (sft has
no harm_nll), so each panel plots, per run, the steps that carry its quantity. Non-finite values (a NaN a diverged run
logged) cannot be placed on an axis and are left out too.

Every axis spans the data of all runs in its panel: x from the first to the last step, y from the smallest to the
largest value with a small margin; tick values are 1, 2 or 5 x 10^k steps (`nice_ticks`). Any finite value is placed,
up to float64's largest (a diverged run's 1e308 gradient norm): spans are computed on halves, so that no difference of
two values overflows. Steps must be integers within +-2^53 (exact as floats); a step beyond (a corrupt log) is an error
naming the file and line. A number too large for a float (JSON allows 10^400) is left out as a non-finite value is.
--width and --height are bounded (MIN_PIXELS to MAX_PIXELS): the picture is held in memory, 3 bytes a pixel. Drawn with Pillow alone,
with the font Pillow ships, so it works offline and needs no plotting library. More runs than palette colours reuse
colours in order.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from harness.console import HelpFormatter, add_debug_option, exit_on_user_error
from harness.files import check_output_file, write_atomically
from harness.readers import read_jsonl
from harness.runs import LOG_FILE, read_log

# (log key, panel title), in reading order: the losses first, then what the optimizer did with them.
PANELS = (
    ("total", "total loss"),
    ("harm_nll", "harmful NLL (ascended)"),
    ("helpful_nll", "helpful NLL"),
    ("utility_kl", "KL to the original, normal data"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
)
COLUMNS = 2
# Tableau 10: ten colours that stay apart on screen and in print. None of them is used for anything but curves, so a
# run's colour found in a panel is that run's curve.
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
INK, GRID, BACKGROUND = (0, 0, 0), (225, 225, 225), (255, 255, 255)
DEFAULT_NAME, DEFAULT_WIDTH, DEFAULT_HEIGHT = "loss_curves.png", 1200, 900
Y_MARGIN = 0.05  # of the data's span, above and below, so extreme points do not sit on the box's edge
TICK_COUNT = 5   # about this many intervals between ticks
MIN_BOX = 30     # pixels: a smaller axis box has no room for its ticks
MIN_PIXELS, MAX_PIXELS = 64, 8192  # --width, --height: 8192 x 8192 is 200 MB in memory (25000 x 25000 was 2.8 GB)
MAX_STEP = 2**53  # every integer up to here is exact as a float, so steps keep their order and spacing on the axis
FLOAT_MAX = sys.float_info.max

Box = tuple[int, int, int, int]  # left, top, right, bottom of a panel's axis box, in pixels
Range = tuple[float, float]


class PlotError(ValueError):
    """The user's input cannot be plotted: a folder without a log, no steps, a file that would be overwritten."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading the runs


def read_runs(folders: list[str | Path]) -> dict[str, list[dict]]:
    """The step records of each run folder, by the name its legend shows: the folder's name, or its path where two
    folders share a name (runs/a/textual and runs/b/textual)."""
    folders = [Path(folder) for folder in folders]
    resolved = [folder.resolve() for folder in folders]
    for index, folder in enumerate(resolved):
        if folder in resolved[:index]:
            raise PlotError(f"{folders[index]}: run folder given twice")
    names = [folder.name for folder in folders]
    runs = {}
    for folder in folders:
        name = folder.name if names.count(folder.name) == 1 else str(folder)
        runs[name] = read_run(folder)
    return runs


def read_run(folder: Path) -> list[dict]:
    """A run's step records; a folder that has none is an error that names it (an empty panel would hide it), and so
    is a step the x axis cannot place, by file and line."""
    if not folder.is_dir():
        raise PlotError(f"{folder}: no such run folder")
    if not (folder / LOG_FILE).is_file():
        raise PlotError(f"{folder}: no {LOG_FILE} (not a train.py run folder, or a run that has not logged a step)")
    records = read_log(folder)
    if not records:
        raise PlotError(f"{folder}: {LOG_FILE} has no step records")
    bad = next((record for record in records if abs(record["step"]) > MAX_STEP), None)
    if bad is not None:
        path = folder / LOG_FILE
        line = next((number for number, record in read_jsonl(path, PlotError, appended=True) if record == bad), "?")
        digits = len(str(abs(bad["step"])))
        raise PlotError(f"{path}:{line}: step {_short(bad['step'])} ({digits} digits) is beyond the {MAX_STEP:,} "
                        f"steps an axis can place exactly (a corrupt log?)")
    return records


def _short(number: int) -> str:
    text = str(number)
    return text if len(text) <= 20 else f"{text[:8]}...{text[-4:]}"


def series(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of the records that carry a finite number under `key`, in step order."""
    points = []
    for record in records:
        value, step = _as_float(record.get(key)), _as_float(record.get("step"))
        if value is not None and step is not None and math.isfinite(value):
            points.append((step, value))
    return sorted(points, key=lambda point: point[0])


def _as_float(value) -> float | None:
    """A JSON number as a float; None for anything else, and for an integer past float's range (as inf would be)."""
    if not _is_number(value):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------------
# Axes: ranges that follow the data, nice tick values, data -> pixel


@dataclass(frozen=True)
class Axis:
    """A data interval mapped linearly onto a pixel interval. For y, pixel_low is the box's bottom: pixels grow
    downwards, values upwards."""

    low: float
    high: float
    pixel_low: float
    pixel_high: float

    def to_pixel(self, value: float) -> float:
        # halves: exact for every normal float, and no difference of two finite values overflows (1e308 - -1e308)
        fraction = (value / 2 - self.low / 2) / (self.high / 2 - self.low / 2)
        return self.pixel_low + fraction * (self.pixel_high - self.pixel_low)


def nice_step(span: float, count: int = TICK_COUNT) -> float:
    """The 1, 2 or 5 x 10^k nearest (on a log scale) to span / count: between about 3 and 8 intervals."""
    return tick_step(0.0, span, count)


def tick_step(low: float, high: float, count: int = TICK_COUNT) -> float:
    """nice_step(high - low, count), computed without forming high - low (which overflows for -1e308..1e308)."""
    raw = high / count - low / count
    exponent = math.floor(math.log10(raw))
    mantissa = raw / 10 ** exponent
    # sqrt(2), sqrt(10), sqrt(50): the geometric midpoints between 1, 2, 5 and 10
    nice = 1 if mantissa < 1.414 else 2 if mantissa < 3.162 else 5 if mantissa < 7.071 else 10
    step = nice * 10.0 ** exponent
    return step if step <= FLOAT_MAX else 1e308  # 2 x 10^308 is past float64: the largest power of ten instead


def nice_ticks(low: float, high: float, count: int = TICK_COUNT) -> list[float]:
    """The multiples of nice_step(high - low, count) that lie in [low, high]. 0..1 -> 0, 0.2, ..., 1.0."""
    if not high > low:
        return [low]
    step = tick_step(low, high, count)
    # a tick is k * mantissa / 10^n computed from integers, so 0.6 comes out as the float 0.6, not 3 * 0.2
    exponent = math.floor(math.log10(step) + 1e-9)
    mantissa = round(step / 10.0 ** exponent)
    first, last = math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9)
    scale = 10 ** abs(exponent)
    ticks = [k * mantissa / scale if exponent < 0 else k * mantissa * scale for k in range(first, last + 1)]
    return [float(t) for t in ticks if abs(t) <= FLOAT_MAX]  # a multiple past float's range is not on the axis


def data_range(values: list[float], margin: float) -> Range:
    """min..max widened by `margin` of the span each side; a constant (or values apart by less than float64 resolves
    there) gets a small range centred on it. Kept within float64's range."""
    low, high = min(values), max(values)
    if high / 2 - low / 2 < sys.float_info.min * 2**20:  # equal, or apart by a few subnormals: no tick step fits
        half = max(abs(low), abs(high)) * 0.05 or 1.0
        return max(low - half, -FLOAT_MAX), min(high + half, FLOAT_MAX)
    pad = (high / 2 - low / 2) * (2 * margin)
    return max(low - pad, -FLOAT_MAX), min(high + pad, FLOAT_MAX)


def panel_axes(runs: dict[str, list[dict]]) -> dict[str, tuple[Range, Range] | None]:
    """Each panel's (x range, y range) over the data of all runs, or None where no run logged its quantity."""
    axes: dict[str, tuple[Range, Range] | None] = {}
    for key, _ in PANELS:
        points = [point for records in runs.values() for point in series(records, key)]
        if not points:
            axes[key] = None
            continue
        steps = [step for step, _ in points]
        # x: exactly the steps logged (one step alone gets a range around it, as a constant does)
        x_range = (min(steps), max(steps)) if max(steps) > min(steps) else data_range(steps, 0.0)
        axes[key] = (x_range, data_range([value for _, value in points], Y_MARGIN))
    return axes


def tick_labels(ticks: list[float], step: float) -> list[str]:
    """As many digits as the tick step needs, so neighbouring labels differ; scientific for very small or large
    values (a learning rate of 3e-4 would otherwise read 0.00030)."""
    magnitude = max(max(abs(t) for t in ticks), step)
    step_exponent = math.floor(math.log10(step) + 1e-9)
    ticks = [0.0 if abs(t) < step * 1e-6 else t for t in ticks]  # no "-0.0"
    if magnitude < 1e-3 or magnitude >= 1e5:
        digits = max(0, math.floor(math.log10(magnitude)) - step_exponent)
        return [f"{t:.{digits}e}".replace("e-0", "e-").replace("e+0", "e+") if t else "0" for t in ticks]
    return [f"{t:.{max(0, -step_exponent)}f}" for t in ticks]


# ---------------------------------------------------------------------------------------------------------------------
# Layout: a legend strip on top, then the panels in a grid


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font, so no font file is needed: scalable in Pillow >= 10.1, a fixed bitmap font before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def font_for(width: int, height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Text that scales with the picture: 16 px on the default 1200 x 900."""
    return load_font(max(10, round(min(width, height) / 56)))


def text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def line_height(font) -> int:
    return round(text_size(font, "Hg0")[1] * 1.5)


def legend_layout(names: list[str], font, width: int) -> list[tuple[int, int]]:
    """(x, line) of each run's legend entry: a colour swatch and the name, left to right, wrapped at the width."""
    swatch, gap = 2 * line_height(font), line_height(font)
    positions, x, line = [], gap, 0
    for name in names:
        entry = swatch + gap // 3 + text_size(font, name)[0]
        if x > gap and x + entry > width - gap:
            x, line = gap, line + 1
        positions.append((x, line))
        x += entry + gap
    return positions


def panel_boxes(width: int, height: int, legend_lines: int = 1) -> dict[str, Box]:
    """The axis box of each panel. A cell of the grid holds its title above the box, the y tick labels left of it,
    and the x tick labels and the word "step" below it."""
    font = font_for(width, height)
    line, pad = line_height(font), line_height(font) // 2
    legend_height = pad + legend_lines * line + pad
    rows = math.ceil(len(PANELS) / COLUMNS)
    cell_width, cell_height = (width - pad) / COLUMNS, (height - legend_height) / rows
    y_labels = text_size(font, "-0.0000")[0] + pad   # the widest label tick_labels usually writes
    x_overhang = text_size(font, "000000")[0] // 2 + pad  # the last x label is centred on the box's right edge
    boxes = {}
    for index, (key, _) in enumerate(PANELS):
        column, row = index % COLUMNS, index // COLUMNS
        cell_left, cell_top = pad + column * cell_width, legend_height + row * cell_height
        box = (round(cell_left + y_labels), round(cell_top + line),
               round(cell_left + cell_width - x_overhang), round(cell_top + cell_height - 2 * line - pad))
        if box[2] - box[0] < MIN_BOX or box[3] - box[1] < MIN_BOX:
            raise PlotError(f"a {width} x {height} picture is too small for {len(PANELS)} panels (try --width "
                            f"{DEFAULT_WIDTH} --height {DEFAULT_HEIGHT})")
        boxes[key] = box
    return boxes


def run_colours(names: list[str]) -> dict[str, tuple[int, int, int]]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(names)}


# ---------------------------------------------------------------------------------------------------------------------
# Drawing


def put_text(canvas: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, align: str = "left",
             valign: str = "top") -> None:
    """Text placed by its visible bounding box (anchors are not available for Pillow's bitmap font)."""
    left, top, right, bottom = canvas.textbbox((0, 0), text, font=font)
    x = xy[0] - {"left": left, "center": (left + right) / 2, "right": right}[align]
    y = xy[1] - {"top": top, "middle": (top + bottom) / 2}[valign]
    canvas.text((round(x), round(y)), text, fill=INK, font=font)


def draw_legend(canvas: ImageDraw.ImageDraw, names: list[str], colours: dict, font, width: int) -> None:
    line, pad = line_height(font), line_height(font) // 2
    for name, (x, row) in zip(names, legend_layout(names, font, width)):
        middle = pad + row * line + line / 2
        canvas.line([(x, middle), (x + 2 * line, middle)], fill=colours[name], width=max(2, line // 6))
        put_text(canvas, (x + 2 * line + line // 3, middle), name, font, valign="middle")


def draw_ticks(canvas: ImageDraw.ImageDraw, box: Box, x_axis: Axis, y_axis: Axis, font) -> None:
    """Grid lines and labels at nice values; x ticks at whole steps only."""
    left, top, right, bottom = box
    pad = line_height(font) // 4
    # fewer ticks where labels would crowd: x labels two label widths apart, y labels three text heights
    x_count = (right - left) // (2 * text_size(font, str(int(x_axis.high)))[0])
    y_count = (bottom - top) // (3 * text_size(font, "0")[1])
    x_ticks = [t for t in nice_ticks(x_axis.low, x_axis.high, _clamp(x_count)) if t == int(t)]
    for tick in x_ticks:
        x = x_axis.to_pixel(tick)
        canvas.line([(x, top), (x, bottom)], fill=GRID)
        put_text(canvas, (x, bottom + pad), str(int(tick)), font, align="center")
    y_ticks = nice_ticks(y_axis.low, y_axis.high, _clamp(y_count))
    step = tick_step(y_axis.low, y_axis.high, _clamp(y_count))
    for tick, label in zip(y_ticks, tick_labels(y_ticks, step)):
        y = y_axis.to_pixel(tick)
        canvas.line([(left, y), (right, y)], fill=GRID)
        put_text(canvas, (left - pad, y), label, font, align="right", valign="middle")


def _clamp(count: int) -> int:
    return max(2, min(TICK_COUNT, count))


def draw_panel(canvas: ImageDraw.ImageDraw, box: Box, title: str, axes: tuple[Range, Range] | None,
               curves: list[tuple[tuple[int, int, int], list[tuple[float, float]]]], font) -> None:
    """One panel: title, grid and ticks, every run's curve, then the box on top so curves end cleanly at its edge."""
    left, top, right, bottom = box
    line = line_height(font)
    put_text(canvas, ((left + right) / 2, top - line / 2), title, font, align="center", valign="middle")
    put_text(canvas, ((left + right) / 2, bottom + line + line // 4), "step", font, align="center")
    if axes is None:
        put_text(canvas, ((left + right) / 2, (top + bottom) / 2), "not logged", font, align="center",
                 valign="middle")
    else:
        (x_low, x_high), (y_low, y_high) = axes
        x_axis, y_axis = Axis(x_low, x_high, left, right), Axis(y_low, y_high, bottom, top)
        draw_ticks(canvas, box, x_axis, y_axis, font)
        width = max(2, line // 10)
        for colour, points in curves:
            pixels = [(x_axis.to_pixel(step), y_axis.to_pixel(value)) for step, value in points]
            if len(pixels) == 1:  # a line needs two points; one step is a dot
                (x, y), r = pixels[0], width + 1
                canvas.ellipse([(x - r, y - r), (x + r, y + r)], fill=colour)
            elif pixels:
                canvas.line(pixels, fill=colour, width=width, joint="curve")
    canvas.rectangle(box, outline=INK)


def draw(runs: dict[str, list[dict]], width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> Image.Image:
    """The whole picture: the legend, then a panel per quantity with every run that logged it."""
    names = list(runs)
    font = font_for(width, height)
    legend_lines = 1 + max(line for _, line in legend_layout(names, font, width))
    boxes, axes, colours = panel_boxes(width, height, legend_lines), panel_axes(runs), run_colours(names)
    image = Image.new("RGB", (width, height), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    draw_legend(canvas, names, colours, font, width)
    for key, title in PANELS:
        curves = [(colours[name], series(records, key)) for name, records in runs.items()]
        draw_panel(canvas, boxes[key], title, axes[key], curves, font)
    return image


# ---------------------------------------------------------------------------------------------------------------------
# The command


def pixels(text: str) -> int:
    """--width / --height: an integer in [MIN_PIXELS, MAX_PIXELS]."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not MIN_PIXELS <= value <= MAX_PIXELS:
        raise argparse.ArgumentTypeError(f"must be an integer in [{MIN_PIXELS}, {MAX_PIXELS}], got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m evals.plot", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="train.py run folder(s), each with a log.jsonl; no default")
    p.add_argument("--out", default=None, metavar="FILE.png",
                   help=f"the picture to write; default: RUN_DIR/{DEFAULT_NAME} for one run, required for several")
    p.add_argument("--width", type=pixels, default=DEFAULT_WIDTH, help=f"pixels, {MIN_PIXELS} to {MAX_PIXELS}")
    p.add_argument("--height", type=pixels, default=DEFAULT_HEIGHT, help=f"pixels, {MIN_PIXELS} to {MAX_PIXELS}")
    p.add_argument("--force", action="store_true", help="replace the picture if it exists")
    add_debug_option(p)
    return p.parse_args(argv)


def output_path(args: argparse.Namespace) -> Path:
    """Where the picture goes; checked before anything is drawn, and an existing file is kept unless --force."""
    if args.out is None and len(args.runs) > 1:
        raise PlotError(f"{len(args.runs)} runs: name the picture with --out FILE.png")
    out = Path(args.out) if args.out is not None else Path(args.runs[0]) / DEFAULT_NAME
    if out.suffix.lower() != ".png":
        raise PlotError(f"{out}: the picture is a PNG, name it FILE.png")
    if out.exists() and not args.force:
        raise PlotError(f"{out} exists: pass --force to replace it")
    if args.out is not None and not out.parent.is_dir():
        raise PlotError(f"{out.parent}: no such folder for --out")
    # never one of the logs (a symbolic link named x.png to a log.jsonl, say), nor a folder named x.png
    return check_output_file(out, [Path(run) / LOG_FILE for run in args.runs], replace=True,
                             option="--out" if args.out is not None else None)


def plot(args: argparse.Namespace) -> Path:
    out = output_path(args)
    image = draw(read_runs(args.runs), args.width, args.height)
    # written under a temporary name and renamed, so a failure never leaves half a picture under the user's name
    write_atomically(out, lambda tmp: image.save(tmp, format="PNG"))
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    with exit_on_user_error("plot", args.debug):
        out = plot(args)
    print(out)
    return out


if __name__ == "__main__":
    main()
