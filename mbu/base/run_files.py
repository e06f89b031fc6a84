"""The names of a run folder's files, for every layer that writes or reads them.

``mbu train`` writes the checkpoint, its config, the MLflow run record, image grids and the list of
skipped images; ``mbu eval`` (and a search's scoring) the reports, ``REPORT_FILES`` with the JSON first.
"""

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
RUN_FILE = "mlflow_run.json"  # the MLflow run the folder's files belong to
REPORT_FILE = "report.json"
MARKDOWN_FILE = "report.md"
CURVES_FILE = "iou_curves.png"
EXAMPLES_FILE = "examples.png"
MASKS_FILE = "masks.npz"
REPORT_FILES = (REPORT_FILE, MARKDOWN_FILE, CURVES_FILE, EXAMPLES_FILE, MASKS_FILE)
SKIPPED_FILE = "skipped_images.txt"  # the images --skip-bad left out
GRIDS_DIR = "grids"  # image grids every display_iter iterations
