"""Sample sheets: images in a grid with their captions under them (what training and evaluation write)."""

from typing import List

from PIL import Image, ImageDraw


def image_grid(images: List[Image.Image], captions: List[str], columns: int = 4, scale: int = 4) -> Image.Image:
    """Images (upscaled, nearest) with their captions under them."""
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    cell_h = h + 28
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, captions)):
        x, y = (i % columns) * w, (i // columns) * cell_h
        sheet.paste(image.resize((w, h), Image.NEAREST), (x, y))
        words, line, lines = text.split(), "", []
        for word in words:
            if len(line) + len(word) > w // 6:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        draw.text((x + 2, y + h + 1), "\n".join(lines[:2]), fill="black")
    return sheet


__all__ = ["image_grid"]
