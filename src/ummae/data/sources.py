"""Where the images are: scanning image folders and reading list files, the embedded demo photos.

Each lister returns ``(path, label)`` samples (label -1: unlabelled) and says what it read;
:mod:`ummae.data.dataset` reads the images, :mod:`ummae.data.pretrain` and
:mod:`ummae.data.classify` choose the lister for a ``--data`` value, and ``ummae shards`` lists
its source with the same functions.

Folder scans follow symlinked directories (dataset trees are often assembled from links) but
read each real directory once, so a link back to a parent neither repeats images nor loops
(:func:`_scan_trees`).
"""

from __future__ import annotations

import logging
import os

import skimage.data

from ummae.errors import DataError

logger = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Real photographs shipped inside scikit-image's wheel (the embedded default data). Synthetic
# images (chessboard, logo, text, page, phantom, color chart, binary horse) are left out, and
# so is microaneurysms.png (102x102 px: too small to crop from).
DEMO_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
MIN_DEMO_PHOTOS = 5


def is_image_file(name: str) -> bool:
    """True for a non-hidden file name with one of :data:`IMG_EXTENSIONS` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _dir_key(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory ``path`` resolves to (symlinks followed), or
    ``None`` if it cannot be stat'ed (a broken link, no permission)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _scan_trees(folders: list[str], visited: set) -> list[list[str]]:
    """The image files below each of ``folders`` (recursive, hidden files and folders skipped),
    one list per folder, in a fixed order so the sample order is the same on every machine.

    Symlinked folders are followed, since dataset trees are often assembled from links, but
    every real directory is read once: ``visited`` holds the ``(st_dev, st_ino)`` of the
    directories already claimed (updated in place), and a folder whose key is in it is not
    entered again. The real (non-link) sub-folders of all ``folders`` are claimed first, and
    symlinked folders are followed only after that, in rounds (a linked tree's own links wait
    for the next round): so a link back to a parent (``sub/loop -> ..``) or into another
    part of the tree neither lists images twice nor makes the walk endless, an image inside
    the tree keeps its real path (and, for an ImageFolder, the label of the class folder it
    really lies in), and a link to a directory outside is followed once. Each folder's list
    holds the images of its real tree (``os.walk`` top-down order, names sorted), then those
    reached through links. ``folders`` themselves are always scanned."""
    found: list[list[str]] = [[] for _ in folders]
    pending = list(enumerate(folders))  # (owner, directory) trees to walk without links
    revisits = 0
    while pending:
        links = []
        for owner, top in pending:
            for root, dirs, files in os.walk(top):  # followlinks=False: links listed, not entered
                keep = []
                for d in sorted(dirs):
                    path = os.path.join(root, d)
                    if d.startswith("."):
                        continue
                    if os.path.islink(path):
                        links.append((owner, path))  # followed once the real trees are claimed
                        continue
                    key = _dir_key(path)
                    if key is None or key in visited:  # unreadable, or a bind-mounted repeat
                        continue
                    visited.add(key)
                    keep.append(d)
                dirs[:] = keep  # os.walk descends into these only, in this order
                found[owner].extend(os.path.join(root, f) for f in sorted(files) if is_image_file(f))
        pending = []
        for owner, path in links:
            key = _dir_key(path)
            if key is None:
                continue  # a broken link
            if key in visited:
                revisits += 1
                continue
            visited.add(key)
            pending.append((owner, path))
    if revisits:
        logger.info(
            "%s: %d folder link(s) lead to directories already scanned (a link loop "
            "or a second path); each directory is read once",
            folders[0] if len(folders) == 1 else os.path.dirname(folders[0]),
            revisits,
        )
    return found


def scan_images(folder: str, visited: set | None = None) -> list[str]:
    """All image files below ``folder``, each real directory read once; see
    :func:`_scan_trees` (``visited``: directory keys already claimed, updated in place;
    ``folder``'s own key is added)."""
    visited = set() if visited is None else visited
    top = _dir_key(folder)
    if top is not None:
        visited.add(top)
    return _scan_trees([folder], visited)[0]


def no_images_error(folder: str) -> DataError:
    """The error for a folder that holds no image file (raise it)."""
    return DataError(f"no images were found in {folder} (looked for {' '.join(IMG_EXTENSIONS)}, any case)")


def demo_samples(repeats: int) -> tuple[list[tuple[str, int]], str, str]:
    """The embedded demo: ``(samples, folder, note)``, each photo of :data:`DEMO_PHOTOS` found
    in scikit-image's wheel listed ``repeats`` times with label -1."""
    folder = os.path.dirname(skimage.data.__file__)
    # Only files already in the wheel are opened: never skimage's fetch/download helpers.
    photos = [os.path.join(folder, n) for n in DEMO_PHOTOS if os.path.isfile(os.path.join(folder, n))]
    if len(photos) < MIN_DEMO_PHOTOS:
        raise DataError(
            f"embedded demo data: found only {len(photos)} of the {len(DEMO_PHOTOS)} sample "
            f"photos in {folder} (need at least {MIN_DEMO_PHOTOS}); reinstall scikit-image or "
            f"pass a data path"
        )
    if repeats < 1:
        raise DataError(f"demo_repeats must be >= 1, got {repeats}")
    samples = [(p, -1) for _ in range(repeats) for p in photos]
    return samples, folder, f"{len(photos)} scikit-image photos x {repeats} repeats"


def folder_samples(folder: str) -> tuple[list[tuple[str, int]], str, list[str]]:
    """ImageFolder layout if the top level holds only class sub-folders; otherwise (any image
    directly in ``folder``) a flat unlabelled folder, searched recursively with label -1:
    top-level images mean the sub-folders are not a class split.

    Returns ``(samples, kind, class_names)``: kind ``"ImageFolder"`` with the sorted class
    folder names (label = index in them), or ``"flat folder"`` with ``[]``."""
    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    top_images = [e for e in entries if is_image_file(e) and os.path.isfile(os.path.join(folder, e))]
    if top_images:
        paths = scan_images(folder)
        return [(p, -1) for p in paths], "flat folder", []

    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    # One scan of all classes, with the top folder and every class folder claimed from the
    # start and every real sub-folder claimed before any link is followed: a link inside one
    # class to the top, to another class or into it is not followed, so each image is listed
    # once, under the class folder it really lies in.
    class_dirs = [os.path.join(folder, name) for name in classes]
    visited = {k for k in map(_dir_key, [folder] + class_dirs) if k is not None}
    per_class = _scan_trees(class_dirs, visited)
    samples, direct = [], False
    for label, (class_dir, paths) in enumerate(zip(class_dirs, per_class, strict=True)):
        # labels = index in the sorted names, as ImageNet
        if not paths:
            logger.warning("class folder %s holds no images (its label %d stays unused)", class_dir, label)
        direct = direct or any(os.path.dirname(p) == class_dir for p in paths)
        samples.extend((p, label) for p in paths)
    if not samples:
        raise no_images_error(folder)
    if not direct:
        # e.g. the dataset root with train/ and val/ was passed instead of train/
        logger.warning(
            "no class folder of %s holds images directly; its sub-folders (%s) are "
            "used as classes - is this the parent of the split folders?",
            folder,
            ", ".join(classes[:5]),
        )
    return samples, "ImageFolder", classes


def list_file_samples(list_file: str, data_root: str | None, require_labels: bool = False) -> tuple[list, str, int]:
    """``relative/path [label]`` per line (the reference's IN1K/train.txt); blank lines and
    lines starting with ``#`` are skipped. Paths may not contain spaces. Files are not checked
    here (ImageNet lists have 1.28M lines): a missing one reads as a bad image later.

    ``require_labels`` (labelled data: fine-tuning, evaluation) refuses a line without a
    label or with a negative one, naming it, since label -1 would otherwise be trained on.
    Returns ``(samples, root, number of distinct labels)``."""
    root = data_root if data_root is not None else os.path.dirname(os.path.abspath(list_file))
    if not os.path.isdir(root):
        raise DataError(f"data root not found: {root} (for list file {list_file})")
    if os.path.splitext(list_file)[1].lower() in IMG_EXTENSIONS:
        raise DataError(f"--data {list_file} is an image file; give the folder that holds the images, or a list file")
    samples = []
    with open(list_file, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError:
            raise DataError(
                f"--data {list_file} is not a text list file (it is not UTF-8 text); give an image "
                f"folder or a list file of 'relative/path label' lines"
            ) from None
        for lineno, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if len(fields) > 2:
                raise DataError(
                    f"{list_file}, line {lineno}: expected 'path [label]', got {len(fields)} "
                    f"fields (paths may not contain spaces)"
                )
            label = -1
            if len(fields) == 2:
                try:
                    label = int(fields[1])
                except ValueError:
                    raise DataError(f"{list_file}, line {lineno}: label {fields[1]!r} is not an integer") from None
            if require_labels and label < 0:
                problem = "has no label" if len(fields) == 1 else f"has negative label {label}"
                raise DataError(
                    f"{list_file}, line {lineno}: {fields[0]} {problem}; labelled data needs "
                    f"'path label' with an integer label >= 0 on every line"
                )
            samples.append((os.path.join(root, fields[0]), label))
    if not samples:
        raise DataError(f"list file {list_file} lists no images")
    return samples, root, len({lab for _, lab in samples if lab >= 0})
