"""ImageFolder trees (root/class_name/image.jpg): scanning with clear errors, and tolerant image reading."""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DataError(ValueError):
    """A data problem the user can fix; the message says what and how."""


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """[(path, label)] sorted by class then file name, and the class names (the sub-folder names).

    `classes` fixes the label mapping (e.g. val uses train's); class folders without images are skipped with a
    warning, a tree without any image is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; point data.root at a folder whose train/ (and val/) "
            "sub-folder holds one folder of images per class"
        )
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DataError(f"{root} holds no class sub-folders; put the images in {root}/<class name>/<file>.jpg")
    if classes is None:
        classes = found
    elif unknown := sorted(set(found) - set(classes)):
        raise DataError(f"{root} has classes that the training set lacks: {', '.join(unknown[:5])}")
    samples, empty = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        if not files:
            empty.append(name)
        samples += [(str(p), label) for p in files]
    if not samples:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; each class folder must hold images")
    if empty:
        log.warning(
            "%d class folder(s) of %s hold no images and are skipped: %s", len(empty), root, ", ".join(empty[:5])
        )
    return samples, classes


def labelled_root(root: str | Path) -> Path:
    """`root` if it holds the labelled train/ and val/ ImageFolder trees evaluation needs, else a DataError."""
    root = Path(root)
    missing = [part for part in ("train", "val") if not (root / part).is_dir()]
    if missing:
        raise DataError(
            f"evaluation needs labelled ImageFolder trees {root}/train/<class>/ and {root}/val/<class>/; "
            f"{' and '.join(str(root / m) for m in missing)} missing: pass --data with a folder holding both"
        )
    return root


UNREADABLE = (OSError, ValueError, Image.DecompressionBombError, SyntaxError)  # what load_rgb raises for a bad file


def load_rgb(path: str) -> Image.Image:
    """Decode fully (so truncated files fail here, not later) and convert grayscale/CMYK/palette to RGB; a file
    that is not a readable image raises one of UNREADABLE."""
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


REPORTED: set[str] = set()  # unreadable files this process has warned about


def report_unreadable(unreadable: list[tuple[str, str]]) -> None:
    """Warn about each (path, reason) the first time this process meets it; later meetings are silent (training
    still counts each draw of it in skipped_images)."""
    for path, reason in unreadable:
        if path not in REPORTED:
            REPORTED.add(path)
            log.warning(
                "unreadable image %s (%s), replaced by the next readable one; warned once, "
                "each time training draws it counts in skipped_images",
                path,
                reason,
            )


def first_readable(
    samples: list[tuple[str, int]], index: int, attempts: int = 16, report: bool = True
) -> tuple[Image.Image, int, list[tuple[str, str]]]:
    """(image, label, [(path, reason)] of the unreadable files tried): sample `index`, or the next readable one after
    it (the list is empty when sample `index` was readable).

    With `report` the unreadable files are warned about here, once per file and process (report_unreadable). Loaders
    whose worker processes read pass False and report the returned list in their main process, so each file is warned
    about once per rank, whichever worker, epoch or evaluation pass meets it.

    Replacing instead of dropping keeps every batch full, which the all-gather of keys across ranks needs.
    """
    unreadable = []
    for offset in range(attempts):
        path, label = samples[(index + offset) % len(samples)]
        try:
            img = load_rgb(path)
            break
        except UNREADABLE as e:
            unreadable.append((path, f"{type(e).__name__}: {e}"))
    else:
        raise DataError(
            f"{attempts} consecutive unreadable images from {samples[index][0]}; "
            "check the data with `python -m fastvit_ssl.data.check DIR`"
        )
    if report:
        report_unreadable(unreadable)
    return img, label, unreadable
