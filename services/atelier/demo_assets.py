"""Images the demo draws itself (no downloads): a document page and a bar chart."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

#: The schema the demo asks the DOCUMENT task to fill.
DOCUMENT_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "date": {"type": "string"},
        "total": {"type": "number"},
        "items": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
            "required": ["name", "amount"]}},
    },
    "required": ["title", "total", "items"],
}


def document_page() -> bytes:
    """An invoice-like page: a title, a date, a small table and a total."""
    page = Image.new("RGB", (384, 512), "white")
    draw = ImageDraw.Draw(page)
    draw.text((24, 24), "INVOICE 2026-117", fill="black")
    draw.text((24, 48), "Date: 2026-11-26", fill="black")
    rows = [("Canvas, large", "120.00"), ("Brushes (set)", "35.50"), ("Oil paints", "64.25")]
    y = 96
    draw.rectangle((20, y - 6, 364, y + 22 * len(rows) + 4), outline="black")
    for name, amount in rows:
        draw.text((28, y), name, fill="black")
        draw.text((290, y), amount, fill="black")
        y += 22
    draw.text((220, y + 24), "Total: 219.75", fill="black")
    return _png(page)


def bar_chart() -> bytes:
    """A bar chart of four values with axes, title and labels."""
    chart = Image.new("RGB", (384, 288), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((120, 10), "Images per day", fill="black")
    draw.line((40, 250, 360, 250), fill="black")
    draw.line((40, 250, 40, 40), fill="black")
    for i, (label, value, color) in enumerate(
            [("Mon", 40, "#4477aa"), ("Tue", 90, "#ee6677"), ("Wed", 65, "#228833"),
             ("Thu", 120, "#ccbb44")]):
        x = 60 + i * 75
        draw.rectangle((x, 250 - value * 1.6, x + 45, 250), fill=color)
        draw.text((x + 10, 256), label, fill="black")
        draw.text((x + 10, 236 - value * 1.6), str(value), fill="black")
    return _png(chart)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
