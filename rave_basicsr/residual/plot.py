"""Pictures of a residual: a bar chart of both ends of the vocabulary ranking and a 2-D projection of the images.

Drawn with OpenCV (already a dependency; matplotlib is not), written atomically. The projection plots every stored
image embedding (normalised) at (coordinate along the residual, coordinate along the first principal component of
the part orthogonal to it): the residual is the horizontal axis, the well-lit mean sits at x = threshold, and the
vertical spread shows the largest variation of the two sets that the residual does *not* encode.
"""
import os
from typing import Any, Dict, List, Tuple

import cv2
import numpy as np

from rave_basicsr.residual.interpret import projection_2d
from rave_basicsr.residual.vector import ResidualVector
from rave_basicsr.utils.errors import RaveError
from rave_basicsr.utils.image_io import encode_image, write_image_atomic

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
WELL_COLOUR, BACK_COLOUR = (40, 120, 220), (230, 120, 30)   # RGB: blue-ish well-lit, orange backlit
POSITIVE, NEGATIVE = (60, 160, 80), (200, 70, 60)
ROW = 18


def _ascii(text: str, width: int = 28) -> str:
    text = text.encode('ascii', 'replace').decode('ascii').replace('\n', ' ')
    return text if len(text) <= width else text[:width - 1] + '~'


def _put(canvas: np.ndarray, text: str, xy: Tuple[int, int], scale: float = 0.42, colour=BLACK) -> None:
    cv2.putText(canvas, text, (int(xy[0]), int(xy[1])), FONT, scale, colour, 1, cv2.LINE_AA)


def bar_chart(summary: Dict[str, Any]) -> np.ndarray:
    """RGB uint8 bar chart of the top (well-lit side) and bottom (backlit side) entries with their cosines."""
    rows: List[Tuple[str, float]] = [(r['text'], r['score']) for r in summary['top']]
    rows += [(r['text'], r['score']) for r in summary['bottom']]
    width, label_w, top_margin = 620, 230, 46
    height = top_margin + ROW * (len(rows) + 1) + 20
    canvas = np.full((height, width, 3), 255, np.uint8)
    _put(canvas, f"cosine with the residual ({summary['vocabulary']['source']}, "
                 f"{summary['vocabulary']['size']} entries)", (10, 20), 0.5)
    limit = max(abs(s) for _, s in rows) or 1.0
    zero = label_w + (width - label_w - 20) // 2
    half = (width - label_w - 20) // 2 - 50
    cv2.line(canvas, (zero, top_margin - 12), (zero, height - 10), GREY, 1)
    y = top_margin
    for n, (text, score) in enumerate(rows):
        if n == len(summary['top']):
            cv2.line(canvas, (10, y - 12), (width - 10, y - 12), GREY, 1)
            y += ROW
        _put(canvas, _ascii(repr(text)), (10, y))
        end = zero + int(round(half * score / limit))
        cv2.rectangle(canvas, (min(zero, end), y - 11), (max(zero, end), y - 1),
                      POSITIVE if score >= 0 else NEGATIVE, -1)
        _put(canvas, f'{score:+.3f}', (end + 4 if score >= 0 else end - 52, y), 0.38)
        y += ROW
    return canvas


def projection_panel(vector: ResidualVector, size: int = 480) -> np.ndarray:
    """RGB uint8 scatter of the stored image embeddings in the (residual, complement PC1) plane."""
    coords = {k: v.cpu().numpy() for k, v in projection_2d(vector).items()}
    points = np.concatenate([coords['well_lit'], coords['backlit'], coords['means']])
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.maximum(high - low, 1e-6)
    low, high = low - 0.08 * span, high + 0.08 * span
    margin = 50
    canvas = np.full((size, size, 3), 255, np.uint8)

    def to_pixel(xy: np.ndarray) -> Tuple[int, int]:
        x = margin + (xy[0] - low[0]) / (high[0] - low[0]) * (size - 2 * margin)
        y = size - margin - (xy[1] - low[1]) / (high[1] - low[1]) * (size - 2 * margin)
        return int(round(x)), int(round(y))

    cv2.rectangle(canvas, (margin, margin), (size - margin, size - margin), GREY, 1)
    threshold_x = to_pixel(np.array([vector.threshold, low[1]]))[0]
    for y in range(margin, size - margin, 8):
        cv2.line(canvas, (threshold_x, y), (threshold_x, y + 4), GREY, 1)
    for key, colour in (('backlit', BACK_COLOUR), ('well_lit', WELL_COLOUR)):
        for xy in coords[key]:
            cv2.circle(canvas, to_pixel(xy), 3, colour, -1, cv2.LINE_AA)
    well, back = to_pixel(coords['means'][0]), to_pixel(coords['means'][1])
    cv2.arrowedLine(canvas, back, well, BLACK, 2, cv2.LINE_AA, tipLength=0.08)
    cv2.circle(canvas, well, 7, WELL_COLOUR, 2, cv2.LINE_AA)
    cv2.circle(canvas, back, 7, BACK_COLOUR, 2, cv2.LINE_AA)
    _put(canvas, 'image embeddings: along the residual (x) vs 1st PC of the rest (y)', (10, 20), 0.4)
    _put(canvas, f"well-lit ({vector.counts['well_lit']})", (margin, size - 28), 0.42, WELL_COLOUR)
    _put(canvas, f"backlit ({vector.counts['backlit']})", (margin + 140, size - 28), 0.42, BACK_COLOUR)
    _put(canvas, f'dashed: threshold {vector.threshold:.3f}', (margin, size - 10), 0.38, GREY)
    return canvas


def render_interpretation(summary: Dict[str, Any], vector: ResidualVector) -> np.ndarray:
    """The bar chart, and beside it the projection when the file stores per-image embeddings."""
    panels = [bar_chart(summary)]
    if vector.embeddings is not None:
        panels.append(projection_panel(vector))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    return np.concatenate(padded, axis=1)


def save_plot(path: str, summary: Dict[str, Any], vector: ResidualVector, overwrite: bool = False) -> None:
    """Render and write the plot (PNG/JPEG by extension); refuses to replace a file unless ``overwrite``."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in ('.png', '.jpg', '.jpeg'):
        raise RaveError(f'--plot {path}: give a .png or .jpg file name.')
    if os.path.exists(path) and not overwrite:
        raise RaveError(f'{path} already exists; choose another --plot name or pass --overwrite.')
    image = render_interpretation(summary, vector).astype(np.float32) / 255.0
    write_image_atomic(path, encode_image(image, extension))
