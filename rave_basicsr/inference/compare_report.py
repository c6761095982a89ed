"""The report of ``rave compare``: CSV and Markdown tables, an image grid and a static HTML page.

All files go to the comparison's output folder and refer to each other by relative paths, so the folder can be
moved or served as it is:

* ``results.csv``: one row per model: label, weights, number of images evaluated, the mean of every metric, then
  every metric per image (columns ``METRIC[IMAGE]``);
* ``per_image.csv``: the same values in long form (one row per model and image), for spreadsheets and pandas;
* ``results.md``: the means (best value of each column in bold), one per-image table per metric, problems, notes;
* ``grid.png``: inputs × models (and the ground truth), thumbnails with the first metrics under each output;
* ``index.html``: the tables and the grid, and per image a before/after view (a slider over the input and a
  chosen output or the ground truth; it works without JavaScript as a half/half split).
"""
import csv
import html
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import cv2
import numpy as np

from rave_basicsr.utils.image_io import write_image_atomic

if TYPE_CHECKING:  # pragma: no cover
    from rave_basicsr.inference.compare_plan import CompareResult

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_TEXT = (40, 40, 40)
_BACKGROUND = (255, 255, 255)
_PLACEHOLDER = (225, 225, 225)


class GridCell:
    """One grid cell: a thumbnail of an H×W×3 float RGB image that fits ``size``×``size`` (made at once, so that
    full-size images are not kept), or None for a cell without image, and up to two caption lines."""

    def __init__(self, rgb: Optional[np.ndarray], size: int, caption: Sequence[str] = ()) -> None:
        self.caption = [caption] if isinstance(caption, str) else list(caption)
        self.thumbnail = None
        if rgb is not None:
            height, width = rgb.shape[:2]
            scale = size / max(height, width)
            shape = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), shape,
                               interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
            self.thumbnail = np.round(np.clip(small, 0, 1) * 255).astype(np.uint8)


def _ascii(text: str) -> str:
    return text.encode('ascii', 'replace').decode('ascii')


def _put_text(canvas: np.ndarray, text: str, x: int, y: int, width: int, scale: float = 0.4) -> None:
    """Draw ``text`` at (x, baseline y), shortened with '..' to fit ``width`` px."""
    text = _ascii(text)
    while text and cv2.getTextSize(text, _FONT, scale, 1)[0][0] > width:
        text = text[:-3] + '..' if len(text) > 3 else ''
    cv2.putText(canvas, text, (x, y), _FONT, scale, _TEXT, 1, cv2.LINE_AA)


def grid_columns(result: 'CompareResult') -> List[Tuple[str, str]]:
    """``(key, title)`` of the grid's columns: the input, every model (the ``input`` baseline is the first column
    already), the ground truth when there is one."""
    columns = [('input', 'input')]
    columns += [(model.label, model.label) for model in result.models if not model.is_input]
    if result.plan.gt_dir is not None:
        columns.append(('gt', 'ground truth'))
    return columns


def render_grid(columns: List[Tuple[str, str]], rows: Dict[str, Dict[str, GridCell]], size: int) -> np.ndarray:
    """The grid as a uint8 BGR image: a title row, then one row per image (as high as its tallest thumbnail, at
    most ``size``) with the caption lines under each cell; cells without image are grey."""
    pad, header, line = 6, 24, 14
    lines = max([len(cell.caption) for cells in rows.values() for cell in cells.values()] + [0])
    heights = [max([c.thumbnail.shape[0] for c in cells.values() if c.thumbnail is not None] or [size])
               for cells in rows.values()]
    width = pad + len(columns) * (size + pad)
    height = header + sum(h + lines * line + pad for h in heights) + pad
    canvas = np.full((height, width, 3), _BACKGROUND, np.uint8)
    for col, (_, title) in enumerate(columns):
        _put_text(canvas, title, pad + col * (size + pad), header - 8, size, 0.45)
    top = header
    for row_height, cells in zip(heights, rows.values()):
        for col, (key, _) in enumerate(columns):
            left = pad + col * (size + pad)
            cell = cells.get(key)
            thumbnail = None if cell is None else cell.thumbnail
            if thumbnail is None:
                canvas[top:top + row_height, left:left + size] = _PLACEHOLDER
            else:
                h, w = thumbnail.shape[:2]
                y0, x0 = top + (row_height - h) // 2, left + (size - w) // 2
                canvas[y0:y0 + h, x0:x0 + w] = thumbnail
            for index, text in enumerate([] if cell is None else cell.caption[:lines]):
                _put_text(canvas, text, left, top + row_height + (index + 1) * line - 2, size)
        top += row_height + lines * line + pad
    return canvas


def _number(value: Optional[float]) -> str:
    return '' if value is None else f'{value:.4f}'


def _best(result: 'CompareResult', metric: str, values: Dict[str, Optional[float]]) -> Optional[float]:
    from rave_basicsr.inference.compare_plan import METRICS

    present = [v for v in values.values() if v is not None]
    if len(present) < 2:
        return None
    return max(present) if METRICS[metric].better == 'higher' else min(present)


def _mean_cell(result: 'CompareResult', label: str, metric: str) -> str:
    value, count, total = result.mean(label, metric), len(result.scores(label, metric)), result.evaluated(label)
    text = _number(value)
    return f'{text} (n={count})' if value is not None and count != total else text


def _header(metric: str) -> str:
    from rave_basicsr.inference.compare_plan import METRICS

    return f'{METRICS[metric].title} {"↑" if METRICS[metric].better == "higher" else "↓"}'


def mean_table(result: 'CompareResult') -> List[List[str]]:
    """Header and rows of the means table (the best value of each metric marked with ``**``)."""
    rows = [['model', 'weights', 'images'] + [_header(m) for m in result.metrics]]
    best = {m: _best(result, m, {model.label: result.mean(model.label, m) for model in result.models})
            for m in result.metrics}
    for model in result.models:
        row = [model.label, model.describe(), str(result.evaluated(model.label))]
        for metric in result.metrics:
            cell = _mean_cell(result, model.label, metric)
            value = result.mean(model.label, metric)
            row.append(f'**{cell}**' if value is not None and value == best[metric] else cell)
        rows.append(row)
    return rows


def per_image_table(result: 'CompareResult', metric: str) -> List[List[str]]:
    """Header and rows (one per image, one column per model) of one metric."""
    rows = [['image'] + [model.label for model in result.models]]
    for image in result.images:
        values = {model.label: result.values.get(model.label, {}).get(image, {}).get(metric)
                  for model in result.models}
        best = _best(result, metric, values)
        rows.append([image] + [f'**{_number(v)}**' if v is not None and v == best else _number(v)
                               for v in values.values()])
    return rows


def markdown_table(rows: List[List[str]]) -> str:
    def escape(cell: str) -> str:
        return cell.replace('|', '\\|')

    lines = ['| ' + ' | '.join(escape(c) for c in rows[0]) + ' |', '|' + '---|' * len(rows[0])]
    lines += ['| ' + ' | '.join(escape(c) for c in row) + ' |' for row in rows[1:]]
    return '\n'.join(lines)


def describe_run(result: 'CompareResult') -> str:
    """One sentence: what was compared on what."""
    plan = result.plan
    gt = (f', ground truth from `{plan.gt_dir}` (matched by file name without extension)' if plan.gt_dir is not None
          else ', no ground truth')
    return (f'{len(result.images)} images from `{plan.input_dir}`{gt}; {len(result.models)} models; precision '
            f'{plan.precision}; metrics as computed by `basicsr test` (BasicSR\'s `calculate_metric` with the '
            'registered functions).')


def markdown_report(result: 'CompareResult') -> str:
    """The whole ``results.md``."""
    from rave_basicsr.inference.compare_plan import METRICS

    parts = ['# rave compare', '', describe_run(result), '', '## Mean over images', '']
    parts += [markdown_table(mean_table(result)) if result.metrics else 'No metric could be computed.', '']
    if result.metrics:
        parts += ['## Per image', '']
        for metric in result.metrics:
            parts += [f'### {METRICS[metric].title}, {METRICS[metric].better} is better', '',
                      markdown_table(per_image_table(result, metric)), '']
    if result.problems:
        parts += ['## Problems', ''] + [f'- {problem.describe()}' for problem in result.problems] + ['']
    if result.notes:
        parts += ['## Notes', ''] + [f'- {note}' for note in result.notes] + ['']
    parts += ['Grid: [grid.png](grid.png); page: [index.html](index.html); tables: [results.csv](results.csv), '
              '[per_image.csv](per_image.csv).', '']
    return '\n'.join(parts)


def _csv_text(rows: List[List[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator='\n').writerows(rows)
    return buffer.getvalue()


def _csv_value(value: Optional[float]) -> str:
    return '' if value is None else repr(float(value))


def results_csv(result: 'CompareResult') -> str:
    """``results.csv``: one row per model, means then per-image values (``METRIC[IMAGE]`` columns)."""
    header = ['model', 'weights', 'images'] + list(result.metrics)
    header += [f'{metric}[{image}]' for metric in result.metrics for image in result.images]
    rows = [header]
    for model in result.models:
        per_image = result.values.get(model.label, {})
        row = [model.label, model.describe(), str(result.evaluated(model.label))]
        row += [_csv_value(result.mean(model.label, metric)) for metric in result.metrics]
        row += [_csv_value(per_image.get(image, {}).get(metric)) for metric in result.metrics
                for image in result.images]
        rows.append(row)
    return _csv_text(rows)


def per_image_csv(result: 'CompareResult') -> str:
    """``per_image.csv``: one row per model and evaluated image."""
    rows = [['model', 'image', 'file'] + list(result.metrics)]
    for model in result.models:
        per_image = result.values.get(model.label, {})
        for image in result.images:
            if image in per_image:
                rows.append([model.label, image, result.plan.inputs[image].name]
                            + [_csv_value(per_image[image].get(metric)) for metric in result.metrics])
    return _csv_text(rows)


def _url(*parts: str) -> str:
    return '/'.join(quote(part) for part in parts)


def _html_table(rows: List[List[str]]) -> str:
    def cell(text: str, tag: str) -> str:
        if text.startswith('**') and text.endswith('**'):
            return f'<{tag} class="best">{html.escape(text[2:-2])}</{tag}>'
        return f'<{tag}>{html.escape(text)}</{tag}>'

    head = ''.join(cell(c, 'th') for c in rows[0])
    body = ''.join('<tr>' + ''.join(cell(c, 'td') for c in row) + '</tr>' for row in rows[1:])
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
td.best{font-weight:bold;background:#eef6e8}
.grid img{max-width:100%;border:1px solid #ccc}
.ba{position:relative;display:inline-block;max-width:100%;line-height:0}
.ba img{display:block;max-width:100%;height:auto}
.ba img.before{position:absolute;top:0;left:0;width:100%;height:100%;clip-path:inset(0 50% 0 0)}
.ba span{position:absolute;top:4px;background:rgba(0,0,0,.55);color:#fff;font-size:12px;line-height:1.4;
  padding:0 4px}
.controls{margin:.3em 0 1.5em}
.controls input[type=range]{width:320px;vertical-align:middle}
section{border-top:1px solid #ddd;padding-top:.5em}
.problems li{color:#a00}
"""

_SCRIPT = """
document.querySelectorAll('section.image').forEach(function (section) {
  var before = section.querySelector('img.before'), after = section.querySelector('img.after');
  var slider = section.querySelector('input[type=range]'), choice = section.querySelector('select');
  var link = section.querySelector('a.full');
  slider.addEventListener('input', function () {
    before.style.clipPath = 'inset(0 ' + (100 - slider.value) + '% 0 0)';
  });
  choice.addEventListener('change', function () {
    var option = choice.options[choice.selectedIndex];
    after.src = option.value;
    link.href = option.getAttribute('data-full');
    section.querySelector('span.after').textContent = option.textContent;
  });
});
"""


def _image_section(result: 'CompareResult', image: str) -> str:
    """One image: its metrics per model and a before/after view."""
    out_dir = result.plan.out_dir
    name = result.plan.inputs[image].name
    choices = []  # (title, preview url, full-size url)
    for model in result.models:
        if model.is_input or image not in result.values.get(model.label, {}):
            continue
        choices.append((model.label, _url('previews', model.label, f'{image}.jpg'),
                        _url(model.label, f'{image}.png')))
    if (out_dir / 'previews' / 'gt' / f'{image}.jpg').is_file():  # the ground truth itself may be outside OUTDIR
        choices.append(('ground truth', _url('previews', 'gt', f'{image}.jpg'), _url('previews', 'gt', f'{image}.jpg')))
    parts = [f'<section class="image" id="{html.escape(quote(image))}"><h3>{html.escape(name)}</h3>']
    rows = [['model'] + [f'{m}' for m in result.metrics]]
    for model in result.models:
        scores = result.values.get(model.label, {}).get(image)
        if scores is not None:
            rows.append([model.label] + [_number(scores.get(m)) for m in result.metrics])
    if result.metrics and len(rows) > 1:
        parts.append(_html_table(rows))
    problems = [p for p in result.problems if p.image == name]
    if problems:
        parts.append('<ul class="problems">' + ''.join(f'<li>{html.escape(p.describe())}</li>' for p in problems)
                     + '</ul>')
    before = out_dir / 'previews' / 'input' / f'{image}.jpg'
    if choices and before.is_file():
        title, preview, full = choices[0]
        options = ''.join(f'<option value="{html.escape(p)}" data-full="{html.escape(f)}">{html.escape(t)}</option>'
                          for t, p, f in choices)
        parts.append(
            f'<div class="ba"><img class="after" src="{html.escape(preview)}" alt="after">'
            f'<img class="before" src="{html.escape(_url("previews", "input", f"{image}.jpg"))}" alt="before">'
            f'<span style="left:4px">input</span><span class="after" style="right:4px">{html.escape(title)}</span>'
            '</div>'
            f'<div class="controls">before / after <input type="range" min="0" max="100" value="50"> '
            f'<select>{options}</select> <a class="full" href="{html.escape(full)}">full size</a></div>')
    parts.append('</section>')
    return ''.join(parts)


def _code_spans(markdown: str) -> str:
    """Escaped HTML of a line of Markdown whose only markup is `code`."""
    return re.sub(r'`([^`]*)`', r'<code>\1</code>', html.escape(markdown))


def html_report(result: 'CompareResult', grid: bool) -> str:
    """The whole ``index.html`` (self-contained apart from the images it shows by relative path)."""
    from rave_basicsr.inference.compare_plan import METRICS

    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f'<title>rave compare: {len(result.models)} models on {len(result.images)} images</title>',
             f'<style>{_STYLE}</style></head><body><h1>rave compare</h1>',
             f'<p>{_code_spans(describe_run(result))}</p><h2>Mean over images</h2>']
    parts.append(_html_table(mean_table(result)) if result.metrics else '<p>No metric could be computed.</p>')
    parts.append('<p>Tables: <a href="results.csv">results.csv</a>, <a href="per_image.csv">per_image.csv</a>, '
                 '<a href="results.md">results.md</a>.</p>')
    if result.problems:
        parts.append('<h2>Problems</h2><ul class="problems">'
                     + ''.join(f'<li>{html.escape(p.describe())}</li>' for p in result.problems) + '</ul>')
    if result.notes:
        parts.append('<h2>Notes</h2><ul>' + ''.join(f'<li>{html.escape(n)}</li>' for n in result.notes) + '</ul>')
    if grid:
        parts.append('<h2>Grid</h2><div class="grid"><a href="grid.png"><img src="grid.png" alt="inputs by models">'
                     '</a></div>')
    if result.metrics:
        parts.append('<h2>Per metric</h2>')
        for metric in result.metrics:
            parts.append(f'<h3>{html.escape(METRICS[metric].title)}</h3>'
                         + _html_table(per_image_table(result, metric)))
    parts.append('<h2>Per image</h2>')
    parts += [_image_section(result, image) for image in result.images]
    parts.append(f'<script>{_SCRIPT}</script></body></html>\n')
    return '\n'.join(parts)


def write_reports(result: 'CompareResult', rows: Dict[str, Dict[str, GridCell]], thumb_size: int) -> Dict[str, Path]:
    """Write every report file into the output folder (replacing the previous run's) and return their paths."""
    out_dir = result.plan.out_dir
    if len(rows) < len(result.images):
        result.notes.append(f'the grid shows the first {len(rows)} of {len(result.images)} images (--grid-limit).')
    files = {'results.csv': out_dir / 'results.csv', 'per_image.csv': out_dir / 'per_image.csv',
             'results.md': out_dir / 'results.md', 'index.html': out_dir / 'index.html'}
    write_image_atomic(str(files['results.csv']), results_csv(result).encode())
    write_image_atomic(str(files['per_image.csv']), per_image_csv(result).encode())
    write_image_atomic(str(files['results.md']), markdown_report(result).encode())
    if rows:
        ok, encoded = cv2.imencode('.png', render_grid(grid_columns(result), rows, thumb_size))
        if ok:
            files['grid.png'] = out_dir / 'grid.png'
            write_image_atomic(str(files['grid.png']), encoded.tobytes())
    write_image_atomic(str(files['index.html']), html_report(result, 'grid.png' in files).encode())
    return files
