"""Random-access data sources: ``len(source)`` and ``source[i] -> {'image': ..., 'label': int}``.

=====================  ==========================================  ==================================
source                 ``'image'``                                 made by
=====================  ==========================================  ==================================
Fashion-MNIST (IDX)    ``[28, 28, 1] uint8``                       ``FashionMnistSource(directory, split)``
image folder           the file's path (``str``), decoded later    ``ImageFolderSource(root)``
TFDS ``data_source``   the encoded image (bytes), decoded later    ``TfdsSource(name, split, data_dir)``
=====================  ==========================================  ==================================

Every source is cheap to pickle (it reloads its data in the process that reads it),
so grain's worker processes can each open their own copy.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import zlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
# torchvision's ImageFolder extensions (MAE's loader): TIFF carries the 16-bit, 32-bit and float images.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# IDX type codes (the third byte of the magic number) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not, told apart by content) as a numpy array in native byte order.

    The IDX header is a magic number ``00 00 <type> <ndim>`` and ``ndim``
    big-endian uint32 sizes, followed by the values, big-endian, row-major.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: naming the file, when the gzip stream is corrupt or cut
        short, the magic number is not an IDX one, or the data is shorter or
        longer than the header's sizes say.
    """
    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({error}).") from error
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the 4-byte magic number.")
    zero, type_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file: magic number 0x{raw[:4].hex()} should be 0x0000TTDD with type TT in "
            f"{sorted(f'{t:02x}' for t in _IDX_DTYPES)} and DD >= 1 dimensions."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header: {len(raw)} bytes, {header_size} needed for {ndim} sizes.")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "corrupt (trailing bytes after the data)"
        raise ValueError(f"{path}: {problem} IDX file: {len(raw)} bytes, but its header {shape} implies {expected}.")
    values = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="), copy=False)


def idx_length(path: str | os.PathLike) -> int:
    """The first size in an IDX file's header (its number of items), reading only the 8 header bytes."""
    with open(path, "rb") as file:
        gzipped = file.read(2) == _GZIP_MAGIC
    with (gzip.open if gzipped else open)(path, "rb") as file:
        header = file.read(8)
    if len(header) < 8 or header[3] == 0:
        raise ValueError(f"{path}: not an IDX file (its header is {header.hex()}).")
    return int.from_bytes(header[4:8], "big")


def _idx_file(directory: pathlib.Path, stem: str) -> pathlib.Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"no {stem}[.gz] in {directory}: install Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`, "
        f"which fills {FASHION_MNIST_DIR}) or point the data.path config key at a directory holding the IDX files."
    )


class FashionMnistSource:
    """Fashion-MNIST from its four IDX files: ``{'image': [28, 28, 1] uint8, 'label': int in 0..9}``.

    ``directory`` holds ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``;
    ``split`` is ``'train'`` (60000 images) or ``'test'`` (10000). The files are
    read on first access, in the process that reads them.
    """

    def __init__(self, directory: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train"):
        if split not in FASHION_MNIST_SPLITS:
            raise ValueError(f"Fashion-MNIST has splits {tuple(FASHION_MNIST_SPLITS)}, not {split!r}.")
        self.directory = pathlib.Path(directory)
        self.split = split
        prefix = FASHION_MNIST_SPLITS[split]
        self.images_path = _idx_file(self.directory, f"{prefix}-images-idx3-ubyte")
        self.labels_path = _idx_file(self.directory, f"{prefix}-labels-idx1-ubyte")
        self._arrays = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            images, labels = read_idx(self.images_path), read_idx(self.labels_path)
            if images.dtype != np.uint8 or images.ndim != 3:
                raise ValueError(
                    f"{self.images_path}: expected uint8 images [n, h, w] (magic 0x00000803), "
                    f"got {images.dtype} {images.shape}."
                )
            if labels.dtype != np.uint8 or labels.ndim != 1:
                raise ValueError(
                    f"{self.labels_path}: expected uint8 labels [n] (magic 0x00000801), got {labels.dtype} {labels.shape}."
                )
            if len(images) != len(labels):
                raise ValueError(
                    f"{self.images_path} holds {len(images)} images but {self.labels_path} {len(labels)} labels."
                )
            self._arrays = images[..., None], labels
        return self._arrays

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole split: ``(images [n, 28, 28, 1] uint8, labels [n] uint8)``, read and checked once."""
        return self._load()

    def __len__(self) -> int:
        return len(self._load()[1])

    def num_examples(self) -> int:
        """``len(self)`` from the labels file's header alone, without loading (or checking) the data."""
        return idx_length(self.labels_path)

    def __getitem__(self, index: int) -> dict:
        images, labels = self._load()
        return {"image": images[index], "label": int(labels[index])}

    def __getstate__(self):
        # Workers reread the files rather than receive 47 MB through a pipe.
        return self.__dict__ | {"_arrays": None}

    def __repr__(self):
        return f"FashionMnistSource({str(self.directory)!r}, split={self.split!r})"


def _image_files(class_dir: pathlib.Path) -> list[pathlib.Path]:
    """The image files of one class directory, sorted (extensions ``IMAGE_EXTENSIONS``, any case)."""
    return [f for f in sorted(class_dir.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]


def count_images(root: str | os.PathLike, at_most: int | None = None) -> int:
    """How many images ``ImageFolderSource(root)`` would hold, listing class directories only until ``at_most``
    are found (a quick check that a split is big enough); 0 when ``root`` does not exist."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return 0
    count = 0
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        count += len(_image_files(class_dir))
        if at_most is not None and count >= at_most:
            break
    return count


class ImageFolderSource:
    """``root/<class_name>/*.{jpg,jpeg,png,...}`` (``IMAGE_EXTENSIONS``): ``{'image': path str, 'label': int}``.

    Class ids follow the sorted class-directory names (as torchvision's
    ``ImageFolder``); files are sorted within a class, extensions matched
    case-insensitively. The image is decoded by ``transforms.DecodeImage``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; expected root/<class_name>/*.jpg.")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.samples = [
            (str(file), label) for label, name in enumerate(self.classes) for file in _image_files(self.root / name)
        ]
        if not self.samples:
            raise ValueError(
                f"image folder {self.root} holds no {'/'.join(IMAGE_EXTENSIONS)} file under a class directory "
                "(expected root/<class_name>/*.jpg)."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return {"image": path, "label": label}

    def __repr__(self):
        return f"ImageFolderSource({str(self.root)!r}, {len(self.classes)} classes, {len(self.samples)} images)"


class TfdsSource:
    """A TFDS dataset in ArrayRecord form through ``tfds.data_source``: ``{'image': bytes, 'label': int}``.

    ``imagenet2012`` is the main use; prepare it first (``tfds build
    imagenet2012 --file_format=array_record``), nothing is downloaded here.
    An image feature (``tfds.features.Image``) comes as its stored encoded
    bytes (TFDS's ``SkipDecoding``), so ``transforms.DecodeImage`` decodes it:
    JPEGs with the fast decoder, in the pipeline's worker processes, rather
    than TFDS with Pillow. Any other kind of image feature (a plain tensor) is
    decoded by TFDS into ``[H, W, C] uint8``, and so are the arrays of
    ``tfds.testing.mock_data`` when TensorFlow is not installed (it would be
    needed to encode them). Other features (file names, ids) are dropped so
    every item batches.
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None, image_key="image", label_key="label"):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self._source = self._open()

    def _open(self):
        import tensorflow_datasets as tfds

        def open_source(decoders):
            return tfds.data_source(
                self.name, split=self.split, data_dir=self.data_dir, download=False, decoders=decoders
            )

        source = open_source({self.image_key: tfds.decode.SkipDecoding()})
        if not isinstance(source.dataset_info.features[self.image_key], tfds.features.Image):
            return open_source(None)  # SkipDecoding would hand over a tensor's serialised bytes
        if len(source):
            try:
                source[0]
            except ImportError:
                # Stored files never need TensorFlow to hand over their bytes, but TFDS's
                # mock_data makes its images as arrays and needs TensorFlow to encode them.
                return open_source(None)
        return source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        return {"image": example[self.image_key], "label": int(example[self.label_key])}

    def __repr__(self):
        return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"
