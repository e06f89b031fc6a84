"""mbu: mask-based unsupervised content transfer (Mokady et al., ICLR 2020), searched with Optuna, tracked in MLflow.

Subpackages: ``mbu.data`` (images in, tensors out), ``mbu.train`` (model, losses,
loop, checkpoints), ``mbu.evaluate`` (masks, IoU, reports), ``mbu.search``
(studies); ``mbu.cli`` is the ``mbu`` command. In the repository the four
subpackages are the top-level folders ``data/``, ``train/``, ``evaluate/`` and
``search/``; an installed copy holds them inside this package.
"""

from pathlib import Path

# Run from a source checkout without installing (e.g. bench scripts on a bare GPU machine):
# the subpackages are this folder's siblings, so the checkout joins the package's search path.
_checkout = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "train").is_dir() and (_checkout / "train" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - __path__ is set for a package
