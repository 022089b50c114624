"""Images the demo draws itself (no downloads): a toy subject, a document page, a chart."""

from __future__ import annotations

from PIL import Image, ImageDraw

from atelier.kit.images import encode_png

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


def toy_photo(pose: int, size: int = 128) -> bytes:
    """The demo's subject: a drawn toy (red body, yellow head, blue eyes) in one of
    four poses, on a plain background."""
    image = Image.new("RGB", (size, size), (226, 232, 238))
    draw = ImageDraw.Draw(image)
    shift = (pose - 1.5) * size / 12
    tilt = (pose % 2) * size / 16
    s = size / 128
    draw.rounded_rectangle((40 * s + shift, 60 * s, 88 * s + shift, 112 * s), radius=10 * s,
                           fill=(196, 52, 40))
    draw.ellipse((46 * s + shift + tilt, 22 * s, 82 * s + shift + tilt, 58 * s),
                 fill=(242, 196, 64))
    for eye in (56, 70):
        draw.ellipse(((eye - 3) * s + shift + tilt, 36 * s, (eye + 3) * s + shift + tilt,
                      42 * s), fill=(40, 70, 160))
    draw.line((40 * s + shift, 72 * s, 24 * s + shift, (56 + 12 * pose) * s),
              fill=(196, 52, 40), width=int(6 * s))
    draw.line((88 * s + shift, 72 * s, 104 * s + shift, (88 - 12 * pose) * s),
              fill=(196, 52, 40), width=int(6 * s))
    return encode_png(image)


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
    return encode_png(page)


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
    return encode_png(chart)
