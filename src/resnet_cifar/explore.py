"""Stage `explore`: look at the data before training on it (the assignment's exercise 1).

Writes metrics/explore.json (sizes, classes, smallest and largest class, pixel range,
per-channel mean/std) and, under metrics/explore/, the first 16 training images in a 2x8 grid
titled with their class, examples of every class, class counts of train and test, and
per-channel pixel histograms.
"""

import json

import numpy as np

from resnet_cifar.datasets import SPLITS, labels_and_classes, load_raw
from resnet_cifar.params import data_params, load_params
from resnet_cifar.paths import EXPLORE_FIGURES_DIR as PLOTS_DIR
from resnet_cifar.paths import EXPLORE_JSON, raw_path
from resnet_cifar.plots import plt, save_figure
from resnet_cifar.stage import all_or_nothing, atomic_path, run

CHANNELS = ("red", "green", "blue")


def image_grid(images: np.ndarray, titles: list[str], rows: int, cols: int) -> plt.Figure:
    """Images in a rows x cols grid, each titled; empty cells stay blank."""
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def first_images(x: np.ndarray, y: np.ndarray, classes: list[str]) -> plt.Figure:
    """The assignment's figure: the first 16 training images, 2 rows of 8."""
    return image_grid(x[:16], [classes[i] for i in y[:16]], rows=2, cols=8)


def examples_per_class(x: np.ndarray, y: np.ndarray, classes: list[str]) -> plt.Figure:
    """Eight examples of each class, a row per class; one each, 10 to a row, past 20 classes."""
    per_class = 8 if len(classes) <= 20 else 1
    picks = [i for c in range(len(classes)) for i in np.flatnonzero(y == c)[:per_class]]
    cols = 8 if per_class > 1 else 10
    titles = [classes[y[i]] if per_class == 1 or k % per_class == 0 else ""
              for k, i in enumerate(picks)]
    return image_grid(x[picks], titles, rows=-(-len(picks) // cols), cols=cols)


def class_count_bars(counts: dict[str, np.ndarray], classes: list[str]) -> plt.Figure:
    fig, axes = plt.subplots(1, len(counts), figsize=(max(8, 0.25 * len(classes)) * len(counts), 4))
    for ax, (split, split_counts) in zip(np.atleast_1d(axes), counts.items()):
        ax.bar(range(len(classes)), split_counts)
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7 if len(classes) > 20 else 9)
        ax.set_title(f"{split}: {split_counts.sum():,} images")
        ax.set_ylabel("images")
    fig.tight_layout()
    return fig


def pixel_histograms(histograms: np.ndarray) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4))
    for channel, counts in zip(CHANNELS, histograms):
        ax.plot(np.arange(256), counts, color=channel, label=channel)
    ax.set_xlabel("pixel value")
    ax.set_ylabel("pixels (train)")
    ax.set_title("Pixel values per channel")
    ax.legend()
    return fig


def channel_statistics(x: np.ndarray, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel mean, std (on the [0, 1] scale) and 256-bin histogram, chunk by chunk."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    histograms = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(x), chunk):
        pixels = x[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
        for c in range(3):
            histograms[c] += np.bincount(x[start:start + chunk, ..., c].ravel(), minlength=256)
    n = x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / n
    return mean, np.sqrt(total_sq / n - mean**2), histograms


def explore(raw: dict, label_mode: str) -> dict:
    """Write the figures; return the numbers."""
    labels, classes = labels_and_classes(raw, label_mode)
    x_train = raw["x_train"]
    counts = {split: np.bincount(labels[split], minlength=len(classes)) for split in SPLITS}
    mean, std, histograms = channel_statistics(x_train)

    save_figure(first_images(x_train, labels["train"], classes), PLOTS_DIR / "first_16_images.png")
    save_figure(examples_per_class(x_train, labels["train"], classes), PLOTS_DIR / "examples_per_class.png")
    save_figure(class_count_bars(counts, classes), PLOTS_DIR / "class_counts.png")
    save_figure(pixel_histograms(histograms), PLOTS_DIR / "pixel_histograms.png")

    return {
        "images": {split: int(len(raw[f"x_{split}"])) for split in SPLITS},
        "image_shape": list(x_train.shape[1:]),
        "classes": len(classes),
        # Per-class counts are in class_counts.png; the extremes show whether the classes are balanced.
        "class_count_min": {split: int(counts[split].min()) for split in SPLITS},
        "class_count_max": {split: int(counts[split].max()) for split in SPLITS},
        "pixel_min": int(x_train.min()),
        "pixel_max": int(x_train.max()),
        "channel_mean": dict(zip(CHANNELS, np.round(mean, 4).tolist())),
        "channel_std": dict(zip(CHANNELS, np.round(std, 4).tolist())),
    }


def main(argv: list[str]) -> None:
    params = data_params(load_params())
    raw = load_raw(raw_path(params.dataset))
    with all_or_nothing(PLOTS_DIR, EXPLORE_JSON):
        summary = explore(raw, params.label_mode)
        with atomic_path(EXPLORE_JSON) as tmp:
            tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['images']['train']:,} train and {summary['images']['test']:,} test images "
          f"of shape {summary['image_shape']}, {summary['classes']} classes, pixels in "
          f"[{summary['pixel_min']}, {summary['pixel_max']}]; wrote {EXPLORE_JSON} and {PLOTS_DIR}/")


if __name__ == "__main__":
    run(main)
