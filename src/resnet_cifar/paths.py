"""Every path the stages share, relative to the project root. No TensorFlow here, so that a stage
which only reads results (report, ablation) starts in a fraction of a second."""

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
METRICS_DIR = Path("metrics")
EXPLORE_JSON = METRICS_DIR / "explore.json"
EXPLORE_FIGURES_DIR = METRICS_DIR / "explore"
VARIANTS_DIR = METRICS_DIR / "variants"
REPORT_MD = METRICS_DIR / "report.md"
REPORT_FIGURES_DIR = METRICS_DIR / "report"
ABLATION_MD = METRICS_DIR / "ablation.md"
CURVES_DIR = METRICS_DIR / "curves"  # the report's learning curves, for dvc.yaml's top-level plots
CHECKPOINTS_DIR = Path(".dvc/tmp/checkpoints")  # outside the stages' outputs, which DVC deletes


def raw_path(dataset: str) -> Path:
    """The download stage's uint8 arrays of `dataset`."""
    return RAW_DIR / f"{dataset}.npz"


def model_path(variant: str) -> Path:
    return MODELS_DIR / f"{variant}.keras"


def live_dir(variant: str) -> Path:
    """The variant's DVCLive training history."""
    return VARIANTS_DIR / variant / "train"


def live_outputs(variant: str) -> tuple[Path, Path]:
    """What DVCLive writes in the variant's live_dir (beside DVC's .gitignore, which git tracks)."""
    return live_dir(variant) / "metrics.json", live_dir(variant) / "plots"


def timing_path(variant: str) -> Path:
    return VARIANTS_DIR / variant / "train_time.json"


def summary_path(variant: str) -> Path:
    return VARIANTS_DIR / variant / "summary.txt"


def evaluate_path(variant: str) -> Path:
    return VARIANTS_DIR / variant / "evaluate.json"


def confusion_path(variant: str) -> Path:
    return VARIANTS_DIR / variant / "confusion.csv"


def curves_path(metric: str, variant: str) -> Path:
    """The variant's train and validation `metric` (accuracy, loss) by epoch."""
    return CURVES_DIR / metric / f"{variant}.csv"


def checkpoint_dir(variant: str, process: int = 0) -> Path:
    """Process 0's, or a single process's; each other process of a job keeps its own."""
    return CHECKPOINTS_DIR / (variant if process == 0 else f"{variant}.process-{process}")
